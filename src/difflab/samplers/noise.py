"""Noise sources for samplers: ``noise(sigma, sigma_next) -> Tensor`` shaped like the sample."""
from __future__ import annotations

import warnings
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


class BrownianNoise:
    """Brownian-tree noise (torchsde), one tree per sample seed.

    The draw for a step (sigma, sigma_next) is the Brownian increment over that
    interval, normalised, as k-diffusion's ``BrownianTreeNoiseSampler`` returns
    it: SDE samplers then converge as steps are refined, and a sample's noise
    does not depend on its batch.
    """

    def __init__(self, seeds: Sequence[int], shape: Sequence[int], sigma_min: float, sigma_max: float, *,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        import torchsde  # only the SDE samplers' Brownian trees need it (and it imports scipy)

        w0 = torch.zeros(tuple(shape), dtype=dtype, device=device)
        self.trees = [torchsde.BrownianTree(float(sigma_min), w0, float(sigma_max), entropy=int(s)) for s in seeds]

    def __call__(self, sigma, sigma_next) -> Tensor:
        sigma, sigma_next = float(sigma), float(sigma_next)
        lo, hi = min(sigma, sigma_next), max(sigma, sigma_next)
        sign = -1.0 if sigma > sigma_next else 1.0  # as k-diffusion, so seeds reproduce its samples
        with warnings.catch_warnings():
            # torchsde rounds the tree's ends, then warns that a query at exactly sigma_min lies outside
            warnings.filterwarnings("ignore", message="Should have ta>=t0")
            return sign * torch.stack([tree(lo, hi) for tree in self.trees]) / (hi - lo) ** 0.5
