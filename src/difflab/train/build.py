"""Config -> network, schedule and denoiser (shared by the trainer and the pipelines)."""
from __future__ import annotations

from .. import denoisers, schedules
from ..config import Config
from ..nn import UNet


def build_unet(cfg: Config, conditioner=None) -> UNet:
    """The U-Net of ``cfg``; ``conditioner`` (``difflab.conditioning``) adds a label embedding or
    cross-attention to text, or None for an unconditional model."""
    m = cfg.model
    return UNet(in_channels=cfg.data.channels, channels=m.channels, channel_mult=tuple(m.channel_mult),
                num_res_blocks=m.num_res_blocks, attn_levels=tuple(m.attn_levels), mid_attn=m.mid_attn,
                head_dim=m.head_dim, dropout=m.dropout, groups=m.groups, scale_shift=m.scale_shift,
                transformer_depth=m.transformer_depth, **(conditioner.unet_kwargs() if conditioner else {}))


def build_schedule(cfg: Config) -> schedules.NoiseSchedule:
    d = cfg.diffusion
    return schedules.build(d.schedule, d.timesteps, d.zero_terminal_snr)


def build_denoiser(cfg: Config, net) -> denoisers.Denoiser:
    d = cfg.diffusion
    return denoisers.build(d.parametrization, net, build_schedule(cfg), d.sigma_data)
