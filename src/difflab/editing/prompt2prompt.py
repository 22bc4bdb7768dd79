"""Prompt-to-prompt (Hertz et al. 2022, "Prompt-to-Prompt Image Editing with Cross-Attention
Control", ICLR 2023): edit a generated (or inverted) image by changing its prompt while the
target's attention maps follow the source's.

The source and the target are sampled side by side from the same noise, as pairs of rows (source
at even rows, target at odd), so the hooks see the pair in every batch, under classifier-free
guidance too. For the first ``cross_steps`` of the steps the target's cross-attention maps are the
source's, carried over to the target's tokens:

- **replace** (word swap, equal word counts): token ``w`` of the source feeds token ``n`` of the
  target through a mapper ``M`` (identity on unchanged words; a swapped word of k source and k'
  target tokens spreads each source token evenly over the k' target tokens), ``A_t = A_s M``;
- **refine** (words added or removed): the words that the two prompts share (``difflib``'s
  alignment) take the source's maps, new words keep their own (``alpha`` = 0);
- **reweight**: the target's maps of chosen words are scaled (the paper's equalizer).

For the first ``self_steps`` the target's self-attention maps are the source's (the paper injects
them where the map has at most 16x16 queries; so does this). **Local blending** keeps the image
outside the region of chosen words: the words' cross-attention maps on the finest
cross-attention grid (averaged over heads, summed over its layers and the steps so far,
max-pooled 3x3 on that grid, upsampled, normalised by their maximum) above ``blend_threshold`` in
the source or the target bound the edit. The paper takes SD's 16x16 layers (a quarter of its
64x64 latent); on a small model with coarser grids the finest one is the only one whose 3x3
pool does not cover most of the image. The paper blends the
states, ``x_t <- x_s + m (x_t - x_s)``; here the denoised estimates are blended, which in sigma
space is the same for deterministic samplers once the pair agree outside the mask, works with
every sampler, and makes the last step (x = x0_hat) equal the source exactly outside the mask.
As in the paper's code, only the conditional half of a guided batch is edited.

Attention control keeps the layout only where attention decides it: a U-Net whose attention
stops above the objects' scale (the default shapes model: 8x8 and 4x4 at 16x16) keeps the
attributes but lets the object move; with attention at 16x16 too the object mask is kept
(benchmarks/prompt2prompt.py).
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..denoisers import DenoiserWrapper
from ..generate import Edit
from ..nn import AttentionHook, attention_hooks
from .inversion import grid_step
from .masks import composite

MODES = ("replace", "refine")
SELF_INJECTION_MAX_QUERIES = 16 * 16  # the paper's self-attention injection limit


@dataclass(frozen=True)
class PromptEdit:
    """A prompt-to-prompt edit of ``source`` into ``target``.

    ``mode``: ``replace`` (word swap), ``refine``, or None (replace when the word counts agree);
    ``cross_steps`` and ``self_steps``: the fractions of the steps with injected cross- and
    self-attention maps (the paper's 0.8 and 0.4); ``reweight``: target word -> factor on its
    cross-attention; ``blend``: words whose attention bounds the edit (looked up in both prompts),
    from ``blend_start`` of the steps on, at ``blend_threshold``."""

    source: str
    target: str
    mode: str | None = None
    cross_steps: float = 0.8
    self_steps: float = 0.4
    reweight: dict = field(default_factory=dict)
    blend: tuple = ()
    blend_threshold: float = 0.3
    blend_start: float = 0.2

    def __post_init__(self):
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"unknown prompt-to-prompt mode {self.mode!r}; expected one of {', '.join(MODES)}")
        if self.mode == "replace" and len(self.source.split()) != len(self.target.split()):
            raise ValueError(f"a word swap needs prompts of equal word counts: {self.source!r} has "
                             f"{len(self.source.split())} words, {self.target!r} {len(self.target.split())} "
                             "(use mode 'refine' to add or remove words)")
        for name in ("cross_steps", "self_steps", "blend_threshold", "blend_start"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        for word, factor in self.reweight.items():
            if not isinstance(factor, (int, float)) or not math.isfinite(factor):
                raise ValueError(f"the reweight factor of {word!r} must be a finite number, got {factor!r}")

    @property
    def swap(self) -> bool:
        same_count = len(self.source.split()) == len(self.target.split())
        return self.mode == "replace" or (self.mode is None and same_count)


@dataclass(frozen=True)
class TokenMap:
    """How the source's cross-attention feeds the target's: ``A_t <- (A_s M) alpha + A_t (1 - alpha)``,
    then ``A_t[..., n] *= weight[n]``; ``source_blend`` and ``target_blend`` mark the blend words."""

    mapper: Tensor        # (Ls, Lt)
    alpha: Tensor         # (Lt,)
    weight: Tensor        # (Lt,)
    source_blend: Tensor  # (Ls,) bool
    target_blend: Tensor  # (Lt,) bool


def token_map(edit: PromptEdit, source_words, target_words, source_length: int, target_length: int) -> TokenMap:
    """The ``TokenMap`` of ``edit``, from each prompt's ``(word, token positions)`` (an encoder's
    ``word_positions``) and its token count (specials included: the first and last are specials
    unless the encoder has no end token)."""
    mapper, alpha = torch.zeros(source_length, target_length), torch.zeros(target_length)
    pairs = _word_pairs(edit, [w for w, _ in source_words], [w for w, _ in target_words])
    for i, j in pairs:
        _connect(mapper, source_words[i][1], target_words[j][1])
        alpha[target_words[j][1]] = 1
    specials = [(0, 0)] + ([(source_length - 1, target_length - 1)]
                           if source_length - 1 > max([p for _, ps in source_words for p in ps], default=0) else [])
    for s, t in specials:
        mapper[s, t], alpha[t] = 1, 1
    weight = torch.ones(target_length)
    for word, factor in edit.reweight.items():
        positions = _positions(target_words, word)
        if not positions:
            raise ValueError(f"reweight: {word!r} is not a word of the target prompt {edit.target!r}")
        weight[positions] = float(factor)
    blend = [_positions(source_words, w) + _positions(target_words, w) for w in edit.blend]
    missing = [w for w, found in zip(edit.blend, blend) if not found]
    if missing:
        raise ValueError(f"blend: {', '.join(map(repr, missing))} is in neither prompt")
    return TokenMap(mapper, alpha, weight, _marks(source_words, edit.blend, source_length),
                    _marks(target_words, edit.blend, target_length))


def _word_pairs(edit: PromptEdit, source: list[str], target: list[str]) -> list[tuple[int, int]]:
    """(source word, target word) pairs whose attention carries over: all of them, position by
    position, for a swap; the shared words of the alignment for a refinement."""
    if edit.swap:
        if len(source) != len(target):
            raise ValueError(f"a word swap needs prompts of equal word counts: the encoder reads {len(source)} "
                             f"words in {edit.source!r}, {len(target)} in {edit.target!r}")
        return list(zip(range(len(source)), range(len(target))))
    matcher = difflib.SequenceMatcher(a=source, b=target, autojunk=False)
    return [(b.a + k, b.b + k) for b in matcher.get_matching_blocks() for k in range(b.size)]


def _connect(mapper: Tensor, source: list[int], target: list[int]) -> None:
    """Token by token when the counts agree, else each source token spread evenly over the target's."""
    if len(source) == len(target):
        mapper[source, target] = 1
    elif source and target:
        for t in target:
            mapper[source, t] = 1 / len(target)


def _positions(words, word: str) -> list[int]:
    return [p for w, ps in words if w == word.lower() for p in ps]


def _marks(words, chosen, length: int) -> Tensor:
    marks = torch.zeros(length, dtype=torch.bool)
    marks[[p for w in chosen for p in _positions(words, w)]] = True
    return marks


def _padded(t: Tensor, *sizes: int) -> Tensor:
    """``t`` zero-padded at the end of each dimension to ``sizes``."""
    pad = [p for d, size in reversed(list(enumerate(sizes))) for p in (0, size - t.shape[d])]
    return F.pad(t, pad)


class AttentionControl(AttentionHook):
    """The hook of one batch of pairs: edits the target rows' attention as ``PromptEdit`` says, at
    the step the wrapper last announced (``begin``), and sums the blend words' cross-attention maps."""

    def __init__(self, edit: PromptEdit, tokens: TokenMap, steps: int):
        self.edit, self.tokens, self.steps = edit, tokens, steps
        self.step, self.rows, self.size = 0, 0, (1, 1)
        self.word_maps: Tensor | None = None  # (rows, 1, h, w) on the finest grid: summed over layers and steps

    def begin(self, step: int, rows: int, size) -> None:
        """The step, rows and spatial size (H, W) of the denoiser call that follows."""
        self.step, self.rows, self.size = step, rows, tuple(size)

    def _within(self, fraction: float) -> bool:
        return self.step < int(fraction * self.steps)

    def probs(self, name: str, probs: Tensor) -> Tensor:
        half = min(self.rows, len(probs))  # a guided batch (CFG, safe guidance) puts the conditional rows first
        conditional = probs[:half]
        source, target = conditional[0::2], conditional[1::2]
        cross = name.endswith(".cross")
        if cross and self.edit.blend:
            self._gather(conditional)
        if cross and self._within(self.edit.cross_steps):
            edited = self._cross(source, target)
        elif not cross and self._within(self.edit.self_steps) and probs.shape[-2] <= SELF_INJECTION_MAX_QUERIES:
            edited = source
        else:
            return probs
        out = probs.clone()
        out[1:half:2] = edited
        return out

    def _cross(self, source: Tensor, target: Tensor) -> Tensor:
        length = source.shape[-1]
        t = self.tokens
        mapper = _padded(t.mapper, length, length).to(source)
        alpha, weight = _padded(t.alpha, length).to(source), _padded(t.weight, length).to(source)
        carried = (source @ mapper) * alpha + target * (1 - alpha)
        return carried * weight

    def _gather(self, conditional: Tensor) -> None:
        """Add this layer's maps of the blend words (source words for source rows, target's for
        target rows), head-averaged, if the layer is on the finest cross-attention grid seen."""
        length = conditional.shape[-1]
        marks = torch.stack([_padded(self.tokens.source_blend, length), _padded(self.tokens.target_blend, length)])
        marks = marks.repeat(len(conditional) // 2, 1).to(conditional)
        maps = (conditional.mean(1) * marks[:, None, :]).sum(-1)  # (rows, N)
        (h, w), queries = self.size, maps.shape[1]
        factor = math.isqrt(h * w // queries)  # the layer's downsampling
        maps = maps.reshape(len(maps), 1, h // factor, w // factor)
        if self.word_maps is None or maps.shape[2:] > self.word_maps.shape[2:]:
            self.word_maps = maps
        elif maps.shape[2:] == self.word_maps.shape[2:]:
            self.word_maps = self.word_maps + maps

    def blend_mask(self) -> Tensor:
        """(pairs, 1, H, W): 1 where the target may differ from the source."""
        maps = F.max_pool2d(self.word_maps, 3, 1, padding=1)
        maps = F.interpolate(maps, size=self.size, mode="nearest")
        maps = maps / maps.flatten(1).amax(1).clamp_min(1e-12)[:, None, None, None]
        inside = (maps > self.edit.blend_threshold).to(maps)
        return (inside[0::2] + inside[1::2]).clamp(max=1)


class PromptToPromptDenoiser(DenoiserWrapper):
    """A denoiser over a batch of (source, target) pairs whose U-Net attention runs through an
    ``AttentionControl``, with the local blend applied to the denoised estimate."""

    def __init__(self, denoiser, unet, edit: PromptEdit, tokens: TokenMap, sigmas: Tensor):
        super().__init__(denoiser)
        self.unet, self.edit, self.sigmas = unet, edit, sigmas
        self.control = AttentionControl(edit, tokens, len(sigmas) - 1)
        self.mask: Tensor | None = None  # the last local-blend mask, (pairs, 1, H, W)

    def __call__(self, x: Tensor, sigma: Tensor, cond=None) -> Tensor:
        if len(x) % 2:
            raise ValueError(f"prompt-to-prompt samples (source, target) pairs: a batch of {len(x)} rows is not pairs")
        step = grid_step(self.sigmas, sigma)
        self.control.begin(step, len(x), x.shape[2:])
        with attention_hooks(self.unet, self.control):
            x0_hat = self.denoiser(x, sigma, cond)
        if not self.edit.blend or step < int(self.edit.blend_start * self.control.steps):
            return x0_hat
        mask = self.mask = self.control.blend_mask().to(x0_hat)
        out = x0_hat.clone()
        out[1::2] = composite(x0_hat[0::2], x0_hat[1::2], 1 - mask)
        return out


class PromptToPrompt(Edit):
    """Sample (source, target) pairs: rows 2k and 2k + 1 share sample k's seed (so the source is
    what plain sampling of the source prompt gives for sample k), optionally from given start
    states (an inversion, one per pair), the target edited by a ``PromptToPromptDenoiser``.
    ``guided(model, rows)``, if given, builds the denoiser to edit from the unguided one (guidance
    with null-text inversion's per-step null conditions)."""

    def __init__(self, unet, edit: PromptEdit, tokens: TokenMap, start: Tensor | None = None, guided=None):
        self.unet, self.edit, self.tokens, self.start_states = unet, edit, tokens, start
        self.guided = guided  # rows -> the denoiser to edit (per-step nulls); None: the one generate builds
        self.sigmas, self.denoisers = None, []  # the denoisers of the batches (their blend masks), in order

    def seeds(self, seeds: list[int]) -> list[int]:
        return [seeds[i // 2] for i in range(len(seeds))]

    def grid(self, sigmas: Tensor) -> Tensor:
        self.sigmas = sigmas
        return sigmas

    def start(self, noise, sigmas, rows):
        if self.start_states is None:
            return noise() * float(sigmas[0])
        pairs = slice(rows.start // 2, (rows.stop + 1) // 2)
        return self.start_states[pairs].repeat_interleave(2, 0).clone()

    def wrap(self, model, rows):
        if (rows.stop - rows.start) % 2 or rows.start % 2:
            raise ValueError("prompt-to-prompt needs an even batch size (its rows are source/target pairs)")
        model = model if self.guided is None else self.guided(model, rows)
        self.denoisers.append(PromptToPromptDenoiser(model, self.unet, self.edit, self.tokens, self.sigmas))
        return self.denoisers[-1]


__all__ = ["MODES", "AttentionControl", "PromptEdit", "PromptToPrompt", "PromptToPromptDenoiser", "TokenMap",
           "token_map"]
