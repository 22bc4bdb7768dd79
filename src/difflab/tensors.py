"""Shape helpers that every layer uses (imports nothing from difflab): per-sample scalars against a batch."""
from __future__ import annotations

import torch
from torch import Tensor


def append_dims(t: Tensor, ndim: int) -> Tensor:
    """``t`` with trailing singleton dimensions up to ``ndim`` (a (B,) scale against (B, C, H, W))."""
    return t.reshape(t.shape + (1,) * (ndim - t.ndim))


def batch_sigma(x: Tensor, sigma) -> Tensor:
    """``sigma`` (scalar or (B,)) as a (B,) float64 tensor on x's device."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(len(x))
    if sigma.shape != (len(x),):
        raise ValueError(f"sigma must be a scalar or have shape ({len(x)},), got {tuple(sigma.shape)}")
    return sigma
