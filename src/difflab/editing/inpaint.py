"""Inpainting with any sampler: the known region replaced in the denoised estimate, and RePaint.

Replacement: ``x0_hat = m * x_known + (1 - m) * x0_hat`` (m = 1 keeps). In sigma space every
sampler then carries the known region as ``x_known + sigma * n`` with the sample's own noise n,
which is the forward-noised original that known-region replacement (Song et al. 2021, App. I;
Lugmayr et al. 2022, Eq. 8) puts there, without a per-sampler hook.

RePaint (Lugmayr et al. 2022, Alg. 1 and its jump schedule): after every ``jump_length`` steps
down the grid, go back up ``jump_length`` steps by adding fresh noise, ``resamplings - 1`` times,
so that the generated region can harmonise with the known one. The descending stretches are run
by the chosen sampler itself (a multistep sampler restarts its history on each stretch).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..denoisers import DenoiserWrapper
from ..generate import Edit
from ..samplers import SeededNoise
from ..seeds import derive_seed
from .masks import composite

EDITS = ("replace", "repaint")
REPAINT_STREAM = 1 << 40  # the re-noising draws of sample seed s come from derive_seed(s, this)


class KnownRegion(DenoiserWrapper):
    """A denoiser whose estimate is ``known`` wherever ``mask`` is 1."""

    def __init__(self, denoiser, known: Tensor, mask: Tensor):
        super().__init__(denoiser)
        self.known, self.mask = known, mask

    def __call__(self, x, sigma, cond=None):
        x0_hat = self.denoiser(x, sigma, cond)
        return composite(self.known.to(x0_hat), x0_hat, self.mask.to(x0_hat))


def repaint_path(steps: int, jump_length: int = 10, resamplings: int = 10) -> list[int]:
    """The grid indices RePaint visits: from 0 (sigma_max) to ``steps`` (sigma = 0), one index at a
    time; after each ``jump_length`` steps down (not in the first ``jump_length`` steps from the top)
    it climbs back ``jump_length``, ``resamplings - 1`` times (the authors' ``get_schedule_jump``)."""
    if jump_length < 1 or resamplings < 1:
        raise ValueError(f"jump_length and resamplings must be >= 1, got {jump_length} and {resamplings}")
    jumps = {level: resamplings - 1 for level in range(1, steps - jump_length + 1, jump_length)}
    level, levels = steps, [steps]  # a level counts the steps left to sigma = 0
    while level > 0:
        level -= 1
        levels.append(level)
        if jumps.get(level, 0) > 0:
            jumps[level] -= 1
            levels += [level + k for k in range(1, jump_length + 1)]
            level += jump_length
    return [steps - v for v in levels]


def _stretches(path: list[int]) -> list[tuple[int, int]]:
    """The path as maximal runs (first index, last index), descending or climbing."""
    runs, first = [], 0
    for k in range(1, len(path)):
        last = k == len(path) - 1
        turn = not last and (path[k + 1] - path[k]) != (path[k] - path[k - 1])
        if turn or last:
            runs.append((path[first], path[k]))
            first = k
    return runs


class Inpaint(Edit):
    """Generate where ``mask`` is 0 and keep ``known`` where it is 1 (both (n, ...) for the n samples).

    ``method``: ``replace`` or ``repaint`` (with ``jump_length``, ``resamplings``). The result keeps
    the known values exactly (a final composite)."""

    def __init__(self, known: Tensor, mask: Tensor, method: str = "replace", jump_length: int = 10,
                 resamplings: int = 10):
        if method not in EDITS:
            raise ValueError(f"unknown inpainting method {method!r}; expected one of {', '.join(EDITS)}")
        if method == "repaint":
            repaint_path(1, jump_length, resamplings)  # checks the values
        self.known, self.mask = known, mask
        self.method, self.jump_length, self.resamplings = method, jump_length, resamplings

    def wrap(self, model, rows: slice):
        return KnownRegion(model, self.known[rows], self.mask[rows])

    def run(self, sample, model, x, sigmas, cond, noise, seeds):
        if self.method == "replace":
            return sample(model, x, sigmas, cond, noise=noise)
        fresh = SeededNoise([derive_seed(s, REPAINT_STREAM) for s in seeds], x.shape[1:], device=x.device)
        s = sigmas.tolist()
        for first, last in _stretches(repaint_path(len(s) - 1, self.jump_length, self.resamplings)):
            if last > first:
                x = sample(model, x, sigmas[first:last + 1], cond, noise=noise)
            else:  # back up the grid: x_first ~ N(x_last, (sigma_first^2 - sigma_last^2) I)
                x = x + math.sqrt(s[last] ** 2 - s[first] ** 2) * fresh().to(x)
        return x

    def finish(self, x, rows):
        return composite(self.known[rows].to(x), x, self.mask[rows].to(x))


__all__ = ["EDITS", "Inpaint", "KnownRegion", "repaint_path"]
