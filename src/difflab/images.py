"""Saving image grids (layer-free helper: tensors in [-1, 1] to PNG)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .files import atomic_write


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def make_grid(x: torch.Tensor, nrow: int = 8, pad: int = 1, upscale: int = 1) -> Image.Image:
    imgs = to_uint8(x)
    n, h, w, c = imgs.shape
    ncol = min(nrow, n)
    rows = math.ceil(n / ncol)
    grid = np.zeros((rows * (h + pad) + pad, ncol * (w + pad) + pad, c), np.uint8)
    for i, im in enumerate(imgs):
        r, col = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = im
    image = Image.fromarray(grid[..., 0] if c == 1 else grid)
    if upscale > 1:
        image = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
    return image


def save_grid(x: torch.Tensor, path, nrow: int = 8, format: str = "PNG") -> Path:
    """A grid of ``x`` (``nrow`` images a row) at ``path``, in the PIL ``format`` (PNG, JPEG)."""
    if not isinstance(nrow, int) or nrow < 1:
        raise ValueError(f"nrow must be an integer >= 1, got {nrow!r}")
    if len(x) == 0:
        raise ValueError("no images to put in a grid")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    upscale = max(1, 64 // x.shape[-1])
    atomic_write(path, lambda tmp: make_grid(x, nrow, upscale=upscale).save(tmp, format=format))
    return path
