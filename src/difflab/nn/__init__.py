"""Networks: tensors in, tensors out. They know nothing of schedules, samplers or configs."""
from .classifier import NoiseAwareClassifier
from .unet import AttentionHook, UNet, UNetSpec, attention_hooks
from .vae import AutoencoderKL, DiagonalGaussian

__all__ = ["AttentionHook", "AutoencoderKL", "DiagonalGaussian", "NoiseAwareClassifier", "UNet", "UNetSpec",
           "attention_hooks"]
