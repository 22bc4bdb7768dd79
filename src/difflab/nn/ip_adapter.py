"""IP-Adapter (Ye et al. 2023, "IP-Adapter: Text Compatible Image Prompt Adapter for Text-to-Image
Diffusion Models"): an image prompt for a frozen text-to-image U-Net.

An image embedding (``Cond.image_prompt``, (B, E)) is projected to ``tokens`` context tokens
(linear, then LayerNorm: the paper's ``ImageProjModel``). Every cross-attention layer gets its own
key and value projections of those tokens (``kv_ip``, initialised from the layer's text ``kv``), and
its output becomes ``Attention(q, K_text, V_text) + ip_scale * Attention(q, K_ip, V_ip)`` before the
output projection: decoupled cross-attention. It is an ``AttentionHook`` (``output``), installed
on the cross-attention layers for the duration of each call, so the U-Net itself is untouched and
keeps fused attention. At ``ip_scale`` 0 the output is the base U-Net's, bit for bit.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import replace

import torch.nn.functional as F
from torch import Tensor, nn

from ..cond import Cond
from .unet import AttentionHook, UNet, UNetWrapper, attention_hooks


def _key(name: str) -> str:
    return name.replace(".", "_")  # module names may not hold dots


class IPAdapter(nn.Module, AttentionHook):
    """The image-token projection and the per-layer ``kv_ip`` of ``unet``'s cross-attention layers."""

    sees_probs = False

    def __init__(self, unet: UNet, embed_dim: int, tokens: int = 4):
        super().__init__()
        if not unet.context_dim:
            raise ValueError("IP-Adapter needs a text U-Net: it adds to the cross-attention layers (context_dim)")
        cross = {n: layer for n, layer in unet.attention_layers().items() if n.endswith(".cross")}
        self.layers = list(cross)
        self.proj = nn.Linear(embed_dim, tokens * unet.context_dim)
        self.norm = nn.LayerNorm(unet.context_dim)
        self.kv_ip = nn.ModuleDict({_key(n): copy.deepcopy(layer.kv).requires_grad_(True) for n, layer in cross.items()})
        self.tokens, self.embed_dim, self.context_dim = tokens, embed_dim, unet.context_dim
        self._image_tokens, self._scale = None, 0.0

    def image_tokens(self, embedding: Tensor) -> Tensor:
        if embedding.ndim != 2 or embedding.shape[1] != self.embed_dim:
            raise ValueError(f"the image prompt must be (B, {self.embed_dim}) image embeddings, got shape "
                             f"{tuple(embedding.shape)}")
        return self.norm(self.proj(embedding).reshape(len(embedding), self.tokens, self.context_dim))

    @contextmanager
    def prompting(self, embedding: Tensor, scale: float):
        self._image_tokens, self._scale = self.image_tokens(embedding), float(scale)
        try:
            yield
        finally:
            self._image_tokens, self._scale = None, 0.0

    def output(self, name: str, q: Tensor, out: Tensor) -> Tensor:
        b, heads, _, d = q.shape
        k, v = self.kv_ip[_key(name)](self._image_tokens.to(q.dtype)).reshape(b, -1, 2, heads, d).permute(2, 0, 3, 1, 4)
        return out + self._scale * F.scaled_dot_product_attention(q, k, v)


class IPAdaptedUNet(UNetWrapper):
    """A frozen text U-Net with an IP-Adapter: ``net(x, c_noise, cond)`` reads ``cond.image_prompt``
    (the image embeddings; zeros = no image, the unconditional input) at ``scale``."""

    def __init__(self, unet: UNet, adapter: IPAdapter, scale: float = 1.0):
        super().__init__(unet)
        self.adapter, self.scale = adapter, float(scale)

    def forward(self, x: Tensor, c_noise: Tensor, cond: Cond | None = None) -> Tensor:
        if cond is None or cond.image_prompt is None:
            raise ValueError("this model has an IP-Adapter: pass the image embedding as cond.image_prompt "
                             "(zeros for no image)")
        plain = replace(cond, image_prompt=None)
        if self.scale == 0:
            return self.unet(x, c_noise, plain)
        with self.adapter.prompting(cond.image_prompt, self.scale), \
                attention_hooks(self.unet, self.adapter, self.adapter.layers):
            return self.unet(x, c_noise, plain)
