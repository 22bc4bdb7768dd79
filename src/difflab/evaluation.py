"""Large-sample evaluation of a run against reference statistics: FID, KID, IS, precision/recall.

    difflab eval --run runs/cifar --n 50000 --ref cifar-train.npz --metrics fid,kid,is,pr
    torchrun --nproc_per_node=8 -m difflab.cli eval --run runs/cifar --n 50000 --ref cifar-train.npz

Samples (the pipeline's images, in [-1, 1]) are generated in shards of ``shard_size`` sample
indices; shard k holds samples [k * shard_size, (k + 1) * shard_size) and is made by rank
k % world_size. Generation is seeded per sample index (``difflab.generate.sample_seeds``), so a
shard's content does not depend on the rank that made it, on the batch size or on the number of
ranks (up to float round-off of batched kernels, which can move a pixel by one 8-bit level).

Shards are stored quantised to 8 bits, ``round((x + 1) * 127.5)`` as uint8 -- exactly what a PNG
of the sample holds and what ``InceptionFeatures`` feeds the network: FID (Heusel et al. 2017) and
the other Inception metrics are defined on 8-bit images. Each shard is written atomically
(``shard_{k:05d}.npz``: ``images`` (m, C, H, W) uint8, ``index`` (m,), ``labels`` or ``prompts``,
and ``meta``, a JSON string with the run, the weights' SHA-256 and train step, sampler, steps,
spacing, guidance, seed, n and shard_size). The default sample folder is
``<run>/eval/samples/<settings hash>``, keyed by a hash of everything that decides the pixels
(weights, model/diffusion/data config, sampler, steps, spacing, guidance, guidance rescale, seed,
shard size; not n): a rerun with the same settings skips finished shards (resumable, and a larger
n reuses the smaller run's shards), other settings get another folder. An explicit folder that
already holds shards of other settings is refused with an error naming the differences.

Features are accumulated shard by shard in float64 :class:`~difflab.metrics.StreamingStats`, so
the N samples never sit in memory for FID. KID and precision/recall need raw features of both
sets: the first ``keep`` (default :data:`KEEP_ROWS` = 10,000) sample rows are kept (samples are
i.i.d., so the first rows are a uniform subset) and the reference keeps a seeded random subset of
as many rows. The Inception Score keeps every sample's class logits (float32; 4 KB per sample for
Inception's 1008 classes, 200 MB at N = 50,000) and follows torch-fidelity's splits.

Extractors (``--extractor``): ``inception`` (the FID network's pool3 2048-d features and its
logits for IS; resizes to 299 itself), ``digits`` (the digits evaluation classifier's 64-d
features and 10-class logits; 8x8 greyscale runs, offline), ``shapes`` (the shapes attribute
classifier's 128-d features; shapes runs, offline; no IS) and ``clip`` (CLIP image embeddings for
CLIP-FID, Kynkäänniemi et al. ICLR 2023; a local CLIP folder from ``clip=`` or
``$DIFFLAB_CLIP_PATH``; no IS). Every number is reported next to the N it was computed on: FID
and KID are biased estimators whose value depends on N (Bińkowski et al. 2018; Chong & Forsyth,
CVPR 2020).
"""
from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .files import save_npz
from .train.checkpoint import weights_sha256
from .metrics import (
    StreamingStats,
    frechet_distance,
    inception_score,
    kid,
    load_npz,
    precision_recall,
)

METRICS = ("fid", "kid", "is", "pr")
EXTRACTORS = ("inception", "digits", "shapes", "clip")
#: extractors with class logits, which the Inception Score needs
WITH_LOGITS = ("inception", "digits")
#: raw feature rows kept per set for KID and precision/recall
KEEP_ROWS = 10_000
#: bump when the shard layout changes, so old shard folders are not mistaken for new ones
SHARD_FORMAT = 1
#: KID's subset size (torch-fidelity's default), reduced to the rows available
KID_SUBSET_SIZE = 1000
IS_SPLITS = 10
PR_K = 3


# ----------------------------------------------------------------------------- 8-bit images
def quantize(images: torch.Tensor) -> np.ndarray:
    """Float images in [-1, 1] -> uint8 ``round((x + 1) * 127.5)``, the 8-bit image a PNG holds."""
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def dequantize(images: np.ndarray) -> torch.Tensor:
    """uint8 images -> float32 in [-1, 1] (``u / 127.5 - 1``), the inverse of :func:`quantize` on its grid."""
    return torch.from_numpy(np.asarray(images, np.uint8)).float() / 127.5 - 1


# ----------------------------------------------------------------------------- feature extractors
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


def build_extractor(name: str, shape: Sequence[int], *, clip=None, inception_weights=None,
                    device="cpu") -> FeatureExtractor:
    """The extractor ``name`` for images of ``shape`` (C, H, W); see the module docstring."""
    check_extractor(name, shape)
    if name == "inception":
        from .metrics.inception import InceptionFeatures

        net = InceptionFeatures(inception_weights, device=device)

        def inception(u8):
            out = net(torch.from_numpy(u8))  # uint8 passes straight to torch-fidelity's TF1 resize
            return out["pool3"].cpu().numpy(), out["logits"].cpu().numpy()
        return FeatureExtractor(name, inception, logits=True, batch_size=64)
    if name == "digits":
        from .metrics.digits import DigitsEvaluator

        evaluator = DigitsEvaluator()  # the classifier `difflab fid-stats --extractor digits` uses

        @torch.no_grad()
        def digits(u8):
            x = dequantize(u8)
            return evaluator.features(x), evaluator.classifier(x).double().numpy()
        return FeatureExtractor(name, digits, logits=True)
    if name == "shapes":
        from .metrics.shapes import ShapesEvaluator

        # only the classifier is used; n_reference=2 keeps the evaluator's own reference renders tiny
        evaluator = ShapesEvaluator(shape[1], n_reference=2)
        return FeatureExtractor(name, lambda u8: (evaluator.features(dequantize(u8)), None), logits=False)
    from .metrics.clip_score import CLIPScorer

    scorer = CLIPScorer(clip, device=device)
    return FeatureExtractor(name, lambda u8: (scorer.clip_features(torch.from_numpy(u8)).numpy(), None),
                            logits=False, batch_size=64)


# ----------------------------------------------------------------------------- sample settings
def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _train_step(pipe) -> int | None:
    from safetensors import safe_open

    if pipe.run is None or not (Path(pipe.run) / "ema.safetensors").is_file():
        return None
    with safe_open(str(Path(pipe.run) / "ema.safetensors"), "pt") as f:
        return int((f.metadata() or {}).get("step", -1))


def sample_settings(pipe, *, shard_size: int = 1000, seed: int | None = None, guidance: float | None = None,
                    sampler: str | None = None, steps: int | None = None, spacing: str | None = None,
                    guidance_rescale: float | None = None) -> dict:
    """Everything that decides the pixels of sample i, with the run's ``eval`` defaults filled in."""
    from .samplers import sampler_info

    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    e, cfg = pipe.cfg.eval, pipe.cfg.to_dict()
    settings = {
        "format": SHARD_FORMAT, "weights_sha256": weights_sha256(pipe.denoiser),
        "config_sha256": _digest({k: cfg[k] for k in ("model", "diffusion", "data")}),
        "sampler": sampler or e.sampler, "steps": int(steps or e.steps),
        "spacing": spacing or e.spacing or pipe.denoiser.schedule.spacings[0],
        "guidance": float(e.guidance if guidance is None else guidance),
        "guidance_rescale": float(e.guidance_rescale if guidance_rescale is None else guidance_rescale),
        "negative_prompt": e.negative_prompt if pipe.is_text else None,
        "text_encoder_sha256": pipe.conditioner.identity()["weights_sha256"] if pipe.is_text else None,
        "vae_sha256": weights_sha256(pipe.vae) if pipe.vae is not None else None,
        "seed": int(e.seed if seed is None else seed), "shard_size": int(shard_size)}
    sampler_info(settings["sampler"])  # an unknown sampler fails here, before any folder is made
    return settings


def default_sample_folder(pipe, settings: dict) -> Path:
    """``<run>/eval/samples/<first 12 hex digits of the settings' hash>``."""
    if pipe.run is None:
        raise ValueError("this pipeline has no run folder; pass out_dir explicitly")
    return Path(pipe.run) / "eval" / "samples" / _digest(settings)[:12]


# ----------------------------------------------------------------------------- generation
def _conditions(pipe, start: int, stop: int) -> tuple[dict, dict]:
    """(keyword arguments for ``pipe.conds``, arrays to store) for samples start..stop-1: class
    labels cycle through the classes by sample index (as ``pipelines.evaluate``); shapes text
    models cycle through every single-object prompt (``pipelines.single_object_prompts``)."""
    from .pipelines import single_object_prompts

    if pipe.is_text:
        if pipe.cfg.data.dataset != "shapes":
            raise ValueError(f"text-conditional evaluation prompts exist for the shapes world only, "
                             f"got data.dataset={pipe.cfg.data.dataset}")
        prompts = single_object_prompts(stop)[0][start:stop]
        return {"prompt": prompts}, {"prompts": np.array(prompts, dtype=str)}
    if pipe.num_classes:
        labels = torch.arange(start, stop) % pipe.num_classes
        return {"labels": labels}, {"labels": labels.numpy()}
    return {}, {}


@torch.no_grad()
def generate_range(pipe, start: int, stop: int, settings: dict, batch_size: int = 256) -> torch.Tensor:
    """Samples ``start .. stop - 1`` of the seeded stream: what ``pipe(n=stop, ...)[start:stop]``
    returns, without drawing the samples before ``start``."""
    s = settings
    kw, _ = _conditions(pipe, start, stop)
    return pipe(kw.get("prompt"), n=stop - start, labels=kw.get("labels"), negative_prompt=s["negative_prompt"],
                sampler=s["sampler"], steps=s["steps"], spacing=s["spacing"], guidance=s["guidance"],
                guidance_rescale=s["guidance_rescale"], seed=s["seed"], first_index=start, batch_size=batch_size,
                progress=False)


def shard_path(folder, k: int) -> Path:
    return Path(folder) / f"shard_{k:05d}.npz"


def shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, stop) of each shard of samples 0..n-1."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return [(start, min(n, start + shard_size)) for start in range(0, n, shard_size)]


def read_shard(path, images: bool = True) -> tuple[dict, dict]:
    """(arrays, meta) of a shard file; ``images=False`` skips reading the pixels."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if images or k != "images"}
    return arrays, json.loads(arrays.pop("meta").item())


def _shard_is_done(path: Path, settings: dict, start: int, stop: int) -> bool:
    """A readable shard of these settings covering [start, stop) (a longer one, from a larger n, also does)."""
    if not path.is_file():
        return False
    try:
        arrays, meta = read_shard(path, images=False)
    except (OSError, ValueError, KeyError) as err:
        warnings.warn(f"unreadable shard {path} ({err}); generating it again", RuntimeWarning)
        return False
    if meta.get("settings") != settings:
        raise ValueError(f"{path} was made with other settings than its folder's settings.json "
                         f"({_differences(meta.get('settings') or {}, settings)}); remove it")
    return meta["start"] == start and meta["stop"] >= stop and len(arrays["index"]) == meta["stop"] - start


def _differences(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    return ", ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in keys if old.get(k) != new.get(k))


def _claim_folder(folder: Path, settings: dict) -> None:
    """Write ``settings.json`` into a new folder; refuse a folder that holds other settings."""
    from .train.checkpoint import write_json

    path = folder / "settings.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != settings:
            raise ValueError(f"sample folder {folder} holds shards of other settings "
                             f"({_differences(old, settings)}); use another folder or delete it")
        return
    write_json(path, settings)  # every rank writes the same bytes; the rename is atomic


@dataclass
class ShardReport:
    """What :func:`generate_shards` did on this rank: the folder, every shard path of the n samples,
    and the shard numbers this rank generated or found finished."""

    folder: Path
    settings: dict
    paths: list[Path]
    generated: list[int] = field(default_factory=list)
    reused: list[int] = field(default_factory=list)


def generate_shards(pipe, n: int, out_dir=None, *, shard_size: int = 1000, seed: int | None = None,
                    guidance: float | None = None, sampler: str | None = None, steps: int | None = None,
                    spacing: str | None = None, guidance_rescale: float | None = None,
                    batch_size: int | None = None, dist=None, progress: bool = True) -> ShardReport:
    """Generate samples 0..n-1 into ``out_dir`` (default :func:`default_sample_folder`) as 8-bit shards.

    Shard k (``shard_{k:05d}.npz``, samples [k shard_size, (k + 1) shard_size)) is made by rank
    k % world_size of ``dist`` (a ``DistInfo``; default: ``init_distributed``, i.e. torchrun's
    group or a single process); finished shards of the same settings are skipped. Unset settings
    come from the run's ``eval`` config. Does not wait for the other ranks (see ``barrier``).
    """
    from tqdm.auto import tqdm

    from .train.distributed import init_distributed

    settings = sample_settings(pipe, shard_size=shard_size, seed=seed, guidance=guidance, sampler=sampler,
                               steps=steps, spacing=spacing, guidance_rescale=guidance_rescale)
    folder = Path(out_dir) if out_dir is not None else default_sample_folder(pipe, settings)
    info = dist if dist is not None else init_distributed(next(pipe.denoiser.parameters()).device)
    folder.mkdir(parents=True, exist_ok=True)
    _claim_folder(folder, settings)
    ranges = shard_ranges(n, shard_size)
    report = ShardReport(folder, settings, [shard_path(folder, k) for k in range(len(ranges))])
    train_step = _train_step(pipe)
    mine = range(info.rank, len(ranges), info.world_size)
    for k in tqdm(mine, disable=not progress, desc=f"shards (rank {info.rank})"):
        start, stop = ranges[k]
        if _shard_is_done(report.paths[k], settings, start, stop):
            report.reused.append(k)
            continue
        images = generate_range(pipe, start, stop, settings, batch_size or pipe.cfg.eval.batch_size)
        meta = {"run": str(pipe.run), "train_step": train_step, "settings": settings, "n": n, "shard": k,
                "rank": info.rank, "world_size": info.world_size,
                "start": start, "stop": stop, "quantization": "uint8 round((x + 1) * 127.5)"}
        save_npz(report.paths[k], images=quantize(images), index=np.arange(start, stop),
                 meta=np.array(json.dumps(meta)), **_conditions(pipe, start, stop)[1])
        report.generated.append(k)
    return report


# ----------------------------------------------------------------------------- features
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
    from tqdm.auto import tqdm

    settings = json.loads((Path(folder) / "settings.json").read_text())
    stats, kept, zs = StreamingStats(), [], []
    n_kept = 0
    for k, (start, stop) in enumerate(tqdm(shard_ranges(n, settings["shard_size"]), disable=not progress,
                                           desc=f"{extractor.name} features")):
        path = shard_path(folder, k)
        if not _shard_is_done(path, settings, start, stop):
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


# ----------------------------------------------------------------------------- reference statistics
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
                    channels: int = 3, keep: int = KEEP_ROWS, seed: int = 0, clip=None, inception_weights=None,
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
    from tqdm.auto import tqdm

    from .data import load_image_folder

    shape = (channels, image_size, image_size)
    ex = extractor if isinstance(extractor, FeatureExtractor) else build_extractor(
        extractor, shape, clip=clip, inception_weights=inception_weights, device=device)
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


# ----------------------------------------------------------------------------- metrics
def parse_metrics(metrics) -> list[str]:
    """``"fid,kid"`` or a sequence of names -> a checked list, in the given order without repeats."""
    names = [m.strip().lower() for m in (metrics.split(",") if isinstance(metrics, str) else metrics)]
    names = list(dict.fromkeys(m for m in names if m))
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise ValueError(f"unknown metric(s) {', '.join(bad) or '(none given)'}; expected a comma list of "
                         f"{', '.join(METRICS)}")
    return names


def _need_features(ref: Reference, metric: str) -> np.ndarray:
    if ref.features is None:
        raise ValueError(f"{metric} needs raw reference features, but {ref.source} holds only mu/sigma; pass an "
                         f"image folder as the reference, or write the statistics with `difflab fid-stats` "
                         f"(it keeps up to {KEEP_ROWS} rows as 'features')")
    return np.asarray(ref.features, np.float64)


def compute_metrics(samples: FeatureSet, ref: Reference | None, metrics: Sequence[str]) -> dict:
    """Each requested metric as a dict holding its value(s) and the N of each set it used.

    fid: Fréchet distance of the Gaussians (Heusel et al. 2017). kid: mean/std over subsets of the
    unbiased polynomial-kernel MMD^2 (Bińkowski et al. 2018). is: Inception Score over 10 splits
    (Salimans et al. 2016) of the extractor's class logits. pr: improved precision and recall with
    k = 3 (Kynkäänniemi et al. 2019), in the chosen extractor's feature space."""
    out = {}
    for m in metrics:
        if m != "is" and ref is None:
            raise ValueError(f"{m} compares with reference statistics: pass ref=... (--ref)")
        if m == "fid":
            out[m] = {"value": frechet_distance(samples.stats.mean, samples.stats.cov, ref.mu, ref.sigma),
                      "n_samples": samples.n, "n_reference": ref.n}
        elif m == "kid":
            real = _need_features(ref, m)
            size = min(KID_SUBSET_SIZE, len(samples.kept), len(real))
            mean, std = kid(samples.kept, real, subset_size=size)
            out[m] = {"mean": mean, "std": std, "n_samples": len(samples.kept), "n_reference": len(real),
                      "subset_size": size, "subsets": 100}
        elif m == "is":
            if samples.logits is None:
                raise ValueError(f"is needs class logits; the {samples.extractor} extractor has none "
                                 "(use --extractor inception or digits)")
            splits = min(IS_SPLITS, samples.n)
            mean, std = inception_score(samples.logits, splits=splits, probs=False)
            out[m] = {"mean": mean, "std": std, "n_samples": samples.n, "splits": splits}
        else:
            real = _need_features(ref, m)
            precision, recall = precision_recall(real, samples.kept, k=PR_K)
            out[m] = {"precision": precision, "recall": recall, "n_samples": len(samples.kept),
                      "n_reference": len(real), "k": PR_K}
    return out


# ----------------------------------------------------------------------------- the whole evaluation
def _check_request(metrics: Sequence[str], ref, extractor: str, reference: Reference | None) -> None:
    """Fail before any sampling when the metrics cannot be computed with this reference and extractor."""
    needs_ref = [m for m in metrics if m != "is"]
    if needs_ref and ref is None:
        raise ValueError(f"{', '.join(needs_ref)} compare(s) with reference statistics: pass --ref (an .npz from "
                         "`difflab fid-stats` or an image folder); only is needs none")
    if "is" in metrics and extractor not in WITH_LOGITS:
        raise ValueError(f"is needs class logits; the {extractor} extractor has none "
                         f"(use --extractor {' or '.join(WITH_LOGITS)})")
    if ref is not None and not Path(ref).exists():
        raise FileNotFoundError(f"reference {ref} does not exist; expected an .npz from `difflab fid-stats` "
                                "or an image folder")
    for m in ("kid", "pr"):
        if m in metrics and reference is not None:
            _need_features(reference, m)


def _check_weights(extractor: str, clip, inception_weights) -> None:
    """Find (not load) the extractor's weights, so that a missing file fails before any sampling."""
    if extractor == "inception":
        from .metrics.inception import find_inception_weights

        find_inception_weights(inception_weights)
    elif extractor == "clip":
        from .text import find_clip_folder

        find_clip_folder(clip, image_processor=True)


def _warn_resolution(ref: Reference, shape) -> None:
    if ref.extractor == "inception" and ref.image_size is not None and int(ref.image_size) != shape[1]:
        warnings.warn(f"reference {ref.source} was made from {ref.image_size}px images, the run makes "
                      f"{shape[1]}px ones: they reach Inception through different resizes", RuntimeWarning)


def evaluate_against_reference(run, ref=None, n: int | None = None, metrics="fid",
                               extractor: str | FeatureExtractor | None = None, *, shard_size: int = 1000,
                               sampler: str | None = None, steps: int | None = None, spacing: str | None = None,
                               guidance: float | None = None, guidance_rescale: float | None = None,
                               seed: int | None = None, batch_size: int | None = None, weights: str = "ema",
                               clip=None, inception_weights=None, keep: int = KEEP_ROWS, name: str | None = None,
                               device: str = "auto", progress: bool = True) -> dict | None:
    """Sample ``n`` images of a run in resumable shards and score them against ``ref``.

    ``ref``: an .npz of reference statistics (``difflab fid-stats``, :func:`reference_stats`) or an
    image folder; ``None`` allows only ``is``. ``extractor``: a name of :data:`EXTRACTORS` (default:
    the reference's), or a built :class:`FeatureExtractor`. Writes ``<run>/eval/<name>.json``
    atomically (each metric with its N, the extractor, the reference and the sample settings) and
    returns that dict. Under torchrun every rank generates its shards; rank 0 then scores, writes and
    returns the dict, the other ranks return None after the barrier.
    """
    import torch.distributed as tdist

    from .pipelines import load
    from .train.checkpoint import write_json
    from .train.distributed import barrier, init_distributed
    from .train.trainer import resolve_device

    t0 = time.time()
    metrics = parse_metrics(metrics)
    dev = resolve_device(device)
    owned = not (tdist.is_available() and tdist.is_initialized())
    info = init_distributed(dev)
    if dev.type == "cuda" and info.enabled:
        dev = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(dev)
    try:
        pipe = load(run, weights=weights, device=str(dev))
        n = n or pipe.cfg.eval.n_samples
        ex_name = extractor.name if isinstance(extractor, FeatureExtractor) else extractor
        # an .npz reference is read (and a wrong extractor refused) before any sampling
        reference = load_reference(ref, ex_name) if ref is not None and Path(ref).is_file() else None
        ex_name = reference.extractor if reference is not None else ex_name or "inception"
        check_extractor(ex_name, pipe.shape)
        _check_request(metrics, ref, ex_name, reference)
        if not isinstance(extractor, FeatureExtractor):
            _check_weights(ex_name, clip, inception_weights)
        report = generate_shards(pipe, n, shard_size=shard_size, seed=seed, guidance=guidance, sampler=sampler,
                                 steps=steps, spacing=spacing, guidance_rescale=guidance_rescale,
                                 batch_size=batch_size, dist=info, progress=progress)
        barrier(info)
        if not info.is_main:
            return None
        ex = extractor if isinstance(extractor, FeatureExtractor) else build_extractor(
            ex_name, pipe.shape, clip=clip, inception_weights=inception_weights, device=dev)
        if ref is not None and reference is None:  # an image folder: extract it now
            reference = reference_stats(ref, extractor=ex, image_size=pipe.shape[1], channels=pipe.shape[0],
                                        keep=keep, progress=progress)
        if reference is not None:
            _warn_resolution(reference, pipe.shape)
        feats = shard_features(report.folder, n, ex, keep=keep, logits="is" in metrics, progress=progress)
        result = _result(pipe, report, n, ex_name, reference, compute_metrics(feats, reference, metrics))
        result["eval_seconds"] = round(time.time() - t0, 1)
        s = report.settings
        name = name or (f"{ex_name}-{Path(ref).stem if ref is not None else 'noref'}-{s['sampler']}{s['steps']}"
                        f"-g{s['guidance']:g}-seed{s['seed']}-n{n}")
        result["path"] = str(Path(pipe.run) / "eval" / f"{name}.json")
        write_json(Path(result["path"]), result)
        return result
    finally:
        if owned and tdist.is_available() and tdist.is_initialized():
            tdist.destroy_process_group()


def _result(pipe, report: ShardReport, n: int, extractor: str, ref: Reference | None, scores: dict) -> dict:
    s = report.settings
    samples = {"n": n, "folder": str(report.folder), "train_step": _train_step(pipe),
               **{k: s[k] for k in ("sampler", "steps", "spacing", "guidance", "guidance_rescale", "seed",
                                    "shard_size", "weights_sha256")}}
    reference = None if ref is None else {
        "source": ref.source, "extractor": ref.extractor, "n": ref.n,
        "features_kept": None if ref.features is None else len(ref.features)}
    return {"run": str(pipe.run), "extractor": extractor, "samples": samples, "reference": reference,
            "metrics": scores}


def format_evaluation(result: dict) -> str:
    """A table: one row per metric with its value(s) and the N of samples and reference behind it."""
    rows = [("metric", "value", "N samples", "N reference")]
    for m, r in result["metrics"].items():
        if m == "fid":
            rows.append(("FID", f"{r['value']:.4f}", str(r["n_samples"]), str(r["n_reference"])))
        elif m == "kid":
            rows.append((f"KID (subsets of {r['subset_size']})", f"{r['mean']:.5f} ± {r['std']:.5f}",
                         str(r["n_samples"]), str(r["n_reference"])))
        elif m == "is":
            rows.append((f"IS ({r['splits']} splits)", f"{r['mean']:.3f} ± {r['std']:.3f}", str(r["n_samples"]), "-"))
        else:
            rows.append((f"precision (k={r['k']})", f"{r['precision']:.4f}", str(r["n_samples"]), str(r["n_reference"])))
            rows.append((f"recall (k={r['k']})", f"{r['recall']:.4f}", str(r["n_samples"]), str(r["n_reference"])))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    s = result["samples"]
    lines.append(f"({result['extractor']} features; {s['sampler']}-{s['steps']} guidance {s['guidance']:g} "
                 f"seed {s['seed']}; eval {result['eval_seconds']} s)")
    return "\n".join(lines)
