"""Draw samples from a Denoiser: seeded per sample, optionally guided, in batches.

``SamplingSettings`` is the one value that says how to sample (sampler and its options, steps,
sigma grid, guidance, rescale, negative prompt, seed, batch). A field left ``None`` is taken
from defaults: a run's ``eval`` config (``SamplingSettings.from_eval``) through ``resolve``,
and where nothing else says, :data:`DEFAULTS`.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .cond import Cond
from .guidance import ClassifierFreeGuidance, ImagePromptGuidance, SelfAttentionGuidance
from .samplers import BrownianNoise, SeededNoise, check_options, sampler_info
from .seeds import derive_seed


@dataclass(frozen=True)
class SamplingSettings:
    """How to sample; ``None`` = not set here (taken from the defaults it is resolved against).

    ``guidance`` is the classifier-free guidance scale (1 = conditional, 0 = unconditional) and
    ``guidance_rescale`` its rescale phi (Lin et al. 2024); ``sag_scale`` self-attention guidance
    (Hong et al. 2023; 0 = off), applied beneath classifier-free guidance; ``spacing`` the sigma grid (``None`` =
    the schedule's own); ``options`` the sampler's keyword options (``eta``, ``s_churn``, ...).
    ``control_scale`` (one number, or one per U-Net level then the middle) and ``ip_scale`` weigh a
    ControlNet's hint and an IP-Adapter's image prompt (0 = the base model); ``image_guidance``, when
    set, guides an image prompt apart from the text (``ImagePromptGuidance``; ``guidance`` then
    weighs the text alone).
    """

    sampler: str | None = None
    options: dict = field(default_factory=dict)
    steps: int | None = None
    spacing: str | None = None
    guidance: float | None = None
    guidance_rescale: float | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    batch_size: int | None = None
    sag_scale: float | None = None
    control_scale: float | tuple[float, ...] | None = None
    ip_scale: float | None = None
    image_guidance: float | None = None

    def __post_init__(self):
        for name, kind in (("sampler", str), ("spacing", str), ("negative_prompt", str)):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), kind):
                raise TypeError(f"{name} must be a string, got {getattr(self, name)!r}")
        for name, least in (("steps", 1), ("batch_size", 1), ("seed", None)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise TypeError(f"{name} must be an integer, got {value!r}")
            if value is not None and least is not None and value < least:
                raise ValueError(f"{name} must be >= {least}, got {value}")
        if isinstance(self.control_scale, (list, tuple)):
            object.__setattr__(self, "control_scale", tuple(self.control_scale))
            if not self.control_scale or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                 and math.isfinite(v) for v in self.control_scale):
                raise ValueError(f"control_scale must be a number or a list of finite numbers, got {self.control_scale!r}")
        for name, low, high in (("guidance", -math.inf, math.inf), ("guidance_rescale", 0.0, 1.0),
                                ("sag_scale", -math.inf, math.inf), ("control_scale", -math.inf, math.inf),
                                ("ip_scale", -math.inf, math.inf), ("image_guidance", -math.inf, math.inf)):
            value = getattr(self, name)
            if isinstance(value, tuple):
                continue
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
                raise TypeError(f"{name} must be a number, got {value!r}")
            if value is not None and not (math.isfinite(value) and low <= value <= high):
                raise ValueError(f"{name} must be a finite number{'' if high == math.inf else f' in [{low:g}, {high:g}]'}, "
                                 f"got {value!r}")

    @classmethod
    def of(cls, settings: SamplingSettings | None = None, **overrides) -> SamplingSettings:
        """``settings`` with ``overrides`` set; keywords that are no field are sampler options."""
        names = {f.name for f in fields(cls)} - {"options"}
        base = settings or cls()
        options = {**base.options, **{k: v for k, v in overrides.items() if k not in names}}
        return replace(base, options=options, **{k: v for k, v in overrides.items() if k in names})

    @classmethod
    def from_eval(cls, e) -> SamplingSettings:
        """The sampling defaults of a run's ``eval`` config section (``difflab.config.EvalConfig``);
        ``eval.batch_size`` is the evaluation's batch, not a default of every sampling call."""
        return cls(sampler=e.sampler, steps=e.steps, spacing=e.spacing or None, guidance=e.guidance,
                   guidance_rescale=e.guidance_rescale, negative_prompt=e.negative_prompt, seed=e.seed)

    def resolve(self, defaults: SamplingSettings) -> SamplingSettings:
        """Every unset field from ``defaults``; options merged, these over theirs."""
        unset = {f.name: getattr(defaults, f.name) for f in fields(self)
                 if f.name != "options" and getattr(self, f.name) is None}
        return replace(self, options={**defaults.options, **self.options}, **unset)

    def is_set(self, *names: str) -> list[str]:
        """Which of the fields ``names`` are set."""
        return [n for n in names if getattr(self, n) is not None]


#: what sampling uses where neither the caller nor a run's config says otherwise
DEFAULTS = SamplingSettings(sampler="ddim", steps=50, guidance_rescale=0.0, negative_prompt="", seed=0,
                            batch_size=256, sag_scale=0.0, control_scale=1.0, ip_scale=1.0)


def sample_seeds(seed: int, n: int) -> list[int]:
    """Per-sample seeds: sample i of run ``seed`` always gets the same noise stream."""
    return [derive_seed(seed, i) for i in range(n)]


def _check_conditions(n: int, cond: Cond | None, null_cond: Cond | None, s: SamplingSettings) -> None:
    if cond is not None and len(cond) != n:
        raise ValueError(f"expected a condition for each of the {n} samples, got {len(cond)} rows")
    if null_cond is not None and len(null_cond) not in (1, n):
        raise ValueError(f"the null / negative condition needs 1 row or one per sample ({n}), got {len(null_cond)}")
    if null_cond is None and s.is_set("guidance", "guidance_rescale"):
        raise ValueError(f"{' and '.join(s.is_set('guidance', 'guidance_rescale'))} need null_cond (the "
                         "unconditional or negative condition); a denoiser that is already guided takes neither")


def _check_count(n: int, shape) -> None:
    """``n`` samples that fit in memory: they are returned as one float32 tensor."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"the number of samples must be an integer >= 0, got {n!r}")
    need, have = n * math.prod(shape) * 4, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have // 2:
        raise ValueError(f"{n} samples of shape {tuple(shape)} need {need / 2**30:.1f} GiB as float32, more than half "
                         f"of this machine's {have / 2**30:.1f} GiB; draw them in parts (first_index=...)")


class NonFiniteSample(ValueError):
    pass


def _check_finite(steps: int, then=None):
    """A sampler callback that stops at the first step whose denoised estimate is not finite, and
    otherwise calls the caller's own callback ``then``."""
    def check(info):
        if not torch.isfinite(info["x0_hat"]).all():
            raise NonFiniteSample(f"sampling produced NaN or infinite values at step {info['i'] + 1} of {steps} "
                                  f"(sigma {info['sigma']:.4g}): the weights, condition or settings are not sound")
        if then is not None:
            then(info)
    return check


class Edit:
    """What an editing method changes in sampling, batch by batch (``rows``: the batch's slice of the
    ``n`` samples). Each hook defaults to plain sampling from noise over the whole grid; inpainting,
    image-to-image and inversion (``difflab.editing``) override some, so every edit runs with every
    sampler, guidance and seed rule of ``generate``."""

    def seeds(self, seeds: list[int]) -> list[int]:
        """Each row's seed (prompt-to-prompt gives a source and its target one seed)."""
        return seeds

    def grid(self, sigmas: Tensor) -> Tensor:
        """The sigma grid to sample (image-to-image starts lower on it)."""
        return sigmas

    def start(self, noise: SeededNoise, sigmas: Tensor, rows: slice) -> Tensor:
        """The batch's state at ``sigmas[0]``, drawn from the samples' own noise streams."""
        return noise() * float(sigmas[0])

    def wrap(self, model, rows: slice):
        """The denoiser the batch is sampled with (a known region, ...)."""
        return model

    def run(self, sample, model, x: Tensor, sigmas: Tensor, cond, noise, seeds: list[int]) -> Tensor:
        """Sample the batch: ``sample(model, x, sigmas, cond, noise=noise)`` is the chosen sampler."""
        return sample(model, x, sigmas, cond, noise=noise)

    def finish(self, x: Tensor, rows: slice) -> Tensor:
        """The batch's result, after its last step (a composite with the known pixels, ...)."""
        return x


def guided(denoiser, s: SamplingSettings, null_cond: Cond | None = None):
    """The denoiser that sampling with the resolved settings ``s`` runs: self-attention guidance at
    ``s.sag_scale`` beneath classifier-free guidance (when ``null_cond`` is given)."""
    base = SelfAttentionGuidance(denoiser, s.sag_scale) if s.sag_scale else denoiser
    if null_cond is None:
        return base
    if s.image_guidance is not None:
        return ImagePromptGuidance(base, 1.0 if s.guidance is None else s.guidance, s.image_guidance, null_cond)
    return ClassifierFreeGuidance(base, 1.0 if s.guidance is None else s.guidance, null_cond,
                                  rescale=s.guidance_rescale)


def model_device(denoiser) -> torch.device:
    params = list(denoiser.parameters()) if hasattr(denoiser, "parameters") else []
    return params[0].device if params else torch.device("cpu")


@torch.no_grad()
def generate(denoiser, shape, n: int, settings: SamplingSettings | None = None, *, cond: Cond | None = None,
             null_cond: Cond | None = None, first_index: int = 0, device=None, progress: bool = True,
             edit: Edit | None = None) -> Tensor:
    """``n`` samples of ``shape`` (without batch), as float32 on the CPU.

    With ``null_cond`` (the null class, the empty or a negative prompt: 1 row or n) the denoiser is
    wrapped in classifier-free guidance at ``settings.guidance`` and ``guidance_rescale``; without
    it the denoiser is sampled as given -- unconditional, plainly conditional on ``cond`` (n rows),
    or a guidance wrapper built by the caller (``SafeGuidance``, ``ClassifierGuidance``, ...; one
    with ``reset()`` is reset before each batch), and then guidance settings are an error.
    Results depend on (seed, sample index), never on the batch size; ``first_index`` k makes these
    samples k .. k + n - 1 of the seed's stream (shards of one run). ``edit`` (an ``Edit``) changes
    the grid, the start, the denoiser or the end of each batch: inpainting, image-to-image, inversion.
    """
    s = (settings or SamplingSettings()).resolve(DEFAULTS)
    _check_count(n, shape)
    _check_conditions(n, cond, null_cond, settings or SamplingSettings())
    info = sampler_info(s.sampler)
    options = check_options(s.sampler, s.options)
    edit = edit or Edit()
    sigmas = edit.grid(denoiser.schedule.sigmas(s.steps, s.spacing))
    device = device if device is not None else model_device(denoiser)
    seeds = edit.seeds(sample_seeds(s.seed, first_index + n)[first_index:])
    out = []
    for start in tqdm(range(0, n, s.batch_size), disable=not progress, desc=f"{s.sampler} x{s.steps}"):
        stop = min(n, start + s.batch_size)
        # a per-sample negative prompt is sliced to the batch
        null = None if null_cond is None else null_cond if len(null_cond) == 1 else null_cond[start:stop]
        model = guided(denoiser, s, null)
        if hasattr(model, "reset"):  # stateful guidance (SLD momentum) starts every trajectory afresh
            model.reset()
        rows = slice(start, stop)
        batch_cond = None if cond is None else cond[rows].to(device)
        out.append(_sample_batch(edit.wrap(model, rows), info, sigmas, seeds[rows], shape, batch_cond, device,
                                 options, edit, rows))
    return torch.cat(out)


def _sample_batch(model, info, sigmas: Tensor, seeds: list[int], shape, cond, device, options: dict,
                  edit: Edit, rows: slice) -> Tensor:
    """One batch: per-sample seeded start noise (and Brownian tree for SDE samplers), then the sampler."""
    noise = SeededNoise(seeds, shape, device=device)
    x = edit.start(noise, sigmas, rows).to(device)
    if info.brownian:
        positive = sigmas[sigmas > 0]
        noise = BrownianNoise(seeds, shape, float(positive.min()), float(positive.max()), device=device)
    options = dict(options)
    callback = _check_finite(len(sigmas) - 1, options.pop("callback", None))
    sample = functools.partial(info.fn, progress=False, callback=callback, **options)
    x = edit.finish(edit.run(sample, model, x, sigmas, cond, noise, seeds), rows)
    if not torch.isfinite(x).all():
        raise NonFiniteSample("sampling produced NaN or infinite values at its last step: the weights, condition "
                              "or settings are not sound")
    return x.float().cpu()
