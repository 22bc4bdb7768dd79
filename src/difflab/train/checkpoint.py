"""Run folders and atomic checkpoint files.

A run folder holds ``config.yaml``, ``model.safetensors``, ``ema.safetensors``,
``trainer_state.pt`` (optimizer, scaler, step; loaded with weights_only=True),
``metrics.jsonl``, ``samples/`` and, after evaluation, ``metrics.json``.
Every file is written to a temporary name and renamed into place.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from ..files import atomic_write

RUN_FILES = ("config.yaml", "model.safetensors", "ema.safetensors", "trainer_state.pt")


class RunFolderError(FileNotFoundError):
    pass


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def weights_sha256(module: torch.nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a module's state dict, in key order."""
    h = hashlib.sha256()
    for key, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_weights(path: Path, module: torch.nn.Module, step: int) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"step": str(step)}))


def load_weights(path: Path, module: torch.nn.Module) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        step = int((f.metadata() or {}).get("step", -1))
    module.load_state_dict(load_file(str(path)))
    return step


def save_checkpoint(run: Path, model, ema, trainer_state: dict) -> None:
    """Weights first, trainer state last: the state file's step names a complete checkpoint."""
    step = trainer_state["step"]
    save_weights(run / "model.safetensors", model, step)
    save_weights(run / "ema.safetensors", ema, step)
    atomic_write(run / "trainer_state.pt", lambda tmp: torch.save(trainer_state, tmp))


def load_trainer_state(run: Path) -> dict:
    return torch.load(run / "trainer_state.pt", map_location="cpu", weights_only=True)


def check_run(run: Path, need_weights: bool = True) -> Path:
    """Raise a clear error unless ``run`` is a difflab run folder."""
    run = Path(run)
    if not run.is_dir():
        raise RunFolderError(f"run folder {run} does not exist")
    needed = RUN_FILES if need_weights else RUN_FILES[:1]
    missing = [f for f in needed if not (run / f).is_file()]
    if missing:
        raise RunFolderError(f"{run} is not a difflab run folder (missing {', '.join(missing)}); "
                             "train one with `difflab train`")
    return run


def read_config_dict(run: Path) -> dict:
    return yaml.safe_load((Path(run) / "config.yaml").read_text())
