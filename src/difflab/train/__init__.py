"""Training: the loop, EMA, checkpoints and DDP."""
from .build import build_denoiser, build_schedule, build_unet
from .trainer import Trainer, TrainingError, train

__all__ = ["Trainer", "TrainingError", "build_denoiser", "build_schedule", "build_unet", "train"]
