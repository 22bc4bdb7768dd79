"""Load a run folder and generate or evaluate from it.

    pipe = difflab.load("runs/digits")
    images = pipe(n=16, labels=[3] * 16, sampler="ddim", steps=50, guidance=3, seed=0)
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from .config import Config, config_from_dict
from .files import save_npz
from .generate import generate
from .train import build_denoiser, build_unet
from .train import checkpoint as ckpt
from .train.trainer import resolve_device


class Pipeline:
    """A trained denoiser (EMA weights by default) with its config."""

    def __init__(self, cfg: Config, denoiser, num_classes: int | None, run: Path | None = None):
        self.cfg, self.denoiser, self.num_classes, self.run = cfg, denoiser.eval(), num_classes, run

    @property
    def shape(self) -> tuple[int, int, int]:
        d = self.cfg.data
        return (d.channels, d.image_size, d.image_size)

    def __call__(self, n: int = 64, labels=None, *, sampler: str | None = None, steps: int | None = None,
                 spacing: str | None = None, guidance: float | None = None, seed: int = 0,
                 batch_size: int = 256, progress: bool = True, **sampler_kwargs) -> torch.Tensor:
        """``n`` images in [-1, 1], (n, C, H, W). Class-conditional models cycle through the
        classes unless ``labels`` are given; ``guidance`` 1 = conditional, 0 = unconditional."""
        e = self.cfg.eval
        if self.num_classes:
            labels = torch.arange(n) % self.num_classes if labels is None else torch.as_tensor(labels).long()
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(f"labels must lie in [0, {self.num_classes - 1}], got {labels.tolist()}")
        elif labels is not None:
            raise ValueError("this model is unconditional; it takes no labels")
        x = generate(self.denoiser, self.shape, n, labels=labels, null_label=self.num_classes,
                     sampler=sampler or e.sampler, steps=steps or e.steps, spacing=spacing or e.spacing,
                     guidance=e.guidance if guidance is None else guidance, seed=seed,
                     batch_size=batch_size, progress=progress, **sampler_kwargs)
        return x.clamp(-1, 1)


def load(run, weights: str = "ema", device: str = "auto") -> Pipeline:
    """The pipeline of a run folder; ``weights`` is ``ema`` or ``model``."""
    run = ckpt.check_run(Path(run))
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    cfg = config_from_dict(ckpt.read_config_dict(run))
    path = run / f"{weights}.safetensors"
    with safe_open(str(path), "pt") as f:
        num_classes = f.get_slice("label_emb.weight").get_shape()[0] - 1 if "label_emb.weight" in f.keys() else None
    net = build_unet(cfg, num_classes)
    ckpt.load_weights(path, net)
    denoiser = build_denoiser(cfg, net).to(resolve_device(device))
    return Pipeline(cfg, denoiser, num_classes, run)


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


def evaluate(run, *, sampler: str | None = None, steps: int | None = None, guidance: float | None = None,
             extra_guidance=None, n: int | None = None, seed: int | None = None, progress: bool = True) -> dict:
    """Digits evaluation of a run (see ``difflab.metrics.digits``); writes ``metrics.json``."""
    from .metrics.digits import DigitsEvaluator

    pipe = load(run)
    cfg, e = pipe.cfg, pipe.cfg.eval
    if cfg.data.dataset != "digits" or pipe.num_classes != 10:
        raise ValueError("difflab eval currently scores class-conditional digits runs only "
                         f"(this run trains on data.dataset={cfg.data.dataset})")
    sampler, steps = sampler or e.sampler, steps or e.steps
    n, seed = n or e.n_samples, e.seed if seed is None else seed
    scales = [e.guidance if guidance is None else guidance]
    scales += [g for g in (e.extra_guidance if extra_guidance is None else extra_guidance) if g not in scales]
    t0 = time.time()
    evaluator = DigitsEvaluator(cfg.data.holdout)
    labels = torch.arange(n) % 10
    sweep = []
    for g in scales:
        x = pipe(n, labels, sampler=sampler, steps=steps, guidance=g, seed=seed,
                 batch_size=e.batch_size, progress=progress)
        sweep.append({"guidance": g, **evaluator.score(x, labels)})
    state = ckpt.load_trainer_state(pipe.run)
    metrics = {**sweep[0], **evaluator.references(n, seed), "sampler": sampler, "steps": steps,
               "spacing": e.spacing or pipe.denoiser.schedule.spacings[0], "n_samples": n, "train_steps": state["step"],
               "train_seconds": round(state.get("seconds", float("nan")), 1),
               "eval_seconds": round(time.time() - t0, 1), "sweep": sweep}
    ckpt.write_json(pipe.run / "metrics.json", metrics)
    return metrics


def format_metrics(m: dict) -> str:
    """A small table: one row per guidance scale plus the two reference lines."""
    rows = [("what", "class acc.", "Fréchet")]
    for s in m["sweep"]:
        rows.append((f"{m['sampler']}-{m['steps']} guidance {s['guidance']:g}",
                     f"{s['class_accuracy']:.3f}", f"{s['frechet_samples']:.3f}"))
    rows.append(("floor: real train vs held-out", "-", f"{m['frechet_floor']:.3f}"))
    rows.append(("baseline: per-class pixel Gaussian", f"{m['baseline_class_accuracy']:.3f}",
                 f"{m['frechet_baseline']:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"(n = {m['n_samples']} samples; classifier held-out accuracy "
                 f"{m['classifier_heldout_accuracy']:.3f}; train {m['train_seconds']} s, eval {m['eval_seconds']} s)")
    return "\n".join(lines)


def fid_stats(folder, out, *, extractor: str = "inception", image_size: int | None = None,
              weights: str | None = None, batch_size: int = 64, progress: bool = True) -> dict:
    """Reference statistics (``mu``, ``sigma``, with extractor, resize and n recorded) of an image folder.

    ``extractor`` is ``inception`` (the FID network; 299x299 TF1 resize inside, images first
    resized/cropped to ``image_size``, default 299) or ``digits`` (the digits evaluation
    classifier; greyscale 8x8). Features stream through float64 accumulators in batches.
    """
    from tqdm.auto import tqdm

    from .data import load_image_folder
    from .metrics import StreamingStats

    if extractor == "inception":
        from .metrics.inception import InceptionFeatures

        net, channels, size = InceptionFeatures(weights), 3, image_size or 299
        features = lambda x: net(x)["pool3"]  # noqa: E731
    elif extractor == "digits":
        from .metrics.digits import DigitsEvaluator

        evaluator, channels, size = DigitsEvaluator(), 1, image_size or 8
        if size != 8:
            raise ValueError(f"the digits extractor takes 8x8 images, got image_size={size}")
        features = evaluator.features
    else:
        raise ValueError(f"unknown extractor {extractor!r}; expected inception or digits")
    images = load_image_folder(folder, size, channels, conditional=False).images
    stats = StreamingStats()
    for start in tqdm(range(0, len(images), batch_size), disable=not progress, desc="features"):
        stats.update(features(images[start:start + batch_size]))
    meta = {"extractor": extractor, "resize": f"bicubic shorter side + centre crop to {size}"}
    stats.save_npz(out, **meta)
    return {**meta, "n": stats.n}
