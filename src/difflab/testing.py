"""Analytic denoisers for testing samplers without training anything.

A Gaussian mixture p(x0) = sum_k w_k N(mu_k, diag(s_k^2)) stays a mixture under
x = x0 + sigma n, so its exact posterior mean D(x, sigma) = E[x0 | x] (hence
the exact probability-flow ODE) and exact samples are available in closed form.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .schedules import EDM, NoiseSchedule


class GaussianMixture:
    """A Gaussian mixture with isotropic or diagonal components, usable as a Denoiser: ``gm(x, sigma) -> x0_hat``.

    Args:
        means: (K, *shape) component means.
        stds: (K,) per-component standard deviations (isotropic), or (K, *shape) per-dimension ones.
        weights: (K,) mixture weights (normalised here); uniform by default.
        schedule: the NoiseSchedule samplers should take grids from (EDM by default).
    """

    def __init__(self, means, stds, weights=None, schedule: NoiseSchedule | None = None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.stds = torch.as_tensor(stds, dtype=torch.float64)
        k = len(self.means)
        w = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if self.stds.shape not in ((k,), self.means.shape) or len(w) != k or (w < 0).any():
            raise ValueError(f"need means (K, *shape), stds (K,) or (K, *shape) and K non-negative weights; got "
                             f"{tuple(self.means.shape)}, {tuple(self.stds.shape)}, {tuple(w.shape)}")
        self.log_weights = (w / w.sum()).log()
        self.shape = tuple(self.means.shape[1:])
        self.schedule = schedule or EDM()
        self._mu = self.means.reshape(k, -1)
        self._var = (self.stds.reshape(k, -1) ** 2).expand_as(self._mu)  # (K, D)

    @classmethod
    def default(cls, dim: int = 2) -> "GaussianMixture":
        """Four well-separated components in ``dim`` dimensions, unequal weights and widths."""
        g = torch.Generator().manual_seed(0)
        means = torch.randn(4, dim, generator=g, dtype=torch.float64) * 2
        return cls(means, [0.3, 0.5, 0.2, 0.4], [0.1, 0.2, 0.3, 0.4])

    @classmethod
    def spectral(cls, dim: int = 64, components: int = 1, scale: float = 0.5) -> "GaussianMixture":
        """An image-like Gaussian (mixture): per-dimension std ``scale / f`` for frequency f = 1..dim.

        Natural images have a power spectrum near 1/f^2 (van der Schaaf & van Hateren 1996), so
        each noise level erases a different band of "frequencies" (Dieleman 2024, "Diffusion is
        spectral autoregression"). Unlike well-separated isotropic blobs, whose probability-flow
        ODE is stiff wherever the posterior over components switches, this spreads the work over
        the whole sigma range, as image models do. Means (for K > 1) follow the same spectrum.
        """
        f = torch.arange(1, dim + 1, dtype=torch.float64)
        g = torch.Generator().manual_seed(0)
        means = torch.randn(components, dim, generator=g, dtype=torch.float64) * scale / f
        if components == 1:
            means.zero_()
        return cls(means, (scale / f).expand(components, dim))

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        z = torch.randn((n, *self.shape), generator=generator, dtype=torch.float64)
        return (self._mu[k] + self._var[k].sqrt() * z.reshape(n, -1)).reshape(n, *self.shape)

    def _noisy_var(self, x: Tensor, sigma) -> Tensor:
        """Per-component, per-dimension variance of x_sigma: s_k^2 + sigma^2, shape (B, K, D)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1).expand(len(x), 1, 1)
        return self._var + sigma**2

    def posterior(self, x: Tensor, sigma) -> Tensor:
        """p(k | x_sigma), shape (B, K)."""
        var = self._noisy_var(x, sigma)
        d = x.reshape(len(x), 1, -1).double() - self._mu
        log_p = self.log_weights - 0.5 * ((d**2 / var) + var.log() + math.log(2 * math.pi)).sum(-1)
        return log_p.softmax(-1)

    def __call__(self, x: Tensor, sigma, cond=None) -> Tensor:
        var = self._noisy_var(x, sigma)
        flat = x.reshape(len(x), 1, -1).double()
        x0_k = self._mu + self._var / var * (flat - self._mu)  # (B, K, D): each component's posterior mean
        x0 = (self.posterior(x, sigma)[..., None] * x0_k).sum(1)
        return x0.reshape(x.shape).to(x.dtype)
