"""Score a run's samples against reference statistics: sample in resumable shards (under torchrun,
on every rank), extract features, compute FID / KID / IS / precision-recall, write the result."""
from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from .. import devices, runs
from ..files import write_json
from ..generate import SamplingSettings
from ..loading import load
from ..metrics.inception import find_inception_weights
from ..tables import format_table
from ..text import find_clip_folder
from .features import (KEEP_ROWS, WITH_LOGITS, FeatureExtractor, Reference, build_extractor, check_extractor,
                       load_reference, reference_stats, shard_features)
from .samples import ShardReport, generate_shards, train_step
from .scores import need_features, compute_metrics, parse_metrics


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
            need_features(reference, m)


def _check_weights(extractor: str, weights: dict) -> None:
    """Find (not load) the extractor's weights, so that a missing file fails before any sampling."""
    if extractor == "inception":
        find_inception_weights(weights.get("inception"))
    elif extractor == "clip":
        find_clip_folder(weights.get("clip"), image_processor=True)


def _warn_resolution(ref: Reference, shape) -> None:
    if ref.extractor == "inception" and ref.image_size is not None and int(ref.image_size) != shape[1]:
        warnings.warn(f"reference {ref.source} was made from {ref.image_size}px images, the run makes "
                      f"{shape[1]}px ones: they reach Inception through different resizes", RuntimeWarning)


def evaluate_against_reference(run, ref=None, n: int | None = None, metrics="fid",
                               extractor: str | FeatureExtractor | None = None, *, shard_size: int = 1000,
                               weights: str = "ema", extractor_weights: dict | None = None, keep: int = KEEP_ROWS,
                               device: str = "auto", progress: bool = True, **settings) -> dict | None:
    """Sample ``n`` images of a run in resumable shards and score them against ``ref``.

    ``ref``: an .npz of reference statistics (``difflab fid-stats``, :func:`reference_stats`) or an
    image folder; ``None`` allows only ``is``. ``extractor``: a name of :data:`EXTRACTORS` (default:
    the reference's), or a built :class:`FeatureExtractor`; ``extractor_weights`` the local files
    of ``{"inception": ..., "clip": ...}``. ``settings``: ``SamplingSettings`` fields (``sampler``,
    ``steps``, ``guidance``, ...; unset ones from the run's ``eval`` config). Writes
    ``<run>/eval/<name>.json`` atomically (each metric with its N, the extractor, the reference and
    the sample settings) and returns that dict. Under torchrun every rank generates its shards;
    rank 0 then scores, writes and returns the dict, the other ranks return None after the barrier.
    """
    t0, metrics, extractor_weights = time.time(), parse_metrics(metrics), extractor_weights or {}
    owned = not devices.group_is_initialized()
    dev, info = devices.setup(device)
    try:
        pipe = load(run, weights=weights, device=str(dev))
        n = n or pipe.cfg.eval.n_samples
        reference, ex_name = _prepare(pipe, ref, metrics, extractor, extractor_weights)
        report = generate_shards(pipe, n, settings=SamplingSettings.of(**settings), shard_size=shard_size, dist=info,
                                 progress=progress)
        devices.barrier(info)
        if not info.is_main:
            return None
        ex = extractor if isinstance(extractor, FeatureExtractor) else build_extractor(
            ex_name, pipe.shape, weights=extractor_weights, device=dev)
        if ref is not None and reference is None:  # an image folder: extract it now
            reference = reference_stats(ref, extractor=ex, image_size=pipe.shape[1], channels=pipe.shape[0],
                                        keep=keep, progress=progress)
        if reference is not None:
            _warn_resolution(reference, pipe.shape)
        feats = shard_features(report.folder, n, ex, keep=keep, logits="is" in metrics, progress=progress)
        result = _result(pipe, report, n, ex_name, reference, compute_metrics(feats, reference, metrics))
        result["eval_seconds"] = round(time.time() - t0, 1)
        return _write(pipe, result, ref, n)
    finally:
        if owned and devices.group_is_initialized():
            devices.destroy_group()


def _prepare(pipe, ref, metrics: Sequence[str], extractor, extractor_weights: dict) -> tuple[Reference | None, str]:
    """(the .npz reference, read now; the extractor's name), after every check that can fail before sampling."""
    ex_name = extractor.name if isinstance(extractor, FeatureExtractor) else extractor
    # an .npz reference is read (and a wrong extractor refused) before any sampling
    reference = load_reference(ref, ex_name) if ref is not None and Path(ref).is_file() else None
    ex_name = reference.extractor if reference is not None else ex_name or "inception"
    check_extractor(ex_name, pipe.shape)
    _check_request(metrics, ref, ex_name, reference)
    if not isinstance(extractor, FeatureExtractor):
        _check_weights(ex_name, extractor_weights)
    return reference, ex_name


def _write(pipe, result: dict, ref, n: int) -> dict:
    s = result["samples"]
    name = (f"{result['extractor']}-{Path(ref).stem if ref is not None else 'noref'}-{s['sampler']}{s['steps']}"
            f"-g{s['guidance']:g}-seed{s['seed']}-n{n}")
    result["path"] = str(runs.eval_result_path(pipe.run, name))
    write_json(Path(result["path"]), result)
    return result


def _result(pipe, report: ShardReport, n: int, extractor: str, ref: Reference | None, scores: dict) -> dict:
    s = report.settings
    samples = {"n": n, "folder": str(report.folder), "train_step": train_step(pipe),
               **{k: s[k] for k in ("sampler", "steps", "spacing", "guidance", "guidance_rescale", "seed",
                                    "shard_size", "weights_sha256")}}
    reference = None if ref is None else {
        "source": ref.source, "extractor": ref.extractor, "n": ref.n,
        "features_kept": None if ref.features is None else len(ref.features)}
    return {"run": str(pipe.run), "extractor": extractor, "samples": samples, "reference": reference,
            "metrics": scores}


def _metric_rows(m: str, r: dict) -> list[tuple[str, ...]]:
    if m == "fid":
        return [("FID", f"{r['value']:.4f}", str(r["n_samples"]), str(r["n_reference"]))]
    if m == "kid":
        return [(f"KID (subsets of {r['subset_size']})", f"{r['mean']:.5f} ± {r['std']:.5f}", str(r["n_samples"]),
                 str(r["n_reference"]))]
    if m == "is":
        return [(f"IS ({r['splits']} splits)", f"{r['mean']:.3f} ± {r['std']:.3f}", str(r["n_samples"]), "-")]
    return [(f"precision (k={r['k']})", f"{r['precision']:.4f}", str(r["n_samples"]), str(r["n_reference"])),
            (f"recall (k={r['k']})", f"{r['recall']:.4f}", str(r["n_samples"]), str(r["n_reference"]))]


def format_evaluation(result: dict) -> str:
    """A table: one row per metric with its value(s) and the N of samples and reference behind it."""
    rows = [("metric", "value", "N samples", "N reference")]
    for m, r in result["metrics"].items():
        rows += _metric_rows(m, r)
    s = result["samples"]
    return (format_table(rows) + f"\n({result['extractor']} features; {s['sampler']}-{s['steps']} guidance "
            f"{s['guidance']:g} seed {s['seed']}; eval {result['eval_seconds']} s)")
