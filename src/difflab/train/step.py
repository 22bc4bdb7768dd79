"""One training step, the only one: the trainer, the VAE trainer and the memory planner all run it.

    parts = TrainingParts.build(net, device, dist, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                precision=cfg.train.precision)
    stats = training_step(parts, loss_of, cfg, step)     # loss_of(j): micro-batch j's mean loss

A step: seed this step's dropout, zero the gradients, forward and backward each of
``train.grad_accum`` micro-batches (under autocast; DDP syncs only the last), refuse a non-finite
loss, unscale (fp16), clip, set the learning rate of the schedule, AdamW, EMA.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ..config import Config
from ..devices import DistInfo, mean_across_ranks
from ..seeds import derive_seed
from .build import adamw, autocast
from .ema import EMA, ema_decay


class NonFiniteLoss(FloatingPointError):
    """The step's loss was NaN or infinite; nothing was updated."""

    def __init__(self, value: float):
        super().__init__(f"loss became {value}")
        self.value = value


def no_phase(name: str):
    """The default ``phase`` marker: nothing (a profiler or tracker can mark ``forward_backward``)."""
    return nullcontext()


@dataclass
class TrainingParts:
    """What a step updates: the weights (``net``, and ``train_net``, its DDP wrapper under torchrun),
    the optimizer, the fp16 gradient scaler and the EMA, on ``device`` in the group ``dist``."""

    net: nn.Module
    train_net: nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: EMA
    device: torch.device
    dist: DistInfo

    @classmethod
    def build(cls, net: nn.Module, device, dist: DistInfo, *, lr: float, weight_decay: float,
              precision: str) -> TrainingParts:
        device = torch.device(device)
        ema = EMA(net)
        train_net = DistributedDataParallel(net) if dist.enabled else net
        scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
        return cls(net, train_net, adamw(net, lr, weight_decay), scaler, ema, device, dist)


def lr_at(step: int, cfg: Config) -> float:
    """Linear warm-up, then constant or cosine decay to zero at ``train.steps``."""
    t = cfg.train
    if step < t.warmup:
        return t.lr * (step + 1) / t.warmup
    if t.lr_schedule == "cosine":
        progress = (step - t.warmup) / max(1, t.steps - t.warmup)
        return t.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return t.lr


def accumulate_gradients(parts: TrainingParts, loss_of: Callable[[int], Tensor], micro_batches: int,
                         precision: str, phase=no_phase) -> Tensor:
    """Forward and backward of micro-batches ``0 .. micro_batches - 1``, each loss divided by their
    number; DDP syncs gradients on the last only. Returns the summed (mean) loss, detached."""
    total = torch.zeros((), device=parts.device)
    for j in range(micro_batches):
        sync = parts.dist.enabled and j < micro_batches - 1
        with phase("forward_backward"):
            with (parts.train_net.no_sync() if sync else nullcontext()), autocast(parts.device.type, precision):
                loss = loss_of(j) / micro_batches
            parts.scaler.scale(loss).backward()
        total += loss.detach()
        del loss
    return total


def training_step(parts: TrainingParts, loss_of: Callable[[int], Tensor], cfg: Config, step: int,
                  phase=no_phase) -> dict:
    """Step ``step`` of ``cfg.train`` (see the module docstring); returns loss, grad-norm and lr.
    Raises :class:`NonFiniteLoss` before any update when the loss is not finite."""
    t = cfg.train
    torch.manual_seed(derive_seed(t.seed, step) * 4096 + parts.dist.rank)  # dropout, per rank
    parts.net.train()
    parts.opt.zero_grad(set_to_none=True)
    total = mean_across_ranks(accumulate_gradients(parts, loss_of, t.grad_accum, t.precision, phase), parts.dist)
    if not torch.isfinite(total):
        raise NonFiniteLoss(total.item())
    with phase("optimizer"):
        parts.scaler.unscale_(parts.opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(parts.net.parameters(),
                                                   t.grad_clip if t.grad_clip > 0 else math.inf)
        lr = lr_at(step, cfg)
        for group in parts.opt.param_groups:
            group["lr"] = lr
        parts.scaler.step(parts.opt)
        parts.scaler.update()
        parts.ema.update(parts.net, ema_decay(step, t.ema_decay, t.ema_warmup))
    return {"step": step + 1, "loss": total.item(), "grad_norm": grad_norm.item(), "lr": lr}
