"""Evaluation samples: the one scheme of conditions and seeds behind every evaluation, and
resumable 8-bit shards of them (see ``difflab.evaluation``)."""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import runs
from ..config import ADDED_KEYS, Config
from ..data.shapes import single_object_prompts
from ..devices import DistInfo, init_distributed
from ..files import save_npz, write_json
from ..generate import SamplingSettings
from ..runs import weights_sha256
from ..samplers import sampler_info


def quantize(images: torch.Tensor) -> np.ndarray:
    """Float images in [-1, 1] -> uint8 ``round((x + 1) * 127.5)``, the 8-bit image a PNG holds."""
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def dequantize(images: np.ndarray) -> torch.Tensor:
    """uint8 images -> float32 in [-1, 1] (``u / 127.5 - 1``), the inverse of :func:`quantize` on its grid."""
    return torch.from_numpy(np.asarray(images, np.uint8)).float() / 127.5 - 1


#: bump when the shard layout changes, so old shard folders are not mistaken for new ones
SHARD_FORMAT = 1


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def train_step(pipe) -> int | None:
    """The step the pipeline's EMA weights were saved at (None without a run folder)."""
    path = None if pipe.run is None else runs.weights_path(pipe.run, "ema")
    return runs.weights_step(path) if path is not None and path.is_file() else None


def shard_settings(pipe, settings: SamplingSettings, shard_size: int = 1000) -> dict:
    """Everything that decides the pixels of sample i (``settings`` as ``pipe.settings`` completes
    them), as the JSON a shard folder is keyed by."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    cfg, s = pipe.cfg.to_dict(), pipe.settings(settings)
    sampler_info(s.sampler)  # an unknown sampler fails here, before any folder is made
    out = {
        "format": SHARD_FORMAT, "weights_sha256": weights_sha256(pipe.denoiser),
        "config_sha256": _digest(_hashed_config(cfg)),
        "sampler": s.sampler, "steps": int(s.steps), "spacing": s.spacing, "guidance": float(s.guidance),
        "guidance_rescale": float(s.guidance_rescale), "negative_prompt": s.negative_prompt if pipe.is_text else None,
        "text_encoder_sha256": pipe.conditioner.identity()["weights_sha256"] if pipe.is_text else None,
        "vae_sha256": weights_sha256(pipe.vae) if pipe.vae is not None else None,
        "seed": int(s.seed), "shard_size": int(shard_size)}
    if s.options:  # recorded only when set, so folders made before options existed keep their hash
        out["options"] = s.options
    if s.sag_scale:  # likewise
        out["sag_scale"] = float(s.sag_scale)
    return out


def _hashed_config(cfg: dict) -> dict:
    """The config sections that decide the samples, less keys added since at their defaults (so
    that shard folders made before those keys existed keep their hash)."""
    defaults = Config().to_dict()
    out = {k: dict(cfg[k]) for k in ("model", "diffusion", "data")}
    for key in ADDED_KEYS:
        section, _, name = key.partition(".")
        if name and section in out and out[section].get(name) == defaults[section][name]:
            del out[section][name]
    return out


def settings_of(shard: dict) -> SamplingSettings:
    """The sampling settings a shard folder's JSON records."""
    return SamplingSettings(sampler=shard["sampler"], options=shard.get("options", {}), steps=shard["steps"],
                            spacing=shard["spacing"], guidance=shard["guidance"],
                            guidance_rescale=shard["guidance_rescale"], negative_prompt=shard["negative_prompt"],
                            seed=shard["seed"], sag_scale=shard.get("sag_scale"))


def default_sample_folder(pipe, settings: dict) -> Path:
    """``<run>/eval/samples/<first 12 hex digits of the shard settings' hash>``."""
    if pipe.run is None:
        raise ValueError("this pipeline has no run folder; pass out_dir explicitly")
    return runs.sample_folder(pipe.run, _digest(settings)[:12])


def eval_conditions(pipe, start: int, stop: int) -> tuple[dict, dict]:
    """(keyword arguments for the pipeline, arrays to store) for samples start..stop-1 of every
    evaluation: class labels cycle through the classes by sample index; shapes text models cycle
    through every single-object prompt (``data.shapes.single_object_prompts``)."""
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
def generate_range(pipe, start: int, stop: int, settings: SamplingSettings, progress: bool = False) -> torch.Tensor:
    """Samples ``start .. stop - 1`` of the seeded evaluation stream: what ``pipe(n=stop, ...)[start:stop]``
    returns, without drawing the samples before ``start``."""
    kw, _ = eval_conditions(pipe, start, stop)
    return pipe(kw.get("prompt"), n=stop - start, labels=kw.get("labels"), settings=settings, first_index=start,
                progress=progress)


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


def shard_is_done(path: Path, settings: dict, start: int, stop: int) -> bool:
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


def generate_shards(pipe, n: int, out_dir=None, settings: SamplingSettings | None = None, *, shard_size: int = 1000,
                    dist: DistInfo | None = None, progress: bool = True, **overrides) -> ShardReport:
    """Generate samples 0..n-1 into ``out_dir`` (default :func:`default_sample_folder`) as 8-bit shards.

    Shard k (``shard_{k:05d}.npz``, samples [k shard_size, (k + 1) shard_size)) is made by rank
    k % world_size of ``dist`` (a ``DistInfo``; default: ``init_distributed``, i.e. torchrun's
    group or a single process); finished shards of the same settings are skipped. ``settings`` and
    ``overrides`` say how to sample (unset fields from the run's ``eval`` config; the batch
    defaults to ``eval.batch_size``). Does not wait for the other ranks (see ``barrier``).
    """
    settings = SamplingSettings.of(settings, **overrides)
    shard = shard_settings(pipe, settings, shard_size)
    folder = Path(out_dir) if out_dir is not None else default_sample_folder(pipe, shard)
    info = dist if dist is not None else init_distributed(next(pipe.denoiser.parameters()).device)
    folder.mkdir(parents=True, exist_ok=True)
    _claim_folder(folder, shard)
    ranges = shard_ranges(n, shard_size)
    report = ShardReport(folder, shard, [shard_path(folder, k) for k in range(len(ranges))])
    settings = replace(settings_of(shard), batch_size=settings.batch_size or pipe.cfg.eval.batch_size)
    for k in tqdm(range(info.rank, len(ranges), info.world_size), disable=not progress, desc=f"shards (rank {info.rank})"):
        start, stop = ranges[k]
        if shard_is_done(report.paths[k], shard, start, stop):
            report.reused.append(k)
            continue
        meta = {"run": str(pipe.run), "train_step": train_step(pipe), "settings": shard, "n": n, "shard": k,
                "rank": info.rank, "world_size": info.world_size,
                "start": start, "stop": stop, "quantization": "uint8 round((x + 1) * 127.5)"}
        save_npz(report.paths[k], images=quantize(generate_range(pipe, start, stop, settings)),
                 index=np.arange(start, stop), meta=np.array(json.dumps(meta)), **eval_conditions(pipe, start, stop)[1])
        report.generated.append(k)
    return report
