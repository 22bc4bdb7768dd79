"""The run-folder format: every file name, weight file, hash, checkpoint, lock and record of a run,
read and written here.

A run folder holds

* ``config.yaml`` -- the resolved config;
* ``checkpoint.json`` -- the published checkpoint: its step, its folder and each file's SHA-256;
* ``checkpoints/step_<step>/`` -- a checkpoint: ``model.safetensors``, ``ema.safetensors`` (weights,
  with the step in their metadata) and ``trainer_state.pt`` (optimizer, scaler, step and wall time;
  loaded with weights_only=True); the newest ``train.keep_checkpoints`` are kept;
* ``train.lock`` -- the advisory lock of the trainer writing the run (the holder's PID);
* ``metrics.jsonl`` -- the training log; ``samples/step_*.png`` -- sample grids;
* records of what the model was trained against, checked on resume and load:
  ``text_encoder.json`` (the frozen text encoder) and ``vae.json`` (a latent model's VAE);
* ``latents.safetensors`` -- a latent model's cached training latents;
* ``metrics.json`` -- the built-in evaluation; ``eval/`` -- evaluations against reference
  statistics (``eval/<name>.json``) and their sample shards (``eval/samples/<settings hash>/``).

A checkpoint is one unit: its three files are written into a temporary folder, fsynced, renamed
to ``checkpoints/step_<step>`` and only then published by rewriting ``checkpoint.json`` (atomic),
so a kill or a full disk at any moment leaves the previous checkpoint published and whole. Run
folders of the earlier layout (the three files in the run folder itself, no ``checkpoint.json``)
still load and resume. Every single file is written to a temporary name and renamed into place
(``difflab.files``).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from . import files
from .config import Config, ConfigError, config_from_dict, missing_keys
from .files import TEMP_SUFFIX, write_json, write_text

CONFIG = "config.yaml"
TRAINER_STATE = "trainer_state.pt"
CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", TRAINER_STATE)
RUN_FILES = (CONFIG, *CHECKPOINT_FILES)  # the earlier layout: all in the run folder itself
POINTER = "checkpoint.json"
CHECKPOINTS = "checkpoints"
LOCK = "train.lock"
TRAINING_LOG = "metrics.jsonl"
METRICS = "metrics.json"
TEXT_ENCODER_RECORD = "text_encoder.json"  # which frozen encoder (and weights) a text model was trained against
VAE_RECORD = "vae.json"                    # which VAE a latent model works in
BASE_RECORD = "base.json"                  # which base model (and weights) an adapter was trained on
LATENT_CACHE = "latents.safetensors"
EVAL_DIR = "eval"
WEIGHTS = ("ema", "model")


class RunFolderError(FileNotFoundError):
    pass


class RunFileError(ValueError):
    """A run file that is damaged or does not fit: ``<file>: <what is wrong> (<what to do>)``."""

    def __init__(self, path, problem: str, remedy: str):
        super().__init__(f"{path}: {problem} ({remedy})")
        self.path = Path(path)


class RunLockedError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------ the folder

def check_run(run, need_weights: bool = True) -> Path:
    """``run`` as a Path; a clear error unless it is a difflab run folder (with a checkpoint, unless a
    VAE run of a latent model that needs none yet)."""
    run = Path(run)
    if not run.is_dir():
        raise RunFolderError(f"run folder {run} does not exist")
    if not (run / CONFIG).is_file():
        raise RunFolderError(f"{run} is not a difflab run folder (it has no {CONFIG}); train one with `difflab train`")
    if need_weights and published(run) is None:
        raise RunFolderError(f"{run} has no checkpoint yet (training stopped before the first one); "
                             "continue it with `difflab train ... --resume`")
    return run


REWRITE_CONFIG = "rewrite it from the config and overrides the run was trained with"


def read_config_dict(run) -> dict:
    """The run's ``config.yaml`` as written: a mapping with every key (a truncated file is refused)."""
    path = Path(run) / CONFIG
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise RunFileError(path, f"not valid YAML ({' '.join(str(err).split())})", REWRITE_CONFIG) from None
    if not isinstance(data, dict):
        raise RunFileError(path, "is empty" if data is None else f"holds a {type(data).__name__}, not a mapping",
                           REWRITE_CONFIG)
    missing = missing_keys(data)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise RunFileError(path, f"lacks {', '.join(missing[:3])}{more}: it is truncated or was edited", REWRITE_CONFIG)
    return data


def read_config(run, need_weights: bool = True) -> Config:
    """The config of the run folder ``run`` (a VAE run of a latent model needs no weights yet)."""
    run = check_run(run, need_weights)
    try:
        return config_from_dict(read_config_dict(run))
    except ConfigError as err:
        raise RunFileError(run / CONFIG, str(err), "the file was edited; correct that key") from None


def write_config(run, cfg: Config) -> None:
    write_text(Path(run) / CONFIG, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def weights_path(run, weights: str = "ema") -> Path:
    """The ``weights`` (``ema`` or ``model``) file of the run's published checkpoint."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    ckpt = published(run)
    return (ckpt.folder if ckpt else Path(run)) / f"{weights}.safetensors"


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


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_weights(path, module: torch.nn.Module, metadata: dict | None = None) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    meta = {k: str(v) for k, v in metadata.items()} if metadata else None
    files.atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))


DAMAGED = "the file is truncated or damaged; restore it, or train the run again"


def _unreadable(path, err) -> RunFileError:
    if isinstance(err, FileNotFoundError):
        return RunFileError(path, "is missing", DAMAGED)
    return RunFileError(path, f"is not a readable safetensors file ({' '.join(str(err).split())[:120]})", DAMAGED)


def weights_metadata(path) -> dict:
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise _unreadable(path, err) from None


def weights_shapes(path) -> dict[str, list[int]]:
    """Each tensor's shape, read from the file's header (no data is loaded)."""
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_slice(k).get_shape() for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise _unreadable(path, err) from None


def weights_step(path) -> int:
    """The training step a weights file was saved at (-1 when it records none)."""
    return int(weights_metadata(path).get("step", -1))


def _mismatch(expected: dict, found: dict) -> str:
    """What keeps the tensors ``found`` from loading into a module whose state dict is ``expected``."""
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    shapes = [k for k in sorted(set(expected) & set(found)) if tuple(expected[k].shape) != tuple(found[k].shape)]
    parts = [f"{len(missing)} tensors missing (first {missing[0]})" if missing else "",
             f"{len(extra)} unexpected (first {extra[0]})" if extra else "",
             f"{len(shapes)} of another shape (first {shapes[0]}: {tuple(found[shapes[0]].shape)} where the model "
             f"has {tuple(expected[shapes[0]].shape)})" if shapes else ""]
    return ", ".join(p for p in parts if p)


def load_weights(path, module: torch.nn.Module) -> int:
    """Load ``path`` into ``module``, refusing weights of another architecture or parameters with NaN/inf
    values; returns the step it was saved at."""
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise _unreadable(path, err) from None
    mismatch = _mismatch(module.state_dict(), state)
    if mismatch:
        raise RunFileError(path, f"does not fit the model its config describes: {mismatch}",
                           "the weights belong to another run, or config.yaml was edited")
    params = dict(module.named_parameters())  # buffers may hold NaN on purpose (a VAE's unset scaling factor)
    bad = [k for k in params if not torch.isfinite(state[k]).all()]
    if bad:
        raise RunFileError(path, f"{len(bad)} tensors hold NaN or infinite values (first {bad[0]})",
                           "training diverged or the file is damaged; use an earlier checkpoint")
    module.load_state_dict(state)
    return weights_step(path)


# --------------------------------------------------------------------------------------- checkpoints

@dataclass(frozen=True)
class Checkpoint:
    """A published checkpoint: its files in ``folder`` (the run folder itself in the earlier layout),
    with the SHA-256 of each as recorded when it was written (none in the earlier layout)."""
    step: int
    folder: Path
    sha256: dict

    def path(self, name: str) -> Path:
        return self.folder / name


def _step_folder(run: Path, step: int) -> Path:
    return run / CHECKPOINTS / f"step_{step:07d}"


def _checkpoint_folders(run: Path) -> dict[int, Path]:
    """Every complete checkpoint folder of the run by its step, published or not."""
    found = {}
    for p in (run / CHECKPOINTS).glob("step_*"):
        if p.is_dir() and p.name[5:].isdigit():
            found[int(p.name[5:])] = p
    return found


def published(run) -> Checkpoint | None:
    """The run's published checkpoint, or None before the first; a damaged pointer, or files of
    the earlier layout that disagree on the step, are an error."""
    run = Path(run)
    pointer = run / POINTER
    if pointer.exists():
        return _read_pointer(run, pointer)
    if not any((run / name).exists() for name in CHECKPOINT_FILES):
        return None
    missing = [name for name in CHECKPOINT_FILES if not (run / name).is_file()]
    if missing:
        raise RunFileError(run / missing[0], "is missing from the checkpoint", DAMAGED)
    steps = {name: weights_step(run / name) for name in CHECKPOINT_FILES[:2]}
    if len(set(steps.values())) != 1:
        raise RunFileError(run / "ema.safetensors", f"is of another step than model.safetensors ({steps}): the "
                           "run was interrupted while it saved", "train the run again; "
                           "runs of this version publish a checkpoint only once it is complete")
    return Checkpoint(steps["model.safetensors"], run, {})


def _read_pointer(run: Path, pointer: Path) -> Checkpoint:
    remedy = 'write {"step": S, "folder": "checkpoints/step_<S>"} naming one of its checkpoint folders'
    try:
        record = json.loads(pointer.read_text())
        ckpt = Checkpoint(int(record["step"]), run / record["folder"], dict(record.get("sha256", {})))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise RunFileError(pointer, f"is damaged ({type(err).__name__}: {err})", remedy) from None
    if not ckpt.folder.is_dir():
        raise RunFileError(pointer, f"names {ckpt.folder}, which does not exist", remedy)
    return ckpt


def verify_checkpoint(ckpt: Checkpoint, names=CHECKPOINT_FILES) -> None:
    """Each of the files ``names`` has the SHA-256 recorded when the checkpoint was written."""
    for name in names:
        path, recorded = ckpt.path(name), ckpt.sha256.get(name)
        if not path.is_file():
            raise RunFileError(path, "is missing from the checkpoint", DAMAGED)
        if recorded is not None and file_sha256(path) != recorded:
            raise RunFileError(path, f"does not match the SHA-256 that {POINTER} recorded when it was written: it "
                               "was changed or damaged since", "restore it, or point checkpoint.json at an "
                               "earlier checkpoint folder")


def save_checkpoint(run, model, ema, trainer_state: dict, keep: int = 2) -> Checkpoint:
    """Write a checkpoint into a temporary folder, fsync it, rename it into ``checkpoints/`` and then
    publish it in ``checkpoint.json``; afterwards only the newest ``keep`` checkpoints are kept."""
    run, step = Path(run), trainer_state["step"]
    current = published(run)
    if current is not None and current.step == step:
        return current  # already published: the same step gives the same files
    folder = _step_folder(run, step)
    partial = folder.with_name(f".{folder.name}{TEMP_SUFFIX}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
        save_weights(partial / "model.safetensors", model, {"step": step})
        save_weights(partial / "ema.safetensors", ema, {"step": step})
        files.atomic_write(partial / TRAINER_STATE, lambda tmp: torch.save(trainer_state, tmp))
        digests = {name: file_sha256(partial / name) for name in CHECKPOINT_FILES}
        shutil.rmtree(folder, ignore_errors=True)  # never published: left by an interrupted session
        os.replace(partial, folder)
        files.fsync_folder(folder.parent)
    except BaseException:  # also a second Ctrl-C: no half checkpoint stays behind
        shutil.rmtree(partial, ignore_errors=True)
        raise
    write_json(run / POINTER, {"step": step, "folder": f"{CHECKPOINTS}/{folder.name}", "sha256": digests})
    _prune(run, step, keep)
    return Checkpoint(step, folder, digests)


def _prune(run: Path, step: int, keep: int) -> None:
    """Delete all but the newest ``keep`` published checkpoints (an earlier layout's files count as
    the oldest)."""
    older = sorted(s for s in _checkpoint_folders(run) if s < step)
    for s in older[:max(0, len(older) - (keep - 1))]:
        shutil.rmtree(_step_folder(run, s), ignore_errors=True)
    if len(older) >= keep - 1:
        for name in CHECKPOINT_FILES:
            (run / name).unlink(missing_ok=True)


def clean_unpublished(run) -> list[Path]:
    """Remove what interrupted writes left behind -- temporary files and checkpoint folders that were
    never published -- and return it. Only a holder of the run's lock may call this."""
    run = Path(run)
    current = published(run)
    leftovers = [p for p in run.glob(f".*{TEMP_SUFFIX}")] + [p for p in (run / CHECKPOINTS).glob(f".*{TEMP_SUFFIX}")]
    leftovers += [p for s, p in _checkpoint_folders(run).items() if current is None or s > current.step]
    for p in leftovers:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return leftovers


def load_trainer_state(run, checkpoint: Checkpoint | None = None) -> dict:
    """The trainer state of the published checkpoint (or of ``checkpoint``)."""
    ckpt = checkpoint or published(check_run(run))
    path = ckpt.path(TRAINER_STATE)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RunFileError(path, "is missing from the checkpoint", DAMAGED) from None
    except Exception as err:  # torch.load fails in many ways (pickle, zip, EOF, runtime) on a damaged file
        raise RunFileError(path, f"is not a readable trainer state ({type(err).__name__})", DAMAGED) from None
    if not isinstance(state, dict) or not {"step", "optimizer", "scaler"} <= set(state):
        raise RunFileError(path, "is not a difflab trainer state (no step, optimizer and scaler)", DAMAGED)
    return state


def has_checkpoint(run) -> bool:
    return published(run) is not None


# ------------------------------------------------------------------------------------------------ lock

class RunLock:
    """One writer per run: an advisory ``flock`` on ``train.lock``, which records the holder's PID.

    The kernel drops the lock when its holder dies, however it dies, so a lock file whose lock is
    free is stale: it is taken over, and ``acquire`` says whose it was. (``flock`` is local to a
    machine; on network file systems that do not pass it on, two machines are not kept apart.)
    """

    def __init__(self, run):
        self.path = Path(run) / LOCK
        self.fd = None

    def acquire(self) -> str | None:
        """Take the lock, or raise RunLockedError naming its holder; returns a message when a stale
        lock was taken over."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").split()
            os.close(fd)
            who = f"PID {holder[0]} on {holder[1]}" if len(holder) >= 2 else "another process"
            raise RunLockedError(f"{self.path.parent} is being trained by {who} ({self.path}); wait for it to "
                                 "finish or stop it, or choose another folder with out=...") from None
        stale = os.pread(fd, 200, 0).decode(errors="replace").split()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        if len(stale) >= 2:
            return f"took over the lock of {self.path.parent} left by PID {stale[0]} on {stale[1]}, which is gone"
        return None

    def release(self) -> None:
        if self.fd is not None:  # emptied, not deleted: a waiter may hold the file open
            os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None


# ------------------------------------------------------------------------------------------- records

def read_record(run, name: str) -> dict | None:
    """A record (``TEXT_ENCODER_RECORD``, ``VAE_RECORD``) of the run, or None when it has none."""
    path = Path(run) / name
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise RunFileError(path, f"is not valid JSON ({err})", DAMAGED) from None
    if not isinstance(record, dict):
        raise RunFileError(path, f"holds a {type(record).__name__}, not a record", DAMAGED)
    return record


def write_record(run, name: str, record: dict) -> None:
    write_json(Path(run) / name, record)


def write_metrics(run, metrics: dict) -> Path:
    path = Path(run) / METRICS
    write_json(path, metrics)
    return path
