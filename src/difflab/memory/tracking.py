"""Live bytes of storages, counted by a dispatch mode (real or fake tensors alike)."""
from __future__ import annotations

import weakref

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class StorageTracker(TorchDispatchMode):
    """Live bytes of the storages that ops create while it is active.

    Each storage is counted once however many views share it, from the op that created it until
    its Python object dies (torch keeps a storage's Python object alive exactly as long as the
    storage); with ``device``, only storages on that device type count (a CUDA plan leaves out
    host copies). Pass what exists before to ``ignore`` (weights, the batch): an in-place op on a weight
    returns the weight, which is not a new allocation, and ignored storages are never counted. The
    tracker holds the ignored tensors, so their storages, keyed by address, are never freed and
    their addresses never reused by an allocation that should count.
    ``history`` records (serial, +/- bytes) so the bytes of chosen storages at the peak can be
    recovered afterwards (the gradients, known only once backward is done).
    """

    def __init__(self, ignore=(), device: str | None = None):
        super().__init__()
        self.device = None if device is None else torch.device(device).type  # None: every device
        self.ignored: set[int] = set()
        self._held: list[Tensor] = []
        self.ignore(ignore)
        self.live: dict[int, tuple[int, int]] = {}  # storage key -> (serial, bytes)
        self.history: list[tuple[int, int]] = []
        self.current = self.peak = self.peak_index = 0
        self.ops: set[str] = set()
        self._serial = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(func.name())
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                self._add(t)
        return out

    def _add(self, t: Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.live or key in self.ignored or (self.device and t.device.type != self.device):
            return
        nbytes = storage.nbytes()
        self._serial += 1
        self.live[key] = (self._serial, nbytes)
        self._move(self._serial, nbytes)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        serial, nbytes = self.live.pop(key)
        self._move(serial, -nbytes)

    def _move(self, serial: int, delta: int) -> None:
        self.history.append((serial, delta))
        self.current += delta
        if self.current > self.peak:
            self.peak, self.peak_index = self.current, len(self.history)

    def ignore(self, tensors) -> None:
        tensors = list(tensors)
        self._held += tensors
        self.ignored |= {_key(t) for t in tensors}

    def serials(self, tensors) -> set[int]:
        """Serials of the tracked storages of ``tensors`` (e.g. the gradients after backward)."""
        return {self.live[_key(t)][0] for t in tensors if _key(t) in self.live}

    def bytes_at_peak(self, serials: set[int]) -> int:
        """Bytes of the storages ``serials`` that were live at the peak."""
        return sum(delta for serial, delta in self.history[:self.peak_index] if serial in serials)


def _key(t: Tensor) -> int:
    return t.untyped_storage()._cdata


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages of ``tensors`` (views and shared storages counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, Tensor):
            seen.setdefault(_key(t), t.untyped_storage().nbytes())
    return sum(seen.values())


def module_tensors(module) -> list[Tensor]:
    """A module's parameters and buffers ([] for None)."""
    return [] if module is None else [*module.parameters(), *module.buffers()]
