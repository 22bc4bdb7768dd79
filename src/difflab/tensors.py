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


def gaussian_blur(x: Tensor, sigma: float, kernel_size: int | None = None, padding_mode: str = "reflect") -> Tensor:
    """A separable Gaussian blur of (B, C, H, W) ``x`` (kernel ``kernel_size``, 4 sigma + 1 by default;
    borders padded by ``padding_mode``, falling back to replicate where reflect has too few pixels)."""
    size = kernel_size or 2 * round(2 * sigma) + 1
    r = size // 2
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = (kernel / kernel.sum()).repeat(x.shape[1], 1, 1, 1)
    mode = padding_mode if padding_mode != "reflect" or min(x.shape[2:]) > r else "replicate"
    x = torch.nn.functional.pad(x, [r, r, r, r], mode=mode)
    x = torch.nn.functional.conv2d(x, kernel.view(-1, 1, 1, size), groups=x.shape[1])
    return torch.nn.functional.conv2d(x, kernel.view(-1, 1, size, 1), groups=x.shape[1])
