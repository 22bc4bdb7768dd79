"""The one conditioning value that travels from data to network.

A ``Cond`` holds optional, batch-first tensors: class labels; text context
(per-token embeddings, their mask and a pooled vector); images concatenated to
the network input (an inpainting model's masked image and mask); a ControlNet's hint image and the
residuals it computes from it; an IP-Adapter's image embedding. Samplers and guidance treat it as
an opaque batch: they only concatenate, index and expand it.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor


SEQUENCE_FIELDS = ("context", "context_mask")  # (B, L, ...): padded along L when lengths differ


@dataclass(frozen=True)
class Cond:
    labels: Tensor | None = None        # (B,) int64; the null label is the network's num_classes
    context: Tensor | None = None       # (B, L, D) text token embeddings, cross-attended by the network
    context_mask: Tensor | None = None  # (B, L) bool, True = a real token (padding is never attended)
    pooled: Tensor | None = None        # (B, P) pooled text embedding, added to the noise embedding
    image: Tensor | None = None         # (B, C', *S) concatenated to the network input (inpainting: masked image, mask)
    control: Tensor | None = None       # (B, C_hint, H, W) a ControlNet's hint (edges, depth) at image resolution
    residuals: tuple[Tensor, ...] | None = None  # a ControlNet's additions to the U-Net's skips, then its middle
    image_prompt: Tensor | None = None  # (B, E) an IP-Adapter's image embeddings (zeros: no image)

    @classmethod
    def from_text(cls, embedding) -> "Cond":
        """From a ``difflab.text.TextEmbedding`` (tokens, mask, pooled)."""
        return cls(context=embedding.tokens, context_mask=embedding.mask, pooled=embedding.pooled)

    def _map(self, fn) -> "Cond":
        return replace(self, **{f.name: _each(fn, getattr(self, f.name)) for f in fields(self)
                                if getattr(self, f.name) is not None})

    def cat(self, other: "Cond") -> "Cond":
        """Batch-concatenate with another Cond that has the same fields set."""
        for f in fields(self):
            if (getattr(self, f.name) is None) != (getattr(other, f.name) is None):
                raise ValueError(f"cannot concatenate Conds: field {f.name!r} is set in only one of them")
        if self.context is not None and self.context_mask is None and self.context.shape[1] != other.context.shape[1]:
            raise ValueError("cannot pad text contexts of different lengths without a context_mask "
                             "(the padding would be attended)")
        return replace(self, **{f.name: _cat(f.name, getattr(self, f.name), getattr(other, f.name))
                                for f in fields(self) if getattr(self, f.name) is not None})

    def __getitem__(self, index) -> "Cond":
        return self._map(lambda t: t[index])

    def __len__(self) -> int:
        """The batch size (0 for an empty Cond)."""
        first = next((getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None), None)
        return 0 if first is None else len(first[0] if isinstance(first, tuple) else first)

    def expand(self, batch: int) -> "Cond":
        """Repeat a batch-1 Cond to ``batch`` rows (e.g. a null condition); a ``batch``-row one is kept."""
        if len(self) not in (1, batch):
            raise ValueError(f"cannot expand a Cond of {len(self)} rows to {batch} rows (give 1 row or {batch})")
        return self._map(lambda t: t.expand(batch, *t.shape[1:]) if len(t) == 1 else t)

    def trim_padding(self) -> "Cond":
        """Drop the trailing token positions that no row attends to (keeping at least one).

        A table of embeddings is padded to its longest caption; a batch drawn from it rarely
        holds that caption, and masked positions cost cross-attention compute for nothing.
        The network's output is unchanged (padding has zero attention weight)."""
        if self.context_mask is None:
            return self
        used = self.context_mask.any(0).nonzero()
        length = max(int(used.max()) + 1 if len(used) else 0, 1)
        if length == self.context_mask.shape[1]:
            return self
        return replace(self, context=self.context[:, :length], context_mask=self.context_mask[:, :length])

    def to(self, device) -> "Cond":
        return self._map(lambda t: t.to(device))


def _each(fn, value):
    """``fn`` of a tensor field, or of each tensor of a tuple field (the residuals)."""
    return tuple(fn(t) for t in value) if isinstance(value, tuple) else fn(value)


def _cat(name: str, a, b):
    """Concatenate along the batch; token sequences of different lengths are zero/False-padded first."""
    if isinstance(a, tuple):
        return tuple(torch.cat([x, y]) for x, y in zip(a, b, strict=True))
    if name in SEQUENCE_FIELDS and a.shape[1] != b.shape[1]:
        length = max(a.shape[1], b.shape[1])
        a, b = (torch.cat([t, t.new_zeros(len(t), length - t.shape[1], *t.shape[2:])], 1) for t in (a, b))
    return torch.cat([a, b])
