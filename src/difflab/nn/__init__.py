"""Networks: tensors in, tensors out. They know nothing of schedules, samplers or configs."""
from .classifier import NoiseAwareClassifier
from .unet import UNet, UNetSpec
from .vae import AutoencoderKL, DiagonalGaussian

__all__ = ["AutoencoderKL", "DiagonalGaussian", "NoiseAwareClassifier", "UNet", "UNetSpec"]
