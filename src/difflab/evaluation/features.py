"""Features of evaluation images: 8-bit quantisation, the feature extractors (Inception, digits,
shapes, CLIP), streaming features of sample shards, and reference statistics of an image folder."""
from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import load_image_folder
from ..files import save_npz
from ..metrics import StreamingStats, load_npz, shapes_clip
from ..metrics import inception as inception_metrics
from ..metrics import digits as digits_metrics
from ..metrics import shapes as shapes_metrics
from .samples import shard_is_done, dequantize, quantize, read_shard, shard_path, shard_ranges


EXTRACTORS = ("inception", "digits", "shapes", "clip")


#: extractors with class logits, which the Inception Score needs
WITH_LOGITS = ("inception", "digits")


#: raw feature rows kept per set for KID and precision/recall
KEEP_ROWS = 10_000


@dataclass
class FeatureExtractor:
    """A named feature map of uint8 (N, C, H, W) images: ``fn`` returns (features (N, D), class
    logits (N, K) or None), both float64 numpy arrays. ``logits`` says whether IS is available."""

    name: str
    fn: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]
    logits: bool
    batch_size: int = 200

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        feats, logits = [], []
        for start in range(0, len(images), self.batch_size):
            f, z = self.fn(images[start:start + self.batch_size])
            feats.append(np.asarray(f, np.float64))
            if z is not None:
                logits.append(np.asarray(z, np.float64))
        return np.concatenate(feats), (np.concatenate(logits) if logits else None)


def check_extractor(name: str, shape: Sequence[int]) -> None:
    """Raise a clear error unless extractor ``name`` takes images of ``shape`` (C, H, W)."""
    if name not in EXTRACTORS:
        raise ValueError(f"unknown extractor {name!r}; expected one of {', '.join(EXTRACTORS)}")
    c, h, w = shape
    if name == "digits" and (c, h, w) != (1, 8, 8):
        raise ValueError(f"the digits extractor takes 8x8 greyscale images (1, 8, 8); this run makes {tuple(shape)}")
    if name == "shapes" and (c != 3 or h != w):
        raise ValueError(f"the shapes extractor takes square RGB renders (3, S, S); this run makes {tuple(shape)}")
    if c not in (1, 3):
        raise ValueError(f"extractor {name} takes greyscale or RGB images; this run makes {tuple(shape)}")


def build_extractor(name: str, shape: Sequence[int], *, weights: dict | None = None,
                    device="cpu") -> FeatureExtractor:
    """The extractor ``name`` for images of ``shape`` (C, H, W); see the module docstring."""
    check_extractor(name, shape)
    if name == "inception":
        net = inception_metrics.InceptionFeatures((weights or {}).get("inception"), device=device)

        def inception(u8):
            out = net(torch.from_numpy(u8))  # uint8 passes straight to torch-fidelity's TF1 resize
            return out["pool3"].cpu().numpy(), out["logits"].cpu().numpy()
        return FeatureExtractor(name, inception, logits=True, batch_size=64)
    if name == "digits":
        evaluator = digits_metrics.DigitsEvaluator()  # the classifier `difflab fid-stats --extractor digits` uses

        @torch.no_grad()
        def digits(u8):
            x = dequantize(u8)
            return evaluator.features(x), evaluator.classifier(x).double().numpy()
        return FeatureExtractor(name, digits, logits=True)
    if name == "shapes":
        # only the classifier is used; n_reference=2 keeps the evaluator's own reference renders tiny
        evaluator = shapes_metrics.ShapesEvaluator(shape[1], n_reference=2)
        return FeatureExtractor(name, lambda u8: (evaluator.features(dequantize(u8)), None), logits=False)
    scorer = shapes_clip.image_scorer((weights or {}).get("clip"), device=device)  # or the shapes world's own
    return FeatureExtractor(name, lambda u8: (scorer.clip_features(torch.from_numpy(u8)).numpy(), None),
                            logits=False, batch_size=64)


@dataclass
class FeatureSet:
    """Features of one image set: float64 streaming stats of all rows, the first ``kept`` rows,
    and class logits (float32) when the extractor has them."""

    extractor: str
    stats: StreamingStats
    kept: np.ndarray | None = None
    logits: np.ndarray | None = None

    @property
    def n(self) -> int:
        return self.stats.n


def shard_features(folder, n: int, extractor: FeatureExtractor, *, keep: int = KEEP_ROWS,
                   logits: bool = False, progress: bool = True) -> FeatureSet:
    """Features of samples 0..n-1 read shard by shard from ``folder`` (all shards must exist)."""
    settings = json.loads((Path(folder) / "settings.json").read_text())
    stats, kept, zs = StreamingStats(), [], []
    n_kept = 0
    for k, (start, stop) in enumerate(tqdm(shard_ranges(n, settings["shard_size"]), disable=not progress,
                                           desc=f"{extractor.name} features")):
        path = shard_path(folder, k)
        if not shard_is_done(path, settings, start, stop):
            raise FileNotFoundError(f"shard {path} (samples {start}..{stop - 1}) is missing or incomplete; "
                                    "run generate_shards first")
        f, z = extractor(read_shard(path)[0]["images"][:stop - start])
        if logits and z is None:
            raise ValueError(f"is needs class logits; the {extractor.name} extractor has none")
        stats.update(f)
        if n_kept < keep:
            kept.append(f[:keep - n_kept])
            n_kept += len(kept[-1])
        if logits:
            zs.append(z.astype(np.float32))
    return FeatureSet(extractor.name, stats, np.concatenate(kept) if kept else None,
                      np.concatenate(zs) if logits else None)


@dataclass
class Reference:
    """Reference statistics: Gaussian (mu, sigma) of ``n`` images, extractor name, optional raw
    ``features`` (a random subset, for KID and precision/recall) and where they came from."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    extractor: str
    features: np.ndarray | None = None
    source: str = ""
    image_size: int | None = None


def reference_stats(folder, out=None, *, extractor: str | FeatureExtractor = "inception", image_size: int,
                    channels: int = 3, keep: int = KEEP_ROWS, seed: int = 0, weights: dict | None = None,
                    device="cpu", progress: bool = True) -> Reference:
    """Reference statistics of an image folder, optionally saved to ``out`` (.npz).

    Images are loaded like training data (``difflab.data.load_image_folder``: bicubic shorter side,
    centre crop to ``image_size``, ``channels``), quantised to 8 bits like the samples, and fed to
    the extractor in batches into float64 streaming statistics; a seeded random subset of up to
    ``keep`` rows is kept as raw ``features``. The .npz holds ``mu``, ``sigma``, ``n``,
    ``extractor``, ``image_size``, ``resize`` and ``features`` -- the layout ``difflab fid-stats``
    writes, plus ``features``. Pass ``image_size`` = the run's image size so that reference and
    samples reach the extractor at the same resolution.
    """
    shape = (channels, image_size, image_size)
    ex = extractor if isinstance(extractor, FeatureExtractor) else build_extractor(
        extractor, shape, weights=weights, device=device)
    check_extractor(ex.name, shape)
    images = quantize(load_image_folder(folder, image_size, channels, conditional=False).images)
    rng = np.random.RandomState(seed)
    chosen = np.sort(rng.choice(len(images), min(keep, len(images)), replace=False))
    stats, kept = StreamingStats(), []
    step = max(ex.batch_size, 1000)
    for start in tqdm(range(0, len(images), step), disable=not progress, desc=f"{ex.name} features"):
        f, _ = ex(images[start:start + step])
        stats.update(f)
        rows = chosen[(chosen >= start) & (chosen < start + step)] - start
        kept.append(f[rows])
    ref = Reference(stats.mean, stats.cov, stats.n, ex.name, np.concatenate(kept), str(folder), image_size)
    if out is not None:
        save_npz(out, mu=ref.mu, sigma=ref.sigma, n=np.asarray(ref.n), extractor=np.asarray(ref.extractor),
                 image_size=np.asarray(image_size), features=ref.features,
                 resize=np.asarray(f"bicubic shorter side + centre crop to {image_size}, uint8"))
    return ref


def load_reference(path, extractor: str | None = None) -> Reference:
    """Read an .npz of reference statistics (ours, ``difflab fid-stats``', pytorch-fid's or clean-fid's)
    and refuse one whose extractor differs from ``extractor``. Files without an ``extractor`` key
    (pytorch-fid, clean-fid) are taken as Inception statistics, with a warning."""
    d = load_npz(path)
    found = d.get("extractor")
    if found is None:
        if extractor not in (None, "inception"):
            raise ValueError(f"reference {path} records no extractor (pytorch-fid / clean-fid layout, Inception "
                             f"features); it cannot be compared with {extractor} features")
        warnings.warn(f"reference {path} records no extractor; assuming Inception pool3 features (its resize "
                      "may differ from ours)", RuntimeWarning)
        found = "inception"
    if extractor is not None and found != extractor:
        raise ValueError(f"reference {path} holds {found} features, but the {extractor} extractor was requested; "
                         f"use --extractor {found} or reference statistics made with {extractor}")
    if found not in EXTRACTORS:
        raise ValueError(f"reference {path}: unknown extractor {found!r}; expected one of {', '.join(EXTRACTORS)}")
    n = d.get("n")
    return Reference(d["mu"], d["sigma"], None if n is None else int(n), found, d.get("features"), str(path),
                     d.get("image_size"))
