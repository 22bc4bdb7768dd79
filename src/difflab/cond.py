"""The one conditioning value that travels from data to network.

A ``Cond`` holds optional, batch-first tensors (class labels today; text
context, concat images, control residuals later). Samplers and guidance treat
it as an opaque batch: they only concatenate, index and expand it.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class Cond:
    labels: Tensor | None = None  # (B,) int64; the null label is the network's num_classes

    def _map(self, fn) -> "Cond":
        return replace(self, **{f.name: fn(getattr(self, f.name)) for f in fields(self)
                                if getattr(self, f.name) is not None})

    def cat(self, other: "Cond") -> "Cond":
        """Batch-concatenate with another Cond that has the same fields set."""
        for f in fields(self):
            if (getattr(self, f.name) is None) != (getattr(other, f.name) is None):
                raise ValueError(f"cannot concatenate Conds: field {f.name!r} is set in only one of them")
        return replace(self, **{f.name: torch.cat([getattr(self, f.name), getattr(other, f.name)])
                                for f in fields(self) if getattr(self, f.name) is not None})

    def __getitem__(self, index) -> "Cond":
        return self._map(lambda t: t[index])

    def expand(self, batch: int) -> "Cond":
        """Repeat a batch-1 Cond to ``batch`` rows (e.g. a null condition)."""
        return self._map(lambda t: t.expand(batch, *t.shape[1:]) if len(t) == 1 else t)

    def to(self, device) -> "Cond":
        return self._map(lambda t: t.to(device))
