"""Few-step generation: progressive distillation, consistency distillation and training, reflow
[Q31 Q32 Q42]. Rectified flow itself is a parametrisation (``denoisers.FlowDenoiser``) and a
schedule (``schedules.RectifiedFlow``) that every sampler runs."""
from __future__ import annotations

from pathlib import Path

from ..config import Config, load_config
from .consistency import ConsistencyDistillTrainer, ConsistencyTrainer, consistency_config, distance
from .progressive import ProgressiveTrainer, distill_progressive, progressive_loss, two_step_target
from .reflow import ReflowTrainer, draw_pairs, reflow_config, straightness
from .students import TEACHER_RECORD
from . import consistency, progressive, reflow

METHODS = {"progressive": progressive, "consistency": consistency, "reflow": reflow}


def distill_config(method: str, teacher, overrides: list[str] = (), out: str | None = None) -> Config:
    """The config of ``difflab distill <method> --teacher RUN`` (``reflow RUN``): the method's
    training defaults, then ``overrides``; ``out`` defaults to ``<teacher>-<method>``."""
    if method not in METHODS:
        raise ValueError(f"unknown distillation method {method!r}; expected one of {', '.join(METHODS)}")
    out = out or f"{str(teacher).rstrip('/')}-{method}"
    return load_config(None, METHODS[method].DEFAULTS + [f"distill.method={method}", f"out={out}", *overrides,
                                                         f"distill.teacher={teacher}"])


def distill(cfg: Config, resume: bool = False, progress: bool = True) -> list[Path]:
    """Run ``cfg.distill.method``; returns the student run folders (one per halving for progressive)."""
    m = cfg.distill.method
    if m == "progressive":
        return distill_progressive(cfg, resume, progress)
    if m == "consistency":
        return [ConsistencyDistillTrainer(consistency_config(cfg), resume=resume, progress=progress).fit()]
    if m == "reflow":
        return [ReflowTrainer(reflow_config(cfg), resume=resume, progress=progress).fit()]
    raise ValueError(f"distill.method must be one of {', '.join(METHODS)}, got {m!r}")


def train_consistency(cfg: Config, resume: bool = False, progress: bool = True, verify: bool = True) -> Path:
    """Consistency training from data (``diffusion.parametrization=consistency`` without a teacher)."""
    return ConsistencyTrainer(cfg, resume=resume, progress=progress, verify=verify).fit()


__all__ = ["METHODS", "TEACHER_RECORD", "ConsistencyDistillTrainer", "ConsistencyTrainer", "ProgressiveTrainer",
           "ReflowTrainer", "distance", "distill", "distill_config", "distill_progressive", "draw_pairs",
           "progressive_loss", "straightness", "train_consistency", "two_step_target"]
