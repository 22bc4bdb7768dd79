"""A U-Net for 1-, 2- or 3-D data (Ronneberger et al. 2015; Ho et al. 2020, App. B; Dhariwal & Nichol 2021).

Layout as in DDPM/ADM and diffusers' ``UNet2DModel``: a sinusoidal time
embedding and MLP; per level ``num_res_blocks`` ResBlocks (GroupNorm, SiLU,
conv, time embedding added or as scale-shift, dropout, conv), optional self-
attention, a strided-conv downsample; a ResBlock-attention-ResBlock middle; an
upward path with one more ResBlock per level fed by the skips; GroupNorm, SiLU,
conv out. Called as ``net(x, c_noise, cond)``. With ``context_dim`` (text), the attention
layers are SpatialTransformers: self-attention, masked cross-attention to ``cond.context``,
GEGLU feed-forward (Rombach et al. 2022); ``cond.pooled`` joins the noise embedding.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import astuple, dataclass, replace
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..cond import Cond

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """[cos, sin] of t * exp(-ln(max_period) k / half), k = 0..half-1 (Vaswani et al. 2017)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([args.cos(), args.sin()], dim=-1)
    return F.pad(emb, (0, dim % 2))


class ResBlock(nn.Module):
    def __init__(self, dims, c_in, c_out, emb_dim, groups, dropout, scale_shift):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = CONV[dims](c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out * (2 if scale_shift else 1))
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CONV[dims](c_out, c_out, 3, padding=1)
        self.skip = CONV[dims](c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.scale_shift = scale_shift

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """``emb`` arrives already through SiLU (computed once per forward, not once per block)."""
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.emb(emb).reshape(emb.shape[0], -1, *([1] * (x.ndim - 2)))
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionHook:
    """What an installed hook may do in every attention layer it is installed on (see
    ``attention_hooks``): read or replace the layer's q, k, v (B, heads, N or L, head_dim), read or
    replace its attention probabilities (B, heads, N, L), and add to its output (B, heads, N,
    head_dim, before the output projection) given its queries. ``name`` is the layer's stable name
    (``UNet.attention_layers``). The defaults change nothing. A hook that leaves ``probs`` alone
    sets ``sees_probs = False``, and the layer keeps fused attention under it."""

    sees_probs = True

    def qkv(self, name: str, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return q, k, v

    def probs(self, name: str, probs: Tensor) -> Tensor:
        return probs

    def output(self, name: str, q: Tensor, out: Tensor) -> Tensor:
        return out


class _Attending(nn.Module):
    """The one attention product of every layer: fused ``scaled_dot_product_attention`` unless an
    installed hook needs the probabilities, then the explicit softmax(q k^T / sqrt(d)) v it can see into."""

    hook: AttentionHook | None = None
    name: str = ""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        hook = self.hook
        if hook is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        q, k, v = hook.qkv(self.name, q, k, v)
        if hook.sees_probs:
            logits = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
            if mask is not None:
                logits = logits.masked_fill(~mask, float("-inf"))
            out = hook.probs(self.name, logits.softmax(-1)) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return hook.output(self.name, q, out)


class SelfAttention(_Attending):
    """Multi-head self-attention over all positions, through fused scaled_dot_product_attention."""

    def __init__(self, channels, head_dim, groups):
        super().__init__()
        if channels % head_dim:
            raise ValueError(f"attention channels {channels} are not divisible by head_dim {head_dim}")
        self.heads = channels // head_dim
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        h = self.norm(x).reshape(b, c, -1).transpose(1, 2)  # (B, N, C)
        q, k, v = self.qkv(h).reshape(b, -1, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        h = self.attend(q, k, v).transpose(1, 2).reshape(b, -1, c)
        return x + self.out(h).transpose(1, 2).reshape(b, c, *spatial)


class Attention(_Attending):
    """Multi-head attention of ``x`` (B, N, C) to ``context`` (B, L, D) (itself when None).

    ``heads`` heads of ``head_dim`` channels; ``mask`` (B, L) bool marks the context tokens
    that may be attended (padding may not).
    """

    def __init__(self, channels: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        if channels % head_dim:
            raise ValueError(f"attention channels {channels} are not divisible by head_dim {head_dim}")
        self.heads = channels // head_dim
        self.q = nn.Linear(channels, channels, bias=False)
        self.kv = nn.Linear(context_dim or channels, 2 * channels, bias=False)
        self.out = nn.Linear(channels, channels)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.heads, -1).transpose(1, 2)
        kv = self.kv(x if context is None else context)
        k, v = kv.reshape(b, -1, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn_mask = None if mask is None else mask[:, None, None, :].to(torch.bool)
        h = self.attend(q, k, v, attn_mask)
        return self.out(h.transpose(1, 2).reshape(b, n, c))


class TransformerBlock(nn.Module):
    """Pre-LN self-attention, cross-attention to the text, GEGLU feed-forward (Rombach et al. 2022, App. E)."""

    def __init__(self, channels: int, head_dim: int, context_dim: int):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(channels) for _ in range(3))
        self.self_attn = Attention(channels, head_dim)
        self.cross_attn = Attention(channels, head_dim, context_dim)
        self.ff_in = nn.Linear(channels, 8 * channels)  # GEGLU: value and gate, 4x wide each
        self.ff_out = nn.Linear(4 * channels, channels)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), context, mask)
        value, gate = self.ff_in(self.norm3(x)).chunk(2, dim=-1)
        return x + self.ff_out(value * F.gelu(gate))


class SpatialTransformer(nn.Module):
    """GroupNorm, project to tokens, ``depth`` TransformerBlocks over all positions, project back, residual."""

    def __init__(self, channels: int, head_dim: int, groups: int, context_dim: int, depth: int = 1):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.proj_in = nn.Linear(channels, channels)
        self.blocks = nn.ModuleList([TransformerBlock(channels, head_dim, context_dim) for _ in range(depth)])
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: Tensor, cond: Cond | None) -> Tensor:
        if cond is None or cond.context is None:
            raise ValueError("this UNet cross-attends to text: pass Cond(context=..., context_mask=...) "
                             "(the empty prompt's embedding is the unconditional input)")
        b, c, *spatial = x.shape
        h = self.proj_in(self.norm(x).reshape(b, c, -1).transpose(1, 2))
        context = cond.context.to(h.dtype)
        for block in self.blocks:
            h = block(h, context, cond.context_mask)
        return x + self.proj_out(h).transpose(1, 2).reshape(b, c, *spatial)


class Block(nn.Module):
    """A ResBlock, optionally followed by self-attention or a cross-attending SpatialTransformer."""

    def __init__(self, res: ResBlock, attn: nn.Module | None):
        super().__init__()
        self.res, self.attn = res, attn

    def forward(self, x, emb, cond=None):
        x = self.res(x, emb)
        if isinstance(self.attn, SpatialTransformer):
            return self.attn(x, cond)
        return self.attn(x) if self.attn is not None else x


class Downsample(nn.Module):
    def __init__(self, dims, channels):
        super().__init__()
        self.conv = CONV[dims](channels, channels, 3, stride=2, padding=1)

    def forward(self, x, emb=None):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, dims, channels):
        super().__init__()
        self.conv = CONV[dims](channels, channels, 3, padding=1)

    def forward(self, x, emb=None):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


@dataclass(frozen=True)
class UNetSpec:
    """The architecture of a :class:`UNet` (every argument but its input channels); see its Args."""

    out_channels: int | None = None
    channels: int = 64
    channel_mult: Sequence[int] = (1, 2)
    num_res_blocks: int = 2
    attn_levels: Sequence[int] = (1,)
    mid_attn: bool = True
    head_dim: int = 32
    num_classes: int | None = None
    dropout: float = 0.0
    groups: int = 32
    scale_shift: bool = True
    dims: int = 2
    context_dim: int | None = None
    pooled_dim: int | None = None
    transformer_depth: int = 1
    checkpointing: bool = False
    concat_channels: int = 0


class UNet(nn.Module):
    """U-Net denoiser backbone: ``UNet(in_channels, spec)`` or ``UNet(in_channels, **spec_fields)``.

    Args:
        in_channels, out_channels: data channels (out defaults to in).
        channels: width of the first level; level i has ``channels * channel_mult[i]``.
        num_res_blocks: ResBlocks per level on the way down (one more on the way up).
        attn_levels: level indices (0 = full resolution) that get self-attention.
        head_dim: channels per attention head.
        num_classes: if set, a label embedding with an extra null class (index
            ``num_classes``) for classifier-free guidance.
        context_dim: if set, the attention levels (and the middle) become SpatialTransformers
            that cross-attend to ``cond.context`` of this width (text conditioning).
        pooled_dim: if set, ``cond.pooled`` is projected and added to the noise embedding.
        transformer_depth: TransformerBlocks per SpatialTransformer.
        checkpointing: in training, recompute each block's activations in backward instead of
            keeping them (``torch.utils.checkpoint``, non-reentrant; Chen et al. 2016): less
            activation memory for about one more forward pass of compute.
        scale_shift: inject the time embedding as GroupNorm scale-shift (ADM) instead of adding it.
        dims: 1, 2 or 3 spatial dimensions.
        concat_channels: channels of ``cond.image`` concatenated to the input (an inpainting model
            takes the masked image and the mask, as Stable Diffusion's inpainting U-Net); without
            ``cond.image`` they are zeros: nothing is known, the model generates freely.
    """

    def __init__(self, in_channels: int = 1, spec: UNetSpec | None = None, **options):
        super().__init__()
        self.spec = spec = replace(spec or UNetSpec(), **options)
        (out_channels, channels, channel_mult, num_res_blocks, attn_levels, mid_attn, head_dim, num_classes, dropout,
         groups, scale_shift, dims, context_dim, pooled_dim, transformer_depth, checkpointing,
         concat_channels) = astuple(spec)
        if dims not in CONV:
            raise ValueError(f"dims must be 1, 2 or 3, got {dims}")
        self.in_channels, self.dims, self.num_classes = in_channels, dims, num_classes
        self.concat_channels = concat_channels
        self.checkpointing = checkpointing
        self.downsampling = 2 ** (len(channel_mult) - 1)
        out_channels = out_channels or in_channels
        emb_dim = 4 * channels
        self.channels = channels
        self.time_mlp = nn.Sequential(nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        self.pooled_proj = nn.Linear(pooled_dim, emb_dim) if pooled_dim else None
        self.context_dim = context_dim

        def attention(c):
            if context_dim:
                return SpatialTransformer(c, head_dim, groups, context_dim, transformer_depth)
            return SelfAttention(c, head_dim, groups)

        def block(c_in, c_out, level):
            attn = attention(c_out) if level in attn_levels else None
            return Block(ResBlock(dims, c_in, c_out, emb_dim, groups, dropout, scale_shift), attn)

        widths = [channels * m for m in channel_mult]
        self.conv_in = CONV[dims](in_channels + concat_channels, channels, 3, padding=1)
        self.down = nn.ModuleList()
        skips, c = [channels], channels
        for level, w in enumerate(widths):
            for _ in range(num_res_blocks):
                self.down.append(block(c, w, level))
                c = w
                skips.append(c)
            if level < len(widths) - 1:
                self.down.append(Downsample(dims, c))
                skips.append(c)
        res = lambda: ResBlock(dims, c, c, emb_dim, groups, dropout, scale_shift)  # noqa: E731
        self.mid = nn.ModuleList([Block(res(), attention(c) if mid_attn else None),
                                  Block(res(), None)])
        self.up = nn.ModuleList()
        for level, w in reversed(list(enumerate(widths))):
            for _ in range(num_res_blocks + 1):
                self.up.append(block(c + skips.pop(), w, level))
                c = w
            if level > 0:
                self.up.append(Upsample(dims, c))
        self.norm_out = nn.GroupNorm(groups, c)
        self.conv_out = CONV[dims](c, out_channels, 3, padding=1)
        for name, layer in self.attention_layers().items():
            layer.name = name

    def attention_layers(self) -> dict[str, nn.Module]:
        """Every attention layer by its stable name: ``down.1.attn.self`` (a self-attention block),
        ``down.1.attn.0.self`` / ``down.1.attn.0.cross`` (transformer block 0 of a SpatialTransformer);
        ``mid.0...`` and ``up.<i>...`` likewise."""
        out = {}
        for path, module in self.named_modules():
            if isinstance(module, SelfAttention):
                out[f"{path}.self"] = module
            elif isinstance(module, Attention):
                out[path.replace(".blocks.", ".").replace("self_attn", "self").replace("cross_attn", "cross")] = module
        return out

    def check_input(self, x: Tensor) -> None:
        expected = f"(B, {self.in_channels}, " + ", ".join(["S"] * self.dims) + ")"
        if x.ndim != self.dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet expects input of shape {expected}, got {tuple(x.shape)}")
        if any(s % self.downsampling for s in x.shape[2:]):
            raise ValueError(f"UNet input sizes must be divisible by {self.downsampling} "
                             f"(the downsampling factor), got {tuple(x.shape[2:])}")

    def forward(self, x: Tensor, c_noise: Tensor, cond: Cond | None = None) -> Tensor:
        self.check_input(x)
        emb = self.embedding(c_noise, cond, len(x))
        run = block_runner(self, self.checkpointing)
        hs, h = self.encode(x, emb, cond, run)
        if cond is not None and cond.residuals is not None:
            hs, h = self._add_residuals(hs, h, cond.residuals)
        for layer in self.up:
            h = run(layer, torch.cat([h, hs.pop()], 1), emb, cond) if isinstance(layer, Block) else layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    def embedding(self, c_noise: Tensor, cond: Cond | None, batch: int) -> Tensor:
        """SiLU of the noise embedding plus the label or pooled-text embedding: what every ResBlock gets."""
        emb = self.time_mlp(timestep_embedding(c_noise.expand(batch), self.channels))
        if self.label_emb is not None:
            if cond is None or cond.labels is None:
                raise ValueError("this UNet is class-conditional: pass Cond(labels=...) "
                                 f"(use label {self.num_classes} for the null class)")
            emb = emb + self.label_emb(cond.labels)
        if self.pooled_proj is not None:
            if cond is None or cond.pooled is None:
                raise ValueError("this UNet takes a pooled text embedding: pass Cond(pooled=...)")
            emb = emb + self.pooled_proj(cond.pooled.to(emb.dtype))
        return F.silu(emb)

    def encode(self, x: Tensor, emb: Tensor, cond: Cond | None, run=None, added: Tensor | None = None):
        """The downward path and the middle: (skips, middle output). ``added`` joins the first
        convolution's output (a ControlNet's encoded hint)."""
        run = run or _direct
        h = self.conv_in(self._with_image(x, cond))
        if added is not None:
            h = h + added
        hs = [h]
        for layer in self.down:
            h = run(layer, h, emb, cond) if isinstance(layer, Block) else layer(h)
            hs.append(h)
        for layer in self.mid:
            h = run(layer, h, emb, cond)
        return hs, h

    @staticmethod
    def _add_residuals(hs: list[Tensor], h: Tensor, residuals: tuple[Tensor, ...]):
        if len(residuals) != len(hs) + 1:
            raise ValueError(f"cond.residuals must hold {len(hs) + 1} tensors (one per skip, then the middle) "
                             f"for this UNet, got {len(residuals)}")
        return [s + r.to(s.dtype) for s, r in zip(hs, residuals)], h + residuals[-1].to(h.dtype)

    def skip_channels(self) -> list[int]:
        """Channels of each skip the downward path hands the upward one, first convolution first."""
        out = [self.conv_in.out_channels]
        for layer in self.down:
            out.append(layer.conv.out_channels if isinstance(layer, Downsample) else layer.res.conv2.out_channels)
        return out

    def _with_image(self, x: Tensor, cond: Cond | None) -> Tensor:
        if not self.concat_channels:
            if cond is not None and cond.image is not None:
                raise ValueError("this UNet takes no concatenated image (cond.image); it was built without concat_channels")
            return x
        image = None if cond is None else cond.image
        if image is None:
            return torch.cat([x, x.new_zeros(len(x), self.concat_channels, *x.shape[2:])], 1)
        if tuple(image.shape) != (len(x), self.concat_channels, *x.shape[2:]):
            raise ValueError(f"cond.image must be (B, {self.concat_channels}, {', '.join(map(str, x.shape[2:]))}) for "
                             f"this UNet, got {tuple(image.shape)}")
        return torch.cat([x, image.to(x.dtype)], 1)


class UNetWrapper(nn.Module):
    """A network around a U-Net (``.unet``) with its call, ``(x, c_noise, cond)``: the U-Net's
    attributes (``in_channels``, ``attention_layers``, ...) read through it."""

    def __init__(self, unet: UNet):
        super().__init__()
        self.unet = unet

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["unet"], name)


def block_runner(model: nn.Module, checkpointing: bool):
    """``run(block, *args)``: through ``torch.utils.checkpoint`` when ``checkpointing`` and a backward
    will follow (training with grad enabled); in eval or under no_grad it would only cost time."""
    return _checkpointed if checkpointing and model.training and torch.is_grad_enabled() else _direct


def _direct(block: nn.Module, *args) -> Tensor:
    return block(*args)


def _checkpointed(block: nn.Module, *args) -> Tensor:
    return checkpoint(block, *args, use_reentrant=False)


class _Chained(AttentionHook):
    """Two hooks on one layer: the one installed first sees the layer's values first."""

    def __init__(self, first: AttentionHook, then: AttentionHook):
        self.first, self.then = first, then
        self.sees_probs = first.sees_probs or then.sees_probs

    def qkv(self, name, q, k, v):
        return self.then.qkv(name, *self.first.qkv(name, q, k, v))

    def probs(self, name, probs):
        return self.then.probs(name, self.first.probs(name, probs))

    def output(self, name, q, out):
        return self.then.output(name, q, self.first.output(name, q, out))


@contextmanager
def attention_hooks(unet: "UNet", hook: AttentionHook, layers=None):
    """Install ``hook`` on the attention layers named in ``layers`` (all when None; a callable
    ``name -> bool`` or a collection of names) for the duration of the ``with`` block. Hooks nest:
    on a layer that already has one, the new hook sees what the earlier one made of the values
    (prompt-to-prompt with self-attention guidance beneath it), and leaving the block puts the
    earlier hook back."""
    found = unet.attention_layers()
    chosen = [n for n in found if layers is None or (layers(n) if callable(layers) else n in layers)]
    unknown = [] if layers is None or callable(layers) else sorted(set(layers) - set(found))
    if unknown:
        raise ValueError(f"no attention layer named {', '.join(unknown)}; this UNet has {', '.join(found) or 'none'}")
    earlier = {name: found[name].hook for name in chosen}
    for name in chosen:  # not a submodule even when the hook is an nn.Module
        object.__setattr__(found[name], "hook", hook if earlier[name] is None else _Chained(earlier[name], hook))
    try:
        yield chosen
    finally:
        for name in chosen:
            object.__setattr__(found[name], "hook", earlier[name])
