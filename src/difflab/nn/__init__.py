"""Networks: tensors in, tensors out. They know nothing of schedules, samplers or configs."""
from .unet import UNet
from .vae import AutoencoderKL, DiagonalGaussian

__all__ = ["AutoencoderKL", "DiagonalGaussian", "UNet"]
