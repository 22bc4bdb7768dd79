"""Exponential moving average of weights, with the usual warm-up of the decay."""
from __future__ import annotations

import copy

import torch
from torch import nn


def ema_decay(step: int, decay: float, warmup: bool = True) -> float:
    """min(decay, (1 + step) / (10 + step)): early averages forget the random init quickly."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


class EMA:
    def __init__(self, model: nn.Module):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        ema_p = list(self.model.parameters())
        torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1 - decay)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)
