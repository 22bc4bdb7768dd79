"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models").

A trainable copy of a frozen U-Net's encoder and middle reads the noisy input, the noise level,
the text and a hint image (edges, depth); zero-initialised 1x1 convolutions turn the copy's skips
and middle into residuals that the frozen U-Net adds to its own (``Cond.residuals``). A hint
encoder (a small conv stack ending in a zero-initialised convolution, the paper's Sec. 3.2) brings
the hint from image resolution to the U-Net's input grid (the latent grid of a latent model) and
joins the copy's first convolution. Every zero initialisation makes the controlled model start as
the base model exactly.

    control = ControlNet(unet, hint_channels=1, hint_factor=4)   # 32x32 edges -> 8x8 latents
    net = ControlledUNet(unet, control, scale=1.0)                # net(x, c_noise, Cond(..., control=hint))
"""
from __future__ import annotations

import copy
import math
from dataclasses import replace
from typing import Sequence

from torch import Tensor, nn

from ..cond import Cond
from .unet import Downsample, UNet, UNetWrapper, block_runner

HINT_WIDTH = 16  # channels of the hint encoder's first convolutions (the paper's is 16, then 32, 96, 256)


def zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class HintEncoder(nn.Module):
    """Conv-SiLU stack from the hint at image resolution to the U-Net's first width at its input grid:
    one stride-2 convolution (doubling the width) per factor of 2 of ``factor``, then a zero conv."""

    def __init__(self, hint_channels: int, out_channels: int, factor: int = 1):
        super().__init__()
        if factor < 1 or factor & (factor - 1):
            raise ValueError(f"the hint's downsampling factor must be a power of 2, got {factor}")
        c, layers = HINT_WIDTH, [nn.Conv2d(hint_channels, HINT_WIDTH, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(HINT_WIDTH, HINT_WIDTH, 3, padding=1), nn.SiLU()]
        for _ in range(int(math.log2(factor))):
            layers += [nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.SiLU()]
            c *= 2
        self.body = nn.Sequential(*layers)
        self.out = zero_module(nn.Conv2d(c, out_channels, 3, padding=1))
        self.hint_channels, self.factor = hint_channels, factor

    def forward(self, hint: Tensor) -> Tensor:
        return self.out(self.body(hint))


class ControlNet(nn.Module):
    """The trainable copy of ``unet``'s encoder and middle (initialised from it), a hint encoder and
    the zero convolutions: ``controlnet(x, c_noise, cond)`` -> residuals, one per skip of the U-Net,
    then one for its middle. ``cond.control`` holds the hint, (B, hint_channels, H * factor, W * factor)
    for an (H, W) input grid."""

    def __init__(self, unet: UNet, hint_channels: int, hint_factor: int = 1):
        super().__init__()
        if unet.dims != 2:
            raise ValueError(f"ControlNet takes 2-D U-Nets, got dims={unet.dims}")
        encoder = copy.deepcopy(unet)
        del encoder.up, encoder.norm_out, encoder.conv_out  # the copy is the encoder and middle only
        self.encoder = encoder.requires_grad_(True)
        self.hint = HintEncoder(hint_channels, unet.channels, hint_factor)
        self.zero_convs = nn.ModuleList(zero_module(nn.Conv2d(c, c, 1)) for c in unet.skip_channels())
        middle = unet.mid[-1].res.conv2.out_channels
        self.mid_out = zero_module(nn.Conv2d(middle, middle, 1))
        self.levels = _skip_levels(unet)

    def check_hint(self, x: Tensor, hint: Tensor | None) -> Tensor:
        f, c = self.hint.factor, self.hint.hint_channels
        want = (len(x), c, x.shape[2] * f, x.shape[3] * f)
        if hint is None:
            raise ValueError(f"this model has a ControlNet: pass its hint as cond.control, shape {want}")
        if tuple(hint.shape) != want:
            raise ValueError(f"the control image must be {c} channel(s) of {want[2]}x{want[3]} pixels "
                             f"(batch {want[0]}), got shape {tuple(hint.shape)}")
        return hint.to(x.dtype)

    def forward(self, x: Tensor, c_noise: Tensor, cond: Cond | None) -> tuple[Tensor, ...]:
        hint = self.check_hint(x, None if cond is None else cond.control)
        enc = self.encoder
        emb = UNet.embedding(enc, c_noise, cond, len(x))
        hs, h = UNet.encode(enc, x, emb, cond, block_runner(self, enc.checkpointing), added=self.hint(hint))
        return tuple(conv(s) for conv, s in zip(self.zero_convs, hs)) + (self.mid_out(h),)


def _skip_levels(unet: UNet) -> list[int]:
    """The resolution level (0 = the input grid) of each skip: a Downsample starts the next level."""
    levels, level = [0], 0
    for layer in unet.down:
        level += isinstance(layer, Downsample)
        levels.append(level)
    return levels


class ControlledUNet(UNetWrapper):
    """A frozen U-Net under a ControlNet: ``net(x, c_noise, cond)`` adds the ControlNet's residuals,
    times ``scale``, to the U-Net's skips and middle. ``scale`` is one number or one per resolution
    level followed by one for the middle (``len(channel_mult) + 1`` entries); at 0 the ControlNet is
    not run and the output is the base U-Net's, bit for bit."""

    def __init__(self, unet: UNet, controlnet: ControlNet, scale: float | Sequence[float] = 1.0):
        super().__init__(unet)
        self.controlnet = controlnet
        skip_levels = getattr(controlnet, "module", controlnet).levels  # in training DDP may wrap it
        levels = max(skip_levels) + 1
        scales = [float(scale)] * (levels + 1) if isinstance(scale, (int, float)) else [float(s) for s in scale]
        if len(scales) != levels + 1:
            raise ValueError(f"control_scale must be one number or {levels + 1} (one per level, then the middle), "
                             f"got {len(scales)}")
        self.scales = [scales[level] for level in skip_levels] + [scales[-1]]

    def forward(self, x: Tensor, c_noise: Tensor, cond: Cond | None = None) -> Tensor:
        if cond is None or not any(self.scales):
            return self.unet(x, c_noise, None if cond is None else replace(cond, control=None))
        residuals = tuple(r * s for r, s in zip(self.controlnet(x, c_noise, cond), self.scales))
        return self.unet(x, c_noise, replace(cond, control=None, residuals=residuals))
