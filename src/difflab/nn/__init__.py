"""Networks: tensors in, tensors out. They know nothing of schedules, samplers or configs."""
from .unet import UNet

__all__ = ["UNet"]
