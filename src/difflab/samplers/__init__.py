"""Samplers in sigma space and their registry (name -> function, NFE per step, order, stochastic)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .noise import SeededNoise, global_noise
from .sampling import ancestral_step, sample_ddim, sample_ddpm, sample_euler


@dataclass(frozen=True)
class SamplerInfo:
    fn: Callable
    nfe_per_step: int
    order: int
    stochastic: bool


SAMPLERS: dict[str, SamplerInfo] = {
    "euler": SamplerInfo(sample_euler, 1, 1, False),
    "ddim": SamplerInfo(sample_ddim, 1, 1, False),  # stochastic only with eta > 0
    "ddpm": SamplerInfo(sample_ddpm, 1, 1, True),
}


def get_sampler(name: str) -> Callable:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(sorted(SAMPLERS))}")
    return SAMPLERS[name].fn


__all__ = ["SAMPLERS", "SamplerInfo", "SeededNoise", "ancestral_step", "get_sampler", "global_noise",
           "sample_ddim", "sample_ddpm", "sample_euler"]
