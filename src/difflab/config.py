"""Typed experiment configs: YAML in, ``key=value`` overrides, one clear error for a bad key or value.

The defaults are the digits job that ``difflab train`` runs with no arguments
(``configs/digits.yaml`` spells them out).
"""
from __future__ import annotations

import difflib
import math
import re
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

import yaml

from . import schedules


class ConfigError(ValueError):
    """A config key or value is wrong; the message names it."""


def choice(default, *options):
    return field(default=default, metadata={"choices": options})


@dataclass
class ModelConfig:
    channels: int = 32
    channel_mult: list[int] = field(default_factory=lambda: [1, 2])
    num_res_blocks: int = 1
    attn_levels: list[int] = field(default_factory=lambda: [1])
    mid_attn: bool = True
    head_dim: int = 32
    dropout: float = 0.0
    groups: int = 8
    scale_shift: bool = True
    text_encoder: str = choice("", "", "minilm", "clip")  # "" = no text; frozen encoders, embeddings cached
    text_encoder_path: str = ""  # clip: a local folder (or $DIFFLAB_CLIP_PATH); minilm ships with its package
    text_max_length: int = 32
    transformer_depth: int = 1   # TransformerBlocks per cross-attention level (text models)
    checkpointing: bool = False  # gradient checkpointing: recompute block activations in backward
    vae: str = ""                # latent diffusion: the run folder of a VAE trained by `difflab train-vae`
    inpainting: bool = False     # an inpainting model: the masked image and the mask as extra input channels


@dataclass
class VAEConfig:
    """The autoencoder that `difflab train-vae` trains (``difflab.nn.AutoencoderKL``)."""
    channels: int = 32
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])  # downsampling 2^(len - 1)
    num_res_blocks: int = 1
    latent_channels: int = 4
    groups: int = 8
    mid_attn: bool = True
    checkpointing: bool = False
    loss: str = choice("l1", "l1", "mse")
    beta: float = 1e-6        # KL weight (reconstruction is a per-pixel mean; see vae_loss)


@dataclass
class DiffusionConfig:
    schedule: str = choice("edm", "cosine", "linear", "scaled_linear", "sigmoid", "vp", "edm", "flow")
    timesteps: int = 1000
    zero_terminal_snr: bool = False
    # flow: rectified flow's velocity (with schedule flow); consistency: a consistency function (edm schedule)
    parametrization: str = choice("edm", "eps", "v", "x0", "edm", "flow", "consistency")
    weighting: str = choice("uniform", "uniform", "min_snr", "edm")
    min_snr_gamma: float = 5.0
    sigma_data: float = 0.75  # data std assumed by EDM preconditioning and weighting (digits: 0.75)
    loss: str = choice("mse", "mse", "l1", "huber")


@dataclass
class DataConfig:
    dataset: str = choice("digits", "digits", "folder", "shapes")
    path: str = ""            # image folder (dataset=folder); sub-folders become class labels
    image_size: int = 8       # folder images are resized (shorter side) and centre-cropped to this
    channels: int = 1         # 1 = greyscale, 3 = RGB (folder, shapes)
    holdout: float = 0.2      # digits: stratified held-out fraction, never trained on
    conditional: bool = True  # conditional on the labels (digits, folder) or captions (shapes)
    scenes: int = 20000       # shapes: number of training scenes (held-out ones are rendered apart)
    min_objects: int = 1      # shapes: objects per scene
    max_objects: int = 3
    world_seed: int = 0       # shapes: the world's seed; scene i is a pure function of (world_seed, i)


@dataclass
class TrainConfig:
    steps: int = 1500
    batch_size: int = 128     # global batch, over all ranks and accumulation steps
    grad_accum: int = 1
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup: int = 100
    lr_schedule: str = choice("cosine", "constant", "cosine")  # after warm-up
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_warmup: bool = True
    label_dropout: float = 0.2  # classifier-free guidance: rate of training on the null label / empty prompt
    precision: str = choice("fp32", "fp32", "bf16", "fp16")
    device: str = "auto"
    seed: int = 0
    threads: int = 0          # 0 = torch's default
    checkpoint_every: int = 500
    keep_checkpoints: int = 2  # the newest checkpoints kept in the run folder (the last one is published)
    sample_every: int = 1000
    log_every: int = 50


@dataclass
class EvalConfig:
    sampler: str = "ddim"
    steps: int = 50
    spacing: str = ""         # "" = the schedule's native grid (karras for edm, trailing for discrete)
    guidance: float = 3.0
    extra_guidance: list[float] = field(default_factory=lambda: [1.0])
    guidance_rescale: float = 0.0  # phi of Lin et al. 2024 (0 = off)
    negative_prompt: str = ""      # text models: takes the empty prompt's place in guidance
    n_samples: int = 1000
    seed: int = 0
    batch_size: int = 500


@dataclass
class AdapterConfig:
    """An adapter trained on a frozen base run (``difflab train`` with ``adapter.kind`` set): the run's
    model, VAE, diffusion, data and eval sections are the base's; only the adapter's weights train."""
    kind: str = choice("", "", "controlnet", "lora", "ip_adapter")
    base: str = ""            # the base run folder (its EMA weights; refused if they change)
    control: str = choice("edges", "edges", "depth")  # controlnet: the hint, from the shapes renderer
    images: str = ""          # lora: a folder of the concept's images (at the base's image size)
    caption: str = ""         # lora: the caption of every one of them
    rank: int = 4             # lora: rank r of each B A
    alpha: float = 0.0        # lora: the update is scaled by alpha / r (0 = alpha is r)
    convs: bool = False       # lora: the ResBlocks' convolutions too, not only the attention projections
    prior_images: int = 0     # lora: the base's samples of this many of its training captions join the data
    image_encoder: str = ""   # ip_adapter: the folder of `difflab train-image-encoder`
    tokens: int = 4           # ip_adapter: image tokens the embedding is projected to
    image_dropout: float = 0.1  # ip_adapter: rate of training on a zero (absent) image embedding
    colour_captions: bool = False  # ip_adapter: single objects also trained under their colour alone ("a red")


@dataclass
class DistillConfig:
    """Few-step models (``difflab distill``, ``difflab reflow``; ``difflab train
    diffusion.parametrization=consistency`` is consistency training, which needs no teacher)."""
    method: str = choice("", "", "progressive", "consistency", "reflow")
    teacher: str = ""         # the teacher run folder (its EMA weights)
    guidance: float = 3.0     # the teacher's classifier-free guidance scale the student learns (1 = none)
    steps: int = 2            # progressive: the teacher's DDIM steps; the student takes half
    levels: int = 18          # consistency distillation: the Karras grid the teacher steps along (N)
    teacher_sampler: str = "heun"  # consistency distillation: the ODE step between levels (a multistep one: Euler)
    level_groups: int = 4     # consistency distillation: rows share a level in this many groups (one sampler call each)
    distance: str = choice("pseudo_huber", "pseudo_huber", "l2")
    ema_target: bool = True   # consistency distillation: the EMA weights are the target (else the online ones)
    ct_start: int = 10        # consistency training: the discretisation curriculum from s0 levels ...
    ct_end: int = 1280        # ... doubling up to s1 (Song & Dhariwal 2023)
    pairs: int = 10000        # reflow: noise-sample pairs drawn from the model
    pair_steps: int = 100     # reflow: Euler steps that draw them


@dataclass
class Config:
    out: str = "runs/digits"
    model: ModelConfig = field(default_factory=ModelConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def to_dict(self) -> dict:
        return asdict(self)


def _coerce(key: str, value, annotation, meta):
    """Check (and gently coerce int->float) one value against its declared type."""
    tp = typing.get_type_hints(annotation[0])[annotation[1]] if isinstance(annotation, tuple) else annotation
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list of {item.__name__}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item, {}) for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"config key '{key}' expects {tp.__name__}, got {value!r}")
    if tp is float and not math.isfinite(value):
        raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"config key '{key}' must be one of {', '.join(map(repr, meta['choices']))}, got {value!r}")
    return value


def _apply(obj, data: dict, prefix: str = "") -> None:
    names = {f.name: f for f in fields(obj)}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{path}'{hint}; valid keys here: {', '.join(names)}")
        current = getattr(obj, key)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{path}' is a section; expected a mapping, got {value!r}")
            _apply(current, value, f"{path}.")
        else:
            setattr(obj, key, _coerce(path, value, (type(obj), key), names[key].metadata))


def parse_overrides(items: list[str]) -> dict:
    """``["train.steps=10", "model.channel_mult=[1,2]"]`` -> nested dict (values parsed as YAML)."""
    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(raw) if raw != "" else ""
    return out


#: keys that a run folder written before they existed may lack (they take their defaults)
ADDED_KEYS = {"train.keep_checkpoints", "model.inpainting", "adapter", "distill",
              *(f"adapter.{k}" for k in ("images", "caption", "rank", "alpha", "convs", "prior_images", "image_encoder",
                                         "tokens", "image_dropout", "colour_captions"))}

POSITIVE = ("model.channels", "model.num_res_blocks", "model.transformer_depth", "model.text_max_length",
            "model.head_dim", "model.groups", "vae.groups", "vae.num_res_blocks", "diffusion.timesteps",
            "diffusion.sigma_data", "diffusion.min_snr_gamma", "data.image_size", "train.steps", "train.batch_size",
            "train.grad_accum", "train.lr", "train.checkpoint_every", "train.keep_checkpoints", "train.log_every",
            "eval.steps", "eval.n_samples", "eval.batch_size")
NON_NEGATIVE = ("train.warmup", "train.weight_decay", "train.grad_clip", "train.threads", "train.sample_every",
                "vae.beta")
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _value(cfg: Config, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _check_ranges(cfg: Config) -> None:
    for key in POSITIVE:
        value = _value(cfg, key)
        if value <= 0:
            raise ConfigError(f"config key '{key}' must be {'>= 1' if isinstance(value, int) else '> 0'}, got {value}")
    for key in NON_NEGATIVE:
        if _value(cfg, key) < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {_value(cfg, key)}")
    if not 0 <= cfg.model.dropout < 1:
        raise ConfigError(f"config key 'model.dropout' must lie in [0, 1), got {cfg.model.dropout}")
    if not DEVICE.fullmatch(cfg.train.device):
        raise ConfigError(f"config key 'train.device' must be auto, cpu, cuda, cuda:<index> or mps, got {cfg.train.device!r}")
    levels = len(cfg.model.channel_mult)
    wrong = [a for a in cfg.model.attn_levels if not 0 <= a < levels]
    if wrong:
        raise ConfigError(f"config key 'model.attn_levels' names levels {wrong}; the U-Net has levels 0 .. {levels - 1} "
                          f"(one per entry of model.channel_mult)")
    spacings = schedules.build(cfg.diffusion.schedule, cfg.diffusion.timesteps).spacings
    if cfg.eval.spacing and cfg.eval.spacing not in spacings:
        raise ConfigError(f"config key 'eval.spacing' must be one of {', '.join(spacings)} for the "
                          f"{cfg.diffusion.schedule} schedule (or empty for its own grid), got {cfg.eval.spacing!r}")


def validate(cfg: Config) -> Config:
    m, t = cfg.model, cfg.train
    if not m.channel_mult or any(v < 1 for v in m.channel_mult):
        raise ConfigError(f"config key 'model.channel_mult' must be a non-empty list of positive ints, got {m.channel_mult}")
    _check_ranges(cfg)
    widths = [m.channels * k for k in m.channel_mult]
    if any(w % m.groups for w in widths):
        raise ConfigError(f"config key 'model.groups' ({m.groups}) must divide every level width {widths}")
    if not 0 <= t.label_dropout < 1 or not 0 <= cfg.data.holdout < 1 or not 0 <= t.ema_decay < 1:
        raise ConfigError("train.label_dropout, data.holdout and train.ema_decay must lie in [0, 1)")
    if cfg.data.dataset == "digits" and (cfg.data.image_size, cfg.data.channels) != (8, 1):
        raise ConfigError("digits are 8x8 greyscale: data.image_size must be 8 and data.channels 1, "
                          f"got {cfg.data.image_size} and {cfg.data.channels}")
    if cfg.data.dataset == "folder" and not cfg.data.path:
        raise ConfigError("config key 'data.path' must name an image folder when data.dataset=folder")
    if not 0 <= cfg.eval.guidance_rescale <= 1:
        raise ConfigError(f"config key 'eval.guidance_rescale' must lie in [0, 1], got {cfg.eval.guidance_rescale}")
    if m.text_encoder and not (m.attn_levels or m.mid_attn):
        raise ConfigError("a text model cross-attends at its attention levels: set model.attn_levels or model.mid_attn")
    d = cfg.data
    if d.dataset == "shapes":
        if d.channels != 3:
            raise ConfigError(f"shapes are RGB: data.channels must be 3, got {d.channels}")
        if not 1 <= d.min_objects <= d.max_objects <= 3 or d.scenes < 1:
            raise ConfigError("shapes need 1 <= data.min_objects <= data.max_objects <= 3 and data.scenes >= 1, "
                              f"got {d.min_objects}, {d.max_objects}, {d.scenes}")
        if d.conditional and not m.text_encoder:
            raise ConfigError("shapes are captioned: set model.text_encoder (minilm or clip), "
                              "or data.conditional=false for an unconditional model")
    elif m.text_encoder:
        raise ConfigError(f"model.text_encoder={m.text_encoder!r} needs captioned data (data.dataset=shapes), "
                          f"got data.dataset={d.dataset}")
    a = cfg.adapter
    if a.kind and not a.base:
        raise ConfigError(f"adapter.kind={a.kind} trains on a frozen base: set adapter.base to its run folder")
    if a.kind == "lora" and not (a.images and a.caption):
        raise ConfigError("adapter.kind=lora fine-tunes on a folder of images with one caption: "
                          "set adapter.images and adapter.caption")
    if a.kind == "ip_adapter" and not a.image_encoder:
        raise ConfigError("adapter.kind=ip_adapter reads images through an image encoder: set adapter.image_encoder "
                          "(train one with `difflab train-image-encoder runs/shapes-clip`)")
    if not 0 <= a.image_dropout < 1 or a.tokens < 1 or a.prior_images < 0:
        raise ConfigError(f"adapter.image_dropout must lie in [0, 1), adapter.tokens be >= 1 and adapter.prior_images "
                          f">= 0, got {a.image_dropout}, {a.tokens} and {a.prior_images}")
    if a.rank < 1 or a.alpha < 0:
        raise ConfigError(f"adapter.rank must be >= 1 and adapter.alpha >= 0, got {a.rank} and {a.alpha}")
    _check_few_step(cfg)
    v = cfg.vae
    if v.latent_channels < 1 or v.channels < 1 or not v.channel_mult or any(k < 1 for k in v.channel_mult):
        raise ConfigError("vae.channels, vae.latent_channels and vae.channel_mult must be positive, "
                          f"got {v.channels}, {v.latent_channels}, {v.channel_mult}")
    if any(v.channels * k % v.groups for k in v.channel_mult):
        raise ConfigError(f"config key 'vae.groups' ({v.groups}) must divide every VAE level width "
                          f"{[v.channels * k for k in v.channel_mult]}")
    if d.image_size % 2 ** (len(m.channel_mult) - 1) and not m.vae:
        raise ConfigError(f"data.image_size ({d.image_size}) must be divisible by the U-Net's downsampling "
                          f"factor 2^(len(model.channel_mult) - 1) = {2 ** (len(m.channel_mult) - 1)}")
    return cfg


def _check_few_step(cfg: Config) -> None:
    d, s = cfg.diffusion, cfg.distill
    if (d.parametrization == "flow") != (d.schedule == "flow"):
        raise ConfigError("rectified flow is a parametrisation and a schedule: set diffusion.parametrization=flow "
                          f"and diffusion.schedule=flow together, got {d.parametrization} and {d.schedule}")
    if d.parametrization == "consistency" and d.schedule != "edm":
        raise ConfigError(f"a consistency model lives on the EDM schedule's levels: set diffusion.schedule=edm, "
                          f"got {d.schedule}")
    if s.method and not s.teacher:
        raise ConfigError(f"distill.method={s.method} learns from a teacher: set distill.teacher to its run folder")
    if s.steps < 2 or s.steps & (s.steps - 1):
        raise ConfigError(f"config key 'distill.steps' must be a power of two >= 2 (it is halved), got {s.steps}")
    if min(s.levels, s.ct_start) < 2 or s.ct_end < s.ct_start or min(s.level_groups, s.pairs, s.pair_steps) < 1:
        raise ConfigError("distill.levels and distill.ct_start must be >= 2, distill.ct_end >= distill.ct_start, and "
                          f"distill.level_groups, pairs, pair_steps >= 1; got {s.levels}, {s.ct_start}, {s.ct_end}, "
                          f"{s.level_groups}, {s.pairs}, {s.pair_steps}")
    if s.guidance < 0:
        raise ConfigError(f"config key 'distill.guidance' must be >= 0, got {s.guidance}")


#: other spellings of a key (the papers' British "parametrisation"; the issue tracker's "model." one)
KEY_ALIASES = {"diffusion.parametrisation": "diffusion.parametrization",
               "model.parametrisation": "diffusion.parametrization",
               "model.parametrization": "diffusion.parametrization"}


def _canonical(data: dict) -> dict:
    """``data`` with aliased keys moved to their own place, and what a parametrisation implies when
    the same source does not name it: the flow schedule for the flow (they only work together), the
    consistency sampler at 1 step for a consistency model (DDIM over one would be wrong)."""
    for alias, key in KEY_ALIASES.items():
        section, leaf = alias.split(".")
        if isinstance(data.get(section), dict) and leaf in data[section]:
            home, own = key.split(".")
            data.setdefault(home, {})[own] = data[section].pop(leaf)
            if not data[section]:
                del data[section]
    d = data.get("diffusion")
    if isinstance(d, dict) and d.get("parametrization") == "flow" and "schedule" not in d:
        d["schedule"] = "flow"
    e = data.get("eval", {})
    if isinstance(d, dict) and d.get("parametrization") == "consistency" and isinstance(e, dict) and "sampler" not in e:
        data["eval"] = {**e, "sampler": "consistency", "steps": e.get("steps", 1)}
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file (if any), then ``key=value`` overrides; validated."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(err).split())}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        _apply(cfg, _canonical(data))
    _apply(cfg, _canonical(parse_overrides(overrides or [])))
    return validate(cfg)


def missing_keys(data: dict, defaults: dict | None = None, prefix: str = "") -> list[str]:
    """The config keys that ``data`` (a run's written config) lacks, less ``ADDED_KEYS``."""
    defaults = Config().to_dict() if defaults is None else defaults
    out = []
    for key, value in defaults.items():
        path = f"{prefix}{key}"
        if key not in data:
            out += [] if path in ADDED_KEYS else [path]
        elif isinstance(value, dict) and isinstance(data[key], dict):
            out += missing_keys(data[key], value, f"{path}.")
    return out


def config_from_dict(data: dict) -> Config:
    cfg = Config()
    _apply(cfg, data)
    return validate(cfg)
