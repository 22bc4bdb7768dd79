"""The run-folder format: every file name, weight file, hash and record of a run, read and written here.

A run folder holds

* ``config.yaml`` -- the resolved config;
* ``model.safetensors``, ``ema.safetensors`` -- weights, with the step in their metadata;
* ``trainer_state.pt`` -- optimizer, scaler, step and wall time (loaded with weights_only=True);
* ``metrics.jsonl`` -- the training log; ``samples/step_*.png`` -- sample grids;
* records of what the model was trained against, checked on resume and load:
  ``text_encoder.json`` (the frozen text encoder) and ``vae.json`` (a latent model's VAE);
* ``latents.safetensors`` -- a latent model's cached training latents;
* ``metrics.json`` -- the built-in evaluation; ``eval/`` -- evaluations against reference
  statistics (``eval/<name>.json``) and their sample shards (``eval/samples/<settings hash>/``).

Every file is written to a temporary name and renamed into place (``difflab.files``).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .config import Config, config_from_dict
from .files import atomic_write, write_json, write_text

CONFIG = "config.yaml"
TRAINER_STATE = "trainer_state.pt"
RUN_FILES = (CONFIG, "model.safetensors", "ema.safetensors", TRAINER_STATE)
TRAINING_LOG = "metrics.jsonl"
METRICS = "metrics.json"
TEXT_ENCODER_RECORD = "text_encoder.json"  # which frozen encoder (and weights) a text model was trained against
VAE_RECORD = "vae.json"                    # which VAE a latent model works in
LATENT_CACHE = "latents.safetensors"
EVAL_DIR = "eval"
WEIGHTS = ("ema", "model")


class RunFolderError(FileNotFoundError):
    pass


# ------------------------------------------------------------------------------------------ the folder

def check_run(run, need_weights: bool = True) -> Path:
    """``run`` as a Path; a clear error unless it is a difflab run folder."""
    run = Path(run)
    if not run.is_dir():
        raise RunFolderError(f"run folder {run} does not exist")
    needed = RUN_FILES if need_weights else RUN_FILES[:1]
    missing = [f for f in needed if not (run / f).is_file()]
    if missing:
        raise RunFolderError(f"{run} is not a difflab run folder (missing {', '.join(missing)}); "
                             "train one with `difflab train`")
    return run


def read_config_dict(run) -> dict:
    return yaml.safe_load((Path(run) / CONFIG).read_text())


def read_config(run, need_weights: bool = True) -> Config:
    """The config of the run folder ``run`` (a VAE run of a latent model needs no weights yet)."""
    return config_from_dict(read_config_dict(check_run(run, need_weights)))


def write_config(run, cfg: Config) -> None:
    write_text(Path(run) / CONFIG, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def weights_path(run, weights: str = "ema") -> Path:
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    return Path(run) / f"{weights}.safetensors"


def sample_grid_path(run, step: int) -> Path:
    return Path(run) / "samples" / f"step_{step:07d}.png"


def sample_folder(run, digest: str) -> Path:
    """Where the evaluation shards of one set of sample settings (named by their hash) live."""
    return Path(run) / EVAL_DIR / "samples" / digest


def eval_result_path(run, name: str) -> Path:
    return Path(run) / EVAL_DIR / f"{name}.json"


# ------------------------------------------------------------------------------------------- weights

def weights_sha256(module: torch.nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a module's state dict, in key order."""
    h = hashlib.sha256()
    for key, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_weights(path, module: torch.nn.Module, metadata: dict | None = None) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    meta = {k: str(v) for k, v in metadata.items()} if metadata else None
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))


def weights_metadata(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def weights_shapes(path) -> dict[str, list[int]]:
    """Each tensor's shape, read from the file's header (no data is loaded)."""
    with safe_open(str(path), "pt") as f:
        return {k: f.get_slice(k).get_shape() for k in f.keys()}


def weights_step(path) -> int:
    """The training step a weights file was saved at (-1 when it records none)."""
    return int(weights_metadata(path).get("step", -1))


def load_weights(path, module: torch.nn.Module) -> int:
    """Load ``path`` into ``module``; returns the step it was saved at."""
    module.load_state_dict(load_file(str(path)))
    return weights_step(path)


# --------------------------------------------------------------------------------------- checkpoints

def save_checkpoint(run, model, ema, trainer_state: dict) -> None:
    """Weights first, trainer state last: the state file's step names a complete checkpoint."""
    run, step = Path(run), trainer_state["step"]
    save_weights(weights_path(run, "model"), model, {"step": step})
    save_weights(weights_path(run, "ema"), ema, {"step": step})
    atomic_write(run / TRAINER_STATE, lambda tmp: torch.save(trainer_state, tmp))


def load_trainer_state(run) -> dict:
    return torch.load(Path(run) / TRAINER_STATE, map_location="cpu", weights_only=True)


def has_checkpoint(run) -> bool:
    return (Path(run) / TRAINER_STATE).exists()


# ------------------------------------------------------------------------------------------- records

def read_record(run, name: str) -> dict | None:
    """A record (``TEXT_ENCODER_RECORD``, ``VAE_RECORD``) of the run, or None when it has none."""
    path = Path(run) / name
    return json.loads(path.read_text()) if path.exists() else None


def write_record(run, name: str, record: dict) -> None:
    write_json(Path(run) / name, record)


def write_metrics(run, metrics: dict) -> Path:
    path = Path(run) / METRICS
    write_json(path, metrics)
    return path
