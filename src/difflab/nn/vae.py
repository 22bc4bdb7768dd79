"""A KL-regularised convolutional autoencoder for latent diffusion (Rombach et al. 2022, Sec. 3, App. G).

The encoder maps an image to a diagonal Gaussian posterior q(z|x) over a latent that is
``2^(len(channel_mult)-1)`` times smaller per side (Kingma & Welling 2014); the decoder maps a
latent back to the image. Layout as LDM's ``AutoencoderKL``: conv in; per level ResBlocks
(GroupNorm, SiLU, conv; no time embedding) and a strided-conv downsample; a ResBlock-attention-
ResBlock middle; GroupNorm, SiLU, conv to ``2 * latent_channels`` and a 1x1 "quant" conv to
(mean, logvar). The decoder mirrors it with one more ResBlock per level and nearest-upsample + conv.

Training uses only a reconstruction loss and a tiny KL weight (LDM's "KL-reg"); the adversarial
and perceptual terms of LDM's first stage are not built here. The diffusion model works on
``z * scaling_factor`` (so that the latents have unit variance) and decodes ``z / scaling_factor``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from .unet import Downsample, SelfAttention, Upsample, block_runner

LOGVAR_RANGE = (-30.0, 20.0)  # LDM's clamp: keeps exp(logvar) finite in float32 at init and in training


class DiagonalGaussian:
    """N(mean, diag(exp(logvar))) over latents (B, C, H, W); logvar clamped to [-30, 20] as in LDM."""

    def __init__(self, mean: Tensor, logvar: Tensor):
        if mean.shape != logvar.shape:
            raise ValueError(f"mean and logvar must have one shape, got {tuple(mean.shape)} and {tuple(logvar.shape)}")
        self.mean = mean
        self.logvar = logvar.clamp(*LOGVAR_RANGE)

    @property
    def var(self) -> Tensor:
        return self.logvar.exp()

    @property
    def std(self) -> Tensor:
        return (0.5 * self.logvar).exp()

    def sample(self, generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
        """Reparameterised sample mean + std * eps (Kingma & Welling 2014, Sec. 2.4); gradients reach both.
        ``noise`` is eps (else drawn from ``generator``)."""
        if noise is None:
            noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        elif noise.shape != self.mean.shape:
            raise ValueError(f"noise must have the latent shape {tuple(self.mean.shape)}, got {tuple(noise.shape)}")
        return self.mean + self.std * noise

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per sample, summed over latent dims: 0.5 * sum(mean^2 + var - 1 - logvar)."""
        return 0.5 * (self.mean**2 + self.var - 1.0 - self.logvar).flatten(1).sum(1)


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv, GroupNorm, SiLU, conv, plus a (1x1 when widths differ) skip; no time embedding."""

    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


def _mid(c: int, groups: int, attn: bool) -> list[nn.Module]:
    """ResBlock, single-head self-attention (LDM uses one head), ResBlock."""
    return [ResBlock(c, c, groups), *([SelfAttention(c, c, groups)] if attn else []), ResBlock(c, c, groups)]


class AutoencoderKL(nn.Module):
    """KL autoencoder (Rombach et al. 2022, App. G): ``encode(x) -> DiagonalGaussian``, ``decode(z) -> x_hat``.

    Args:
        in_channels: image channels.
        latent_channels: channels of z.
        channels: width of the first level; level i has ``channels * channel_mult[i]``.
        channel_mult: per-level width multipliers; the downsampling factor is ``2^(len - 1)``.
        num_res_blocks: ResBlocks per encoder level (the decoder has one more).
        groups: GroupNorm groups (must divide every width).
        mid_attn: self-attention in the middle blocks.
        checkpointing: in training, recompute each block's activations in backward
            (``torch.utils.checkpoint``, non-reentrant) to trade compute for memory.
        scaling_factor: multiplies latents before diffusion; a persistent buffer so it is saved
            with the weights. None (NaN) until set, e.g. by ``estimate_scaling_factor``: ``to_latent``
            and ``from_latent`` refuse to run without it rather than silently use 1.
    """

    def __init__(self, in_channels: int = 3, latent_channels: int = 4, channels: int = 64,
                 channel_mult: Sequence[int] = (1, 2, 4), num_res_blocks: int = 1, groups: int = 32,
                 mid_attn: bool = True, checkpointing: bool = False, scaling_factor: float | None = None):
        super().__init__()
        if not channel_mult:
            raise ValueError("channel_mult must name at least one level, got an empty sequence")
        widths = [channels * m for m in channel_mult]
        if any(w % groups for w in widths):
            raise ValueError(f"groups={groups} must divide every level width, got widths {widths}")
        self.in_channels, self.latent_channels = in_channels, latent_channels
        self.downsampling = 2 ** (len(channel_mult) - 1)
        self.checkpointing = checkpointing
        factor = float("nan") if scaling_factor is None else float(scaling_factor)
        self.register_buffer("scaling_factor", torch.tensor(factor), persistent=True)

        self.enc_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.encoder = nn.ModuleList()
        c = channels
        for level, w in enumerate(widths):
            for _ in range(num_res_blocks):
                self.encoder.append(ResBlock(c, w, groups))
                c = w
            if level < len(widths) - 1:
                self.encoder.append(Downsample(2, c))
        self.encoder.extend(_mid(c, groups, mid_attn))
        self.enc_norm = nn.GroupNorm(groups, c)
        self.enc_out = nn.Conv2d(c, 2 * latent_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)

        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        self.dec_in = nn.Conv2d(latent_channels, c, 3, padding=1)
        self.decoder = nn.ModuleList(_mid(c, groups, mid_attn))
        for level, w in reversed(list(enumerate(widths))):
            for _ in range(num_res_blocks + 1):
                self.decoder.append(ResBlock(c, w, groups))
                c = w
            if level > 0:
                self.decoder.append(Upsample(2, c))
        self.dec_norm = nn.GroupNorm(groups, c)
        self.dec_out = nn.Conv2d(c, in_channels, 3, padding=1)

    def _run(self, blocks: nn.ModuleList, h: Tensor) -> Tensor:
        run = block_runner(self, self.checkpointing)
        for block in blocks:
            h = run(block, h)
        return h

    def check_input(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"AutoencoderKL.encode expects (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if any(s % self.downsampling for s in x.shape[2:]):
            raise ValueError(f"AutoencoderKL input sizes must be divisible by {self.downsampling} "
                             f"(the downsampling factor), got {tuple(x.shape[2:])}")

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """q(z|x): the encoder's output split into mean and logvar along channels."""
        self.check_input(x)
        h = self._run(self.encoder, self.enc_in(x))
        h = self.quant_conv(self.enc_out(F.silu(self.enc_norm(h))))
        mean, logvar = h.chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar)

    def decode(self, z: Tensor) -> Tensor:
        """x_hat from an unscaled latent (divide by ``scaling_factor`` first if it came from diffusion)."""
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"AutoencoderKL.decode expects (B, {self.latent_channels}, h, w), got {tuple(z.shape)}")
        h = self._run(self.decoder, self.dec_in(self.post_quant_conv(z)))
        return self.dec_out(F.silu(self.dec_norm(h)))

    def forward(self, x: Tensor, sample: bool = True, generator: torch.Generator | None = None,
                noise: Tensor | None = None) -> tuple[Tensor, DiagonalGaussian]:
        """Reconstruct x through a posterior sample (training; ``noise`` is its N(0, I) draw, else drawn
        from ``generator``) or its mode (``sample=False``)."""
        posterior = self.encode(x)
        z = posterior.sample(generator, noise) if sample else posterior.mode()
        return self.decode(z), posterior

    def to_latent(self, x: Tensor) -> Tensor:
        """The diffusion model's latent of images ``x``: posterior mean times ``scaling_factor``."""
        return self.encode(x).mean * self._checked_scaling()

    def from_latent(self, z: Tensor) -> Tensor:
        """Images from the diffusion model's latents: undo ``scaling_factor``, then decode."""
        return self.decode(z / self._checked_scaling())

    def _checked_scaling(self) -> Tensor:
        if not torch.isfinite(self.scaling_factor):
            raise ValueError("this AutoencoderKL has no latent scaling factor: call estimate_scaling_factor(images) "
                             "or pass scaling_factor=... (diffusion on unscaled latents would be silently wrong)")
        return self.scaling_factor

    @torch.no_grad()
    def estimate_scaling_factor(self, images: Tensor, batch_size: int = 64) -> float:
        """Set ``scaling_factor`` to 1 / std of the posterior means over ``images`` (LDM's convention,
        there computed on one batch) so that scaled latents have unit variance; returns it."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        was_training = self.training
        self.eval()
        try:
            means = torch.cat([self.encode(images[i:i + batch_size]).mean.double()
                               for i in range(0, len(images), batch_size)])
        finally:
            self.train(was_training)
        if means.numel() < 2:
            raise ValueError(f"need at least 2 latent values to estimate a std, got {means.numel()}")
        self.scaling_factor.fill_(1.0 / means.std().item())
        return self.scaling_factor.item()


def vae_loss(x: Tensor, x_hat: Tensor, posterior: DiagonalGaussian, beta: float = 1e-6,
             kind: str = "l1") -> dict[str, Tensor]:
    """``rec + beta * kl`` with ``rec`` the L1 or squared error *averaged over every pixel and channel*
    and ``kl`` the per-sample KL (summed over latent dims) *averaged over the batch*.

    LDM (App. G) instead sums the reconstruction error over pixels per sample; with this
    mean-over-pixels convention the same balance needs ``beta`` divided by C*H*W.
    """
    if kind not in ("l1", "mse"):
        raise ValueError(f"kind must be 'l1' or 'mse', got {kind!r}")
    if x.shape != x_hat.shape:
        raise ValueError(f"x and x_hat must have one shape, got {tuple(x.shape)} and {tuple(x_hat.shape)}")
    rec = F.l1_loss(x_hat, x) if kind == "l1" else F.mse_loss(x_hat, x)
    kl = posterior.kl().mean()
    return {"loss": rec + beta * kl, "rec": rec, "kl": kl}


def _starts(size: int, tile: int, stride: int) -> list[int]:
    """Tile starts covering [0, size): every ``stride``, the last one moved back to end at ``size``."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def _ramp(length: int, fade: int, lead: bool, trail: bool) -> Tensor:
    """1-D blending weight: rises linearly over ``fade`` pixels at sides that overlap a neighbour, else 1."""
    i = torch.arange(length, dtype=torch.float32) + 0.5
    w = torch.ones(length)
    if lead:
        w = torch.minimum(w, i / fade)
    if trail:
        w = torch.minimum(w, (length - i) / fade)
    return w


@torch.no_grad()
def decode_tiled(vae: AutoencoderKL, z: Tensor, tile: int = 16, overlap: int = 4) -> Tensor:
    """Decode ``z`` in overlapping ``tile`` x ``tile`` latent tiles and blend the overlaps linearly.

    Peak activation memory is that of one tile's decode (plus the output). Each tile is decoded on
    its own, so near seams the convolutions see zero padding instead of neighbours, and GroupNorm and
    attention see the tile's statistics instead of the whole latent's: the result approximates
    ``vae.decode(z)`` and equals it when one tile covers ``z``. Blending weights are normalised by their
    sum, so each output pixel is a convex combination of the tiles covering it.
    """
    if z.ndim != 4:
        raise ValueError(f"decode_tiled expects latents (B, C, h, w), got {tuple(z.shape)}")
    if not 0 <= overlap < tile:
        raise ValueError(f"need 0 <= overlap < tile, got overlap={overlap}, tile={tile}")
    f = vae.downsampling
    (b, _, h, w), stride = z.shape, tile - overlap
    out, weight = None, torch.zeros(1, 1, h * f, w * f, device=z.device)
    rows, cols = _starts(h, tile, stride), _starts(w, tile, stride)
    for top in rows:
        for left in cols:
            x = vae.decode(z[:, :, top:top + tile, left:left + tile])
            th, tw = x.shape[-2:]
            fade = max(overlap * f, 1)
            wy = _ramp(th, fade, top > 0 and overlap > 0, top + tile < h and overlap > 0)
            wx = _ramp(tw, fade, left > 0 and overlap > 0, left + tile < w and overlap > 0)
            wt = (wy[:, None] * wx[None, :]).to(x.device)
            if out is None:
                out = torch.zeros(b, x.shape[1], h * f, w * f, device=x.device, dtype=torch.float32)
            ys, xs = slice(top * f, top * f + th), slice(left * f, left * f + tw)
            out[:, :, ys, xs] += x.float() * wt
            weight[:, :, ys, xs] += wt
    return (out / weight).to(z.dtype)
