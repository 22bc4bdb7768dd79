"""Atomic file writes (imports nothing from difflab): readers never see half a file, and a file
that was renamed into place survives a crash (the file and its folder are fsynced)."""
from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np


TEMP_SUFFIX = ".tmp"  # atomic_write's temporary files are ".<name>.<random>.tmp" beside their target
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync, then rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    try:
        _as_os_error(write, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes files only their owner can read
        os.replace(tmp, path)
        fsync_folder(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _as_os_error(write, tmp: str) -> None:
    """``write(tmp)``, with a failed write reported as the OSError it is: safetensors raises its own
    error type ("... (os error 28)") and torch.save a RuntimeError ("unexpected pos") on a full disk."""
    try:
        write(tmp)
    except OSError:
        raise
    except Exception as err:
        found = re.search(r"\(os error (\d+)\)", str(err))
        if found:
            number = int(found.group(1))
        elif _free_bytes(os.path.dirname(tmp)) < FULL_BELOW:
            number = errno.ENOSPC
        else:
            raise
        raise OSError(number, os.strerror(number), tmp) from err


FULL_BELOW = 1 << 20  # bytes left on a file system that a failed write is taken to have filled


def _free_bytes(folder: str) -> int:
    try:
        stat = os.statvfs(folder)
    except (OSError, AttributeError):  # no statvfs on Windows
        return FULL_BELOW
    return stat.f_bavail * stat.f_frsize


def fsync_folder(folder) -> None:
    """Make a rename inside ``folder`` durable (a no-op where folders cannot be opened, as on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
