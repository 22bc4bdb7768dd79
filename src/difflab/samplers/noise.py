"""Noise sources for samplers: ``noise(sigma, sigma_next) -> Tensor`` shaped like the sample."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


class SeededNoise:
    """One ``torch.Generator`` per sample, so a sample's noise is the same whatever batch it is in.

    The initial latent and every later draw come from the sample's own stream:
    ``x = noise() * sigmas[0]``, then pass ``noise=noise`` to the sampler.
    """

    def __init__(self, seeds: Sequence[int], shape: Sequence[int], *,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.generators = [torch.Generator(device).manual_seed(int(s)) for s in seeds]
        self.shape, self.dtype, self.device = tuple(shape), dtype, device

    def __call__(self, sigma=None, sigma_next=None) -> Tensor:
        return torch.stack([torch.randn(self.shape, generator=g, dtype=self.dtype, device=self.device)
                            for g in self.generators])


def global_noise(x: Tensor):
    """The default source: ``torch.randn_like`` from the global RNG."""
    return lambda sigma=None, sigma_next=None: torch.randn_like(x)
