"""Does an image follow a layout? Edge F1 with a pixel tolerance, and mask IoU.

The scores of control benchmarks (ControlNet on edges and depth): ``edge_f1`` compares a detected
edge map with the control's, counting an edge pixel as matched when the other map has one within
``tolerance`` pixels (Chebyshev distance, as the BSDS boundary benchmark's pixel tolerance);
``mask_iou`` compares foreground masks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _within(edges: Tensor, tolerance: int) -> Tensor:
    """Pixels within ``tolerance`` (Chebyshev) of an edge pixel of ``edges`` (N, H, W) bool."""
    k = 2 * tolerance + 1
    return F.max_pool2d(edges[:, None].float(), k, stride=1, padding=tolerance)[:, 0] > 0


def _as_maps(maps: Tensor, name: str) -> Tensor:
    maps = torch.as_tensor(maps)
    if maps.ndim == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.ndim != 3:
        raise ValueError(f"{name} must be (N, H, W) or (N, 1, H, W) maps, got shape {tuple(maps.shape)}")
    return maps > 0.5 if maps.is_floating_point() else maps.bool()


def edge_f1(detected: Tensor, reference: Tensor, tolerance: int = 1) -> dict[str, Tensor]:
    """Per image: precision (share of detected edge pixels with a reference edge within
    ``tolerance``), recall (share of reference edge pixels with a detected one within it) and their
    harmonic mean F1 (0 where both are 0). Maps are (N, H, W) or (N, 1, H, W), bool or in [0, 1]."""
    detected, reference = _as_maps(detected, "detected"), _as_maps(reference, "reference")
    if detected.shape != reference.shape:
        raise ValueError(f"edge maps differ in shape: {tuple(detected.shape)} and {tuple(reference.shape)}")
    hit_d = (detected & _within(reference, tolerance)).flatten(1).sum(1).float()
    hit_r = (reference & _within(detected, tolerance)).flatten(1).sum(1).float()
    precision = hit_d / detected.flatten(1).sum(1).clamp(min=1)
    recall = hit_r / reference.flatten(1).sum(1).clamp(min=1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12), 0.0)
    return {"precision": precision, "recall": recall, "f1": f1}


def mask_iou(a: Tensor, b: Tensor) -> Tensor:
    """Per image |a & b| / |a | b| of two (N, H, W) masks (1 where both are empty)."""
    a, b = _as_maps(a, "a"), _as_maps(b, "b")
    union = (a | b).flatten(1).sum(1).float()
    inter = (a & b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), 1.0)
