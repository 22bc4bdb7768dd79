"""Guidance: wrappers that take a Denoiser and return a Denoiser, so they nest and fit any sampler."""
from __future__ import annotations

import torch
from torch import Tensor

from .cond import Cond


class ClassifierFreeGuidance:
    """D = D(x | null) + scale * (D(x | cond) - D(x | null))  (Ho & Salimans 2022, Eq. 6).

    scale 0 is the unconditional model, 1 the conditional one; other scales batch
    the two calls into one forward pass. ``null_cond`` is a batch-1 Cond (e.g. the
    null class label) expanded to the batch.
    """

    def __init__(self, denoiser, scale: float, null_cond: Cond):
        self.denoiser, self.scale, self.null_cond = denoiser, float(scale), null_cond

    def __call__(self, x: Tensor, sigma: Tensor, cond: Cond | None = None) -> Tensor:
        null = self.null_cond.expand(len(x)).to(x.device)
        if cond is None or self.scale == 0:
            return self.denoiser(x, sigma, null)
        if self.scale == 1:
            return self.denoiser(x, sigma, cond)
        x0_cond, x0_null = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), cond.cat(null)).chunk(2)
        return x0_null + self.scale * (x0_cond - x0_null)
