"""difflab: diffusion models in sigma space — schedules, denoisers, samplers, guidance, training."""
from . import denoisers, editing, generate, guidance, samplers, schedules
from .cond import Cond
from .generate import SamplingSettings
from .pipelines import Pipeline, load

__version__ = "0.1.0"
__all__ = ["Cond", "Pipeline", "SamplingSettings", "denoisers", "editing", "generate", "guidance", "load", "samplers",
           "schedules"]
