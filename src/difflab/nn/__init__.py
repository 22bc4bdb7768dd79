"""Networks: tensors in, tensors out. They know nothing of schedules, samplers or configs."""
from .classifier import NoiseAwareClassifier
from .controlnet import ControlledUNet, ControlNet
from .image_encoder import ImageTextModel
from .ip_adapter import IPAdaptedUNet, IPAdapter
from .unet import AttentionHook, UNet, UNetSpec, UNetWrapper, attention_hooks
from .vae import AutoencoderKL, DiagonalGaussian

__all__ = ["AttentionHook", "AutoencoderKL", "ControlNet", "ControlledUNet", "DiagonalGaussian", "IPAdaptedUNet",
           "IPAdapter", "ImageTextModel", "NoiseAwareClassifier", "UNet", "UNetSpec", "UNetWrapper", "attention_hooks"]
