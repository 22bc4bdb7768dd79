"""Training: the one training step, the loop, EMA, checkpoints (through ``difflab.runs``) and DDP;
the VAE of latent diffusion and the noise-aware classifier of classifier guidance."""
from .build import build_denoiser, build_schedule, build_unet
from .classifier import load_classifier, noisy_accuracy, save_classifier, train_noisy_classifier
from .step import TrainingParts, training_step
from .trainer import Trainer, TrainingError, train
from .vae import VAETrainer, evaluate_vae, train_vae

__all__ = ["Trainer", "TrainingError", "TrainingParts", "VAETrainer", "build_denoiser", "build_schedule",
           "build_unet", "evaluate_vae", "load_classifier", "noisy_accuracy", "save_classifier", "train",
           "train_noisy_classifier", "train_vae", "training_step"]
