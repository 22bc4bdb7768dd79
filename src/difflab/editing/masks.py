"""Masks for editing: 1 = keep (a known pixel), 0 = generate. Checked, resized for latents, composited."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..tensors import gaussian_blur


def check_image(image: Tensor, shape: tuple[int, int, int]) -> Tensor:
    """``image`` as a float (N, C, H, W) batch in [-1, 1] of the model's (C, H, W) ``shape``."""
    if not isinstance(image, Tensor):
        raise TypeError(f"image must be a tensor (N, C, H, W) in [-1, 1], got {type(image).__name__}")
    image = image[None] if image.ndim == 3 else image
    if image.ndim != 4 or tuple(image.shape[1:]) != tuple(shape):
        raise ValueError(f"image must be (N, {', '.join(map(str, shape))}) for this model, got {tuple(image.shape)}")
    image = image.float()
    if not torch.isfinite(image).all() or image.min() < -1 or image.max() > 1:
        raise ValueError("image values must be finite and lie in [-1, 1]")
    return image


def check_mask(mask: Tensor, image: Tensor) -> Tensor:
    """``mask`` (H, W), (N|1, 1, H, W) or (N|1, H, W) of 0/1 values (1 = keep) as a float (N, 1, H, W)
    batch for ``image`` (N, C, H, W)."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a tensor of 0 and 1 (1 = keep), got {type(mask).__name__}")
    mask = mask.float()
    mask = mask[None, None] if mask.ndim == 2 else mask[:, None] if mask.ndim == 3 else mask
    n, _, h, w = image.shape
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, n) or mask.shape[2:] != (h, w):
        raise ValueError(f"mask must be (H, W) = ({h}, {w}) like the image (or (N, 1, H, W)), got {tuple(mask.shape)}")
    if not ((mask == 0) | (mask == 1)).all():
        values = torch.unique(mask)[:5].tolist()
        raise ValueError(f"mask must be binary (1 = keep, 0 = generate), got values such as {values}")
    return mask.expand(n, 1, h, w).contiguous()


def latent_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """The mask of a latent grid of ``size``: a latent cell is known only if all its pixels are
    (min-pooling), so no generated pixel is ever taken for known."""
    h, w = mask.shape[2:]
    if h % size[0] or w % size[1]:
        raise ValueError(f"a {h}x{w} mask does not tile the {size[0]}x{size[1]} latent grid")
    return -F.max_pool2d(-mask, (h // size[0], w // size[1]))


def feathered(mask: Tensor, radius: int) -> Tensor:
    """The blending weight of the known image: 1 on every known pixel (they stay exact) and a
    Gaussian fall-off of ``radius`` pixels into the generated region."""
    if radius < 0:
        raise ValueError(f"feather radius must be >= 0, got {radius}")
    if radius == 0:
        return mask
    return torch.maximum(mask, gaussian_blur(mask, radius, 4 * radius + 1, padding_mode="replicate"))


def composite(known: Tensor, generated: Tensor, weight: Tensor) -> Tensor:
    """``weight * known + (1 - weight) * generated``; where the weight is 1, exactly the known values."""
    return torch.where(weight == 1, known, weight * known + (1 - weight) * generated)


#: what an inpainting model is trained on (Suvorov et al. 2022 and Stable Diffusion's inpainting
#: model mix boxes and strokes; a share of all-unknown masks keeps it a plain generator too)
MASK_KINDS = {"box": 0.35, "half": 0.3, "strokes": 0.25, "everything": 0.1}


def random_masks(n: int, size: tuple[int, int], generator: torch.Generator) -> Tensor:
    """``n`` training masks (n, 1, H, W), 1 = keep, drawn from ``MASK_KINDS`` with ``generator``."""
    h, w = size
    kinds = torch.multinomial(torch.tensor(list(MASK_KINDS.values())), n, replacement=True, generator=generator)
    masks = torch.ones(n, 1, h, w)
    for i, kind in enumerate(kinds.tolist()):
        draw = (_box, _half, _strokes, _everything)[kind]
        draw(masks[i, 0], generator)
    return masks


def _randint(low: int, high: int, g: torch.Generator) -> int:
    return int(torch.randint(low, high + 1, (1,), generator=g))


def _box(m: Tensor, g: torch.Generator) -> None:
    h, w = m.shape
    bh, bw = _randint(max(1, h // 4), max(1, 3 * h // 4), g), _randint(max(1, w // 4), max(1, 3 * w // 4), g)
    top, left = _randint(0, h - bh, g), _randint(0, w - bw, g)
    m[top:top + bh, left:left + bw] = 0


def _half(m: Tensor, g: torch.Generator) -> None:
    h, w = m.shape
    side = _randint(0, 3, g)
    region = [(slice(None), slice(0, w // 2)), (slice(None), slice(w // 2, None)),
              (slice(0, h // 2), slice(None)), (slice(h // 2, None), slice(None))][side]
    m[region] = 0


def _strokes(m: Tensor, g: torch.Generator) -> None:
    """1-3 random walks with a square brush of 1-2 pixels."""
    h, w = m.shape
    for _ in range(_randint(1, 3, g)):
        y, x, brush = _randint(0, h - 1, g), _randint(0, w - 1, g), _randint(1, max(1, min(h, w) // 4), g)
        for _ in range(_randint(max(2, h // 2), 2 * h, g)):
            m[max(0, y - brush + 1):y + brush, max(0, x - brush + 1):x + brush] = 0
            y = min(h - 1, max(0, y + _randint(-1, 1, g)))
            x = min(w - 1, max(0, x + _randint(-1, 1, g)))


def _everything(m: Tensor, g: torch.Generator) -> None:
    m.zero_()


def inpainting_input(image: Tensor, mask: Tensor) -> Tensor:
    """What an inpainting model is given beside its noisy input: the known image (zero where it is
    unknown) and the mask, as channels."""
    return torch.cat([image * mask, mask], 1)
