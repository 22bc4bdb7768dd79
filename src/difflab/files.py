"""Atomic file writes (imports nothing from difflab): readers never see half a file."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np


def atomic_write(path, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync, then rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_npz(path, **arrays) -> None:
    """``np.savez`` written atomically (through a file handle, so no ``.npz`` suffix is appended)."""
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, write)


def write_text(path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path, data) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")
