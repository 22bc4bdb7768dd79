"""Analytic denoisers for testing samplers without training anything.

A Gaussian mixture p(x0) = sum_k w_k N(mu_k, s_k^2 I) stays a mixture under
x = x0 + sigma n, so its exact posterior mean D(x, sigma) = E[x0 | x] (hence
the exact probability-flow ODE) and exact samples are available in closed form.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .schedules import EDM, NoiseSchedule


class GaussianMixture:
    """An isotropic Gaussian mixture in any dimension, usable as a Denoiser: ``gm(x, sigma) -> x0_hat``.

    Args:
        means: (K, *shape) component means.
        stds: (K,) component standard deviations.
        weights: (K,) mixture weights (normalised here); uniform by default.
        schedule: the NoiseSchedule samplers should take grids from (EDM by default).
    """

    def __init__(self, means, stds, weights=None, schedule: NoiseSchedule | None = None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.stds = torch.as_tensor(stds, dtype=torch.float64).reshape(-1)
        k = len(self.means)
        w = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if len(self.stds) != k or len(w) != k or (w < 0).any():
            raise ValueError(f"need K means, K stds and K non-negative weights; got {k}, {len(self.stds)}, {len(w)}")
        self.log_weights = (w / w.sum()).log()
        self.shape = tuple(self.means.shape[1:])
        self.schedule = schedule or EDM()

    @classmethod
    def default(cls, dim: int = 2) -> "GaussianMixture":
        """Four well-separated components in ``dim`` dimensions, unequal weights and widths."""
        g = torch.Generator().manual_seed(0)
        means = torch.randn(4, dim, generator=g, dtype=torch.float64) * 2
        return cls(means, [0.3, 0.5, 0.2, 0.4], [0.1, 0.2, 0.3, 0.4])

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        z = torch.randn((n, *self.shape), generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k].reshape(-1, *[1] * len(self.shape)) * z

    def posterior(self, x: Tensor, sigma) -> Tensor:
        """p(k | x_sigma), shape (B, K)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1).expand(len(x), 1)
        var = self.stds**2 + sigma**2  # (B, K)
        d = x.reshape(len(x), 1, -1).double() - self.means.reshape(1, len(self.means), -1)
        dim = d.shape[-1]
        log_p = self.log_weights - 0.5 * (d**2).sum(-1) / var - 0.5 * dim * (var.log() + math.log(2 * math.pi))
        return log_p.softmax(-1)

    def __call__(self, x: Tensor, sigma, cond=None) -> Tensor:
        sigma_b = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1).expand(len(x), 1)
        flat = x.reshape(len(x), -1).double()
        shrink = self.stds**2 / (self.stds**2 + sigma_b**2)  # (B, K)
        mu = self.means.reshape(1, len(self.means), -1)
        x0_k = mu + shrink[..., None] * (flat[:, None] - mu)  # (B, K, D)
        x0 = (self.posterior(x, sigma_b)[..., None] * x0_k).sum(1)
        return x0.reshape(x.shape).to(x.dtype)
