"""The Python face: load a run folder, sample it, save the samples, evaluate it.

    pipe = difflab.load("runs/digits")
    images = pipe(n=16, labels=[3] * 16, sampler="ddim", steps=50, guidance=3, seed=0)
    save_samples(images, "sevens.png")
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .evaluation import evaluate, evaluate_against_reference, format_evaluation, format_metrics, reference_stats
from .files import save_npz
from .images import save_grid
from .loading import Pipeline, load

__all__ = ["Pipeline", "check_output", "evaluate", "evaluate_against_reference", "fid_stats", "format_evaluation", "format_metrics",
           "load", "save_samples"]


IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


def check_output(out: Path, suffixes=(".png", ".jpg", ".jpeg", ".npz")) -> str:
    """The lower-case suffix of an output file name, which says its format: one of ``suffixes``, in a
    folder that is (or can be made) a folder; checked before the work that makes the output."""
    suffix = Path(out).suffix.lower()
    if suffix not in suffixes:
        raise ValueError(f"output {out}: expected a {', '.join(suffixes)} file name, got suffix "
                         f"{Path(out).suffix or '(none)'!r}")
    folder = next(p for p in Path(out).absolute().parents if p.exists())
    if not folder.is_dir():
        raise ValueError(f"output {out}: {folder} is a file, not a folder")
    return suffix


def save_samples(images: torch.Tensor, out: Path, labels=None, nrow: int = 8) -> list[Path]:
    """The samples at ``out``, in the format its suffix names: a ``.png`` / ``.jpg`` grid, with the raw
    samples (float32, [-1, 1]) and their labels beside it as ``.npz``; or ``.npz`` alone."""
    out = Path(out)
    suffix = check_output(out)
    written = []
    if suffix in IMAGE_FORMATS:
        written.append(save_grid(images, out, nrow=nrow, format=IMAGE_FORMATS[suffix]))
    arrays = {"images": images.numpy()}
    if labels is not None:
        arrays["labels"] = np.asarray(labels)
    npz = out.with_suffix(".npz")
    save_npz(npz, **arrays)
    return written + [npz]


def fid_stats(folder, out, *, extractor: str = "inception", image_size: int | None = None,
              weights: str | None = None, clip: str | None = None, progress: bool = True) -> dict:
    """Reference statistics of an image folder for ``difflab eval --ref`` (``mu``, ``sigma``, ``n``,
    extractor, resize and up to 10k raw feature rows for KID / precision-recall).

    ``extractor``: ``inception`` (FID), ``digits`` or ``shapes`` (offline classifiers) or ``clip``
    (CLIP-FID, weights from ``clip`` or $DIFFLAB_CLIP_PATH). Images are resized (shorter side) and
    centre-cropped to ``image_size`` -- give the evaluated run's image size, so that real images
    and samples reach the extractor at the same resolution (default: 8 for digits, else 32).
    """
    size = image_size or (8 if extractor == "digits" else 32)
    channels = 1 if extractor == "digits" else 3
    ref = reference_stats(folder, out, extractor=extractor, image_size=size, channels=channels,
                          weights={"inception": weights, "clip": clip}, progress=progress)
    return {"extractor": ref.extractor, "n": ref.n, "image_size": size}
