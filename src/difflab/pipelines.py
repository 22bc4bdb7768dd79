"""Load a run folder and generate or evaluate from it.

    pipe = difflab.load("runs/digits")
    images = pipe(n=16, labels=[3] * 16, sampler="ddim", steps=50, guidance=3, seed=0)
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from .conditioning import ClassConditioner, TextConditioner, conditioner_for
from .config import Config, config_from_dict
from .files import save_npz
from .generate import generate
from .train import build_denoiser, build_unet
from .train.build import data_shape
from .train import checkpoint as ckpt
from .train.trainer import TEXT_ENCODER_FILE, resolve_device


class Pipeline:
    """A trained denoiser (EMA weights by default) with its config and conditioner, and for a latent
    model the VAE whose latents it generates (decoded, scaling undone, before they are returned)."""

    def __init__(self, cfg: Config, denoiser, conditioner=None, run: Path | None = None, vae=None):
        if isinstance(conditioner, int):  # the earlier signature took num_classes
            conditioner = ClassConditioner(conditioner)
        self.cfg, self.denoiser, self.conditioner, self.run = cfg, denoiser.eval(), conditioner, run
        self.vae = vae
        if (vae is None) != (not cfg.model.vae):
            raise ValueError(f"model.vae={cfg.model.vae!r}: a latent model needs its VAE and a pixel model none")

    @property
    def num_classes(self) -> int | None:
        return self.conditioner.num_classes if isinstance(self.conditioner, ClassConditioner) else None

    @property
    def is_text(self) -> bool:
        return isinstance(self.conditioner, TextConditioner)

    @property
    def shape(self) -> tuple[int, int, int]:
        """The (C, H, W) of the images the pipeline returns."""
        d = self.cfg.data
        return (d.channels, d.image_size, d.image_size)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """The (C, H, W) the denoiser generates: the images, or their VAE latents."""
        return data_shape(self.cfg)

    def decode(self, z: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Images from generated latents, in slices of ``batch_size`` (bounded decoder memory)."""
        from .latents import decode_latents

        return z if self.vae is None else decode_latents(self.vae, z, batch_size)

    def conds(self, n: int, labels=None, prompt=None, negative_prompt: str | None = None):
        """(cond, null_cond) for ``n`` samples: class labels (cycling through the classes by
        default) or prompts (one string for all, or one per sample); None for unconditional models."""
        if self.is_text:
            if labels is not None:
                raise ValueError("this model is text-conditional; pass prompt=..., not labels")
            if prompt is None:
                raise ValueError("this model is text-conditional: pass prompt='a red circle' (or a list of n prompts)")
            prompts = [prompt] * n if isinstance(prompt, str) else list(prompt)
            if len(prompts) != n:
                raise ValueError(f"expected a string or a list of {n} prompts, got a list of {len(prompts)}")
            negative = self.cfg.eval.negative_prompt if negative_prompt is None else negative_prompt
            return self.conditioner.encode(prompts), self.conditioner.encode([negative])
        if prompt is not None or negative_prompt:
            raise ValueError("this model is not text-conditional; it takes no prompt")
        if self.num_classes:
            labels = torch.arange(n) % self.num_classes if labels is None else torch.as_tensor(labels).long()
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(f"labels must lie in [0, {self.num_classes - 1}], got {labels.tolist()}")
            return self.conditioner.cond(labels), self.conditioner.null()
        if labels is not None:
            raise ValueError("this model is unconditional; it takes no labels")
        return None, None

    def __call__(self, prompt=None, n: int = 64, labels=None, *, negative_prompt: str | None = None,
                 sampler: str | None = None, steps: int | None = None, spacing: str | None = None,
                 guidance: float | None = None, guidance_rescale: float | None = None, guide=None, seed: int = 0,
                 first_index: int = 0, batch_size: int = 256, progress: bool = True,
                 **sampler_kwargs) -> torch.Tensor:
        """``n`` images in [-1, 1], (n, C, H, W).

        Text models take ``prompt`` (one string or n) and an optional ``negative_prompt``; class
        models cycle through the classes unless ``labels`` are given. ``guidance`` 1 =
        conditional, 0 = unconditional; ``guide`` replaces classifier-free guidance (see
        ``generate``)."""
        if not (prompt is None or isinstance(prompt, (str, list, tuple))):
            raise TypeError(f"prompt must be a string or a list of strings, got {prompt!r} (pass the count as n=...)")
        e = self.cfg.eval
        cond, null = self.conds(n, labels, prompt, negative_prompt)
        x = generate(self.denoiser, self.latent_shape, n, cond=cond, null_cond=null,
                     sampler=sampler or e.sampler, steps=steps or e.steps, spacing=spacing or e.spacing,
                     guidance=e.guidance if guidance is None else guidance,
                     guidance_rescale=e.guidance_rescale if guidance_rescale is None else guidance_rescale,
                     guide=guide, seed=seed, first_index=first_index, batch_size=batch_size, progress=progress,
                     **sampler_kwargs)
        return self.decode(x, batch_size).clamp(-1, 1)


def load(run, weights: str = "ema", device: str = "auto") -> Pipeline:
    """The pipeline of a run folder; ``weights`` is ``ema`` or ``model``."""
    run = ckpt.check_run(Path(run))
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    cfg = config_from_dict(ckpt.read_config_dict(run))
    path = run / f"{weights}.safetensors"
    with safe_open(str(path), "pt") as f:
        num_classes = f.get_slice("label_emb.weight").get_shape()[0] - 1 if "label_emb.weight" in f.keys() else None
    conditioner = conditioner_for(cfg, num_classes=num_classes, progress=False)
    if isinstance(conditioner, TextConditioner) and (run / TEXT_ENCODER_FILE).exists():
        conditioner.check_identity(json.loads((run / TEXT_ENCODER_FILE).read_text()), run)
    vae = None
    if cfg.model.vae:
        from .latents import VAE_FILE, check_vae, load_vae, vae_identity

        vae = load_vae(cfg.model.vae, resolve_device(device))
        if (run / VAE_FILE).exists():
            check_vae(json.loads((run / VAE_FILE).read_text()), vae_identity(vae, cfg.model.vae), run)
    net = build_unet(cfg, conditioner)
    ckpt.load_weights(path, net)
    denoiser = build_denoiser(cfg, net).to(resolve_device(device))
    return Pipeline(cfg, denoiser, conditioner, run, vae)


def save_samples(images: torch.Tensor, out: Path, labels=None, nrow: int = 8) -> list[Path]:
    """A PNG grid at ``out`` and the raw samples (float32, [-1, 1]) beside it as ``.npz``."""
    from .images import save_grid

    out = Path(out)
    png = save_grid(images, out, nrow=nrow)
    npz = out.with_suffix(".npz")
    arrays = {"images": images.numpy()}
    if labels is not None:
        arrays["labels"] = np.asarray(labels)
    save_npz(npz, **arrays)
    return [png, npz]


def _guidance_scales(e, guidance, extra_guidance) -> list[float]:
    scales = [e.guidance if guidance is None else guidance]
    return scales + [g for g in (e.extra_guidance if extra_guidance is None else extra_guidance) if g not in scales]


def evaluate(run, *, sampler: str | None = None, steps: int | None = None, guidance: float | None = None,
             extra_guidance=None, n: int | None = None, seed: int | None = None, progress: bool = True) -> dict:
    """Evaluate a run at its guidance scale and a sweep of others; writes ``metrics.json``.

    Class-conditional digits: class accuracy and Fréchet distance in an independent classifier's
    features (``difflab.metrics.digits``). Text-conditional shapes: prompt alignment (colour and
    shape of single-object prompts) and Fréchet distance under the shapes attribute classifier
    (``difflab.metrics.shapes``), plus the fidelity-vs-alignment curve as ``guidance_sweep.png``.
    """
    pipe = load(run)
    cfg, e = pipe.cfg, pipe.cfg.eval
    if cfg.data.dataset == "shapes" and pipe.is_text:
        score_fn, references = _shapes_scorer(pipe, n)
    elif cfg.data.dataset == "digits" and pipe.num_classes == 10:
        score_fn, references = _digits_scorer(pipe)
    else:
        raise ValueError("difflab eval scores class-conditional digits runs and text-conditional shapes runs "
                         f"(this run: data.dataset={cfg.data.dataset}, conditional={cfg.data.conditional})")
    sampler, steps = sampler or e.sampler, steps or e.steps
    n, seed = n or e.n_samples, e.seed if seed is None else seed
    t0 = time.time()
    sweep = [{"guidance": g, **score_fn(n, g, dict(sampler=sampler, steps=steps, seed=seed, batch_size=e.batch_size,
                                                     progress=progress))}
             for g in _guidance_scales(e, guidance, extra_guidance)]
    state = ckpt.load_trainer_state(pipe.run)
    metrics = {**sweep[0], **references(n, seed), "dataset": cfg.data.dataset, "sampler": sampler, "steps": steps,
               "spacing": e.spacing or pipe.denoiser.schedule.spacings[0], "n_samples": n,
               "train_steps": state["step"], "train_seconds": round(state.get("seconds", float("nan")), 1),
               "eval_seconds": round(time.time() - t0, 1), "sweep": sweep}
    if cfg.data.dataset == "shapes":
        metrics["plot"] = str(plot_guidance_sweep(sweep, pipe.run / "guidance_sweep.png"))
    ckpt.write_json(pipe.run / "metrics.json", metrics)
    return metrics


def _digits_scorer(pipe):
    from .metrics.digits import DigitsEvaluator

    evaluator = DigitsEvaluator(pipe.cfg.data.holdout)

    def score(n, g, kw):
        labels = torch.arange(n) % 10
        return evaluator.score(pipe(n=n, labels=labels, guidance=g, **kw), labels)
    return score, evaluator.references


def single_object_prompts(n: int) -> tuple[list[str], list[str], list[str]]:
    """``n`` prompts "a {colour} {shape}" cycling through every colour-shape pair, with their attributes."""
    from .data.shapes import COLOURS, SHAPES, prompt

    pairs = [(c, s) for s in SHAPES for c in COLOURS]
    chosen = [pairs[i % len(pairs)] for i in range(n)]
    return [prompt(c, s) for c, s in chosen], [c for c, _ in chosen], [s for _, s in chosen]


def _shapes_scorer(pipe, n: int | None = None):
    from .metrics.shapes import ShapesEvaluator

    # as many real renders as samples, so the samples' Fréchet and the real-vs-real floor share their bias
    evaluator = ShapesEvaluator(pipe.cfg.data.image_size, min_objects=1, max_objects=1,
                                n_reference=n or pipe.cfg.eval.n_samples)

    def score(n, g, kw):
        prompts, colours, shapes = single_object_prompts(n)
        return evaluator.score(pipe(prompts, n=n, guidance=g, **kw), colours, shapes)
    return score, lambda n, seed: evaluator.references()


def plot_guidance_sweep(sweep: list[dict], path) -> Path:
    """Fidelity (Fréchet distance, lower is better) against prompt alignment, one point per guidance scale."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    rows = sorted(sweep, key=lambda r: r["guidance"])
    fig = Figure(figsize=(5, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([r["frechet"] for r in rows], [r["both_accuracy"] for r in rows], "o-")
    for r in rows:
        ax.annotate(f"w={r['guidance']:g}", (r["frechet"], r["both_accuracy"]), textcoords="offset points",
                    xytext=(4, -10 if r["guidance"] % 2 else 4), fontsize=8)
    ax.set_xscale("log")  # the unguided point sits an order of magnitude away from the guided ones
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("Fréchet distance to real renders (attribute-classifier features, log)")
    ax.set_ylabel("prompt alignment (colour and shape correct)")
    ax.set_title("Classifier-free guidance sweep")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def format_metrics(m: dict) -> str:
    """A small table: one row per guidance scale plus the reference lines."""
    shapes = m.get("dataset") == "shapes"
    cols = ("colour acc.", "shape acc.", "both", "Fréchet") if shapes else ("class acc.", "Fréchet")
    keys = ("colour_accuracy", "shape_accuracy", "both_accuracy", "frechet") if shapes else \
        ("class_accuracy", "frechet_samples")
    rows = [("what", *cols)]
    for s in sorted(m["sweep"], key=lambda r: r["guidance"]) if shapes else m["sweep"]:
        rows.append((f"{m['sampler']}-{m['steps']} guidance {s['guidance']:g}", *(f"{s[k]:.3f}" for k in keys)))
    if shapes:
        rows.append(("real held-out renders", f"{m['classifier_colour_accuracy']:.3f}",
                     f"{m['classifier_shape_accuracy']:.3f}", f"{m['classifier_both_accuracy']:.3f}",
                     f"{m['frechet_floor']:.3f}"))
        rows.append(("uniform noise", "-", "-", "-", f"{m['frechet_noise']:.3f}"))
    else:
        rows.append(("floor: real train vs held-out", "-", f"{m['frechet_floor']:.3f}"))
        rows.append(("baseline: per-class pixel Gaussian", f"{m['baseline_class_accuracy']:.3f}",
                     f"{m['frechet_baseline']:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    extra = "" if shapes else f"; classifier held-out accuracy {m['classifier_heldout_accuracy']:.3f}"
    lines.append(f"(n = {m['n_samples']} samples{extra}; train {m['train_seconds']} s, eval {m['eval_seconds']} s)")
    if m.get("plot"):
        lines.append(f"fidelity-vs-alignment plot: {m['plot']}")
    return "\n".join(lines)


def fid_stats(folder, out, *, extractor: str = "inception", image_size: int | None = None,
              weights: str | None = None, clip: str | None = None, progress: bool = True) -> dict:
    """Reference statistics of an image folder for ``difflab eval --ref`` (``mu``, ``sigma``, ``n``,
    extractor, resize and up to 10k raw feature rows for KID / precision-recall).

    ``extractor``: ``inception`` (FID), ``digits`` or ``shapes`` (offline classifiers) or ``clip``
    (CLIP-FID, weights from ``clip`` or $DIFFLAB_CLIP_PATH). Images are resized (shorter side) and
    centre-cropped to ``image_size`` -- give the evaluated run's image size, so that real images
    and samples reach the extractor at the same resolution (default: 8 for digits, else 32).
    """
    from .evaluation import reference_stats

    size = image_size or (8 if extractor == "digits" else 32)
    channels = 1 if extractor == "digits" else 3
    ref = reference_stats(folder, out, extractor=extractor, image_size=size, channels=channels, clip=clip,
                          inception_weights=weights, progress=progress)
    return {"extractor": ref.extractor, "n": ref.n, "image_size": size}
