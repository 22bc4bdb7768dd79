"""Image files (layer-free helper): tensors in [-1, 1] to PNG grids and images, and image and mask files back."""
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


def _open(path, what: str) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {path} does not exist")
    try:
        image = Image.open(path)
        image.load()
    except (OSError, Image.DecompressionBombError) as err:
        raise ValueError(f"{what} {path}: not a readable image ({' '.join(str(err).split())})") from None
    return image


BANDS = {1: ("L",), 3: ("RGB",)}


def load_image(path, channels: int, size: int) -> torch.Tensor:
    """The image file ``path`` as a (1, channels, size, size) tensor in [-1, 1]; another channel
    count or size is an error (nothing is converted or resized behind the caller's back)."""
    image = _open(path, "image")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode not in BANDS.get(channels, ()):
        raise ValueError(f"image {path}: expected {channels} channel(s) ({'grayscale' if channels == 1 else 'RGB'}) "
                         f"for this model, got mode {image.mode} ({len(image.getbands())} channel(s))")
    if image.size != (size, size):
        raise ValueError(f"image {path}: expected {size}x{size} pixels for this model, got {image.width}x{image.height}")
    x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()) / 127.5 - 1
    return (x[None] if x.ndim == 2 else x.permute(2, 0, 1))[None]


def load_picture(path) -> torch.Tensor:
    """Any image file, converted to RGB, as a (1, 3, H, W) tensor in [-1, 1] at its own size (an image
    prompt: the image encoder resizes it)."""
    image = _open(path, "image").convert("RGB")
    return torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)[None] / 127.5 - 1


def load_mask(path, size: int) -> torch.Tensor:
    """A mask file (grayscale, white = keep, black = generate) as a (1, 1, size, size) tensor of 0/1."""
    image = _open(path, "mask")
    if image.mode not in ("L", "1"):
        raise ValueError(f"mask {path}: expected a grayscale image (white = keep, black = generate), got mode {image.mode}")
    values = np.asarray(image.convert("L"))
    if image.size != (size, size):
        raise ValueError(f"mask {path}: expected {size}x{size} pixels like the image, got {image.width}x{image.height}")
    found = np.unique(values)
    if not set(found.tolist()) <= {0, 255}:
        raise ValueError(f"mask {path}: expected only black (0) and white (255), got values such as "
                         f"{found[(found != 0) & (found != 255)][:5].tolist()}")
    return torch.from_numpy(values == 255).float()[None, None]

