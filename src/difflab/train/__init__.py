"""Training: the loop, EMA, checkpoints and DDP."""
from .build import build_denoiser, build_schedule, build_unet
from .trainer import Trainer, TrainingError, train
from .vae import VAETrainer, evaluate_vae, train_vae

__all__ = ["Trainer", "TrainingError", "build_denoiser", "build_schedule", "build_unet", "evaluate_vae",
           "train", "train_vae", "VAETrainer"]
