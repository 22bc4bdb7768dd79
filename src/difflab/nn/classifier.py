"""The noise-aware classifier ``p(y | x, sigma)`` of classifier guidance (Dhariwal & Nichol 2021, Sec. 4).

Trained by ``difflab.train.classifier``; steers a Denoiser through ``difflab.guidance.ClassifierGuidance``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..tensors import append_dims, batch_sigma
from .unet import CONV, Downsample, ResBlock, timestep_embedding


class NoiseAwareClassifier(nn.Module):
    """``p(y | x, sigma)``: the U-Net's down path with a pooled linear head (ADM's encoder classifier).

    Conv in; per level ``num_res_blocks`` ResBlocks fed the noise embedding and a
    strided-conv downsample between levels; GroupNorm, SiLU, global average pool,
    linear to ``num_classes`` logits (Dhariwal & Nichol 2021, Sec. 4 / App. C).

    Preconditioned as EDM (Karras et al. 2022, Table 1): the network sees
    ``c_in x`` with ``c_in = 1/sqrt(sigma^2 + sigma_data^2)`` (unit variance at
    every noise level) and ``c_noise = ln(sigma)/4``. Both depend on sigma
    alone, so one classifier serves any schedule in sigma space (VP, VE, EDM).

    Args:
        in_channels: data channels.
        num_classes: number of logits.
        channels: width of the first level; level i has ``channels * channel_mult[i]``.
        num_res_blocks: ResBlocks per level.
        sigma_data: data standard deviation assumed by the input scaling.
        groups: GroupNorm groups.
        dims: 1, 2 or 3 spatial dimensions.
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int = 32,
                 channel_mult: Sequence[int] = (1, 2), num_res_blocks: int = 1, sigma_data: float = 0.5,
                 groups: int = 8, dropout: float = 0.0, dims: int = 2):
        super().__init__()
        if dims not in CONV:
            raise ValueError(f"dims must be 1, 2 or 3, got {dims}")
        if num_classes < 2:
            raise ValueError(f"a classifier needs num_classes >= 2, got {num_classes}")
        self.config = {"in_channels": in_channels, "num_classes": num_classes, "channels": channels,
                       "channel_mult": list(channel_mult), "num_res_blocks": num_res_blocks,
                       "sigma_data": sigma_data, "groups": groups, "dropout": dropout, "dims": dims}
        self.in_channels, self.num_classes, self.dims = in_channels, num_classes, dims
        self.channels, self.sigma_data = channels, sigma_data
        emb_dim = 4 * channels
        self.time_mlp = nn.Sequential(nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = CONV[dims](in_channels, channels, 3, padding=1)
        self.blocks = nn.ModuleList()
        c = channels
        widths = [channels * m for m in channel_mult]
        for level, w in enumerate(widths):
            for _ in range(num_res_blocks):
                self.blocks.append(ResBlock(dims, c, w, emb_dim, groups, dropout, scale_shift=True))
                c = w
            if level < len(widths) - 1:
                self.blocks.append(Downsample(dims, c))
        self.norm_out = nn.GroupNorm(groups, c)
        self.head = nn.Linear(c, num_classes)

    def check_input(self, x: Tensor) -> None:
        if x.ndim != self.dims + 2 or x.shape[1] != self.in_channels:
            expected = f"(B, {self.in_channels}, " + ", ".join(["S"] * self.dims) + ")"
            raise ValueError(f"NoiseAwareClassifier expects input of shape {expected}, got {tuple(x.shape)}")

    def forward(self, x: Tensor, sigma) -> Tensor:
        """Logits of ``p(y | x, sigma)`` for a sigma-space input ``x = x0 + sigma n``; sigma scalar or (B,)."""
        self.check_input(x)
        sigma = batch_sigma(x, sigma)
        dtype = self.conv_in.weight.dtype
        c_in = append_dims((sigma**2 + self.sigma_data**2).rsqrt(), x.ndim).to(dtype)
        c_noise = (sigma.log() / 4).to(torch.float32)
        emb = F.silu(self.time_mlp(timestep_embedding(c_noise, self.channels).to(dtype)))
        h = self.conv_in(x.to(dtype) * c_in)
        for block in self.blocks:
            h = block(h, emb)
        h = F.silu(self.norm_out(h)).mean(dim=tuple(range(2, h.ndim)))
        return self.head(h)
