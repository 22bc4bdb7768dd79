"""Deterministic inversion: the probability-flow ODE run up the sampler's grid, from an image to the
noise that a deterministic sampler maps back onto it (DDIM inversion, Song et al. 2021 Sec. 4.3;
Dhariwal & Nichol 2021; Mokady et al. 2023 Sec. 3).

In sigma space a DDIM step from sigma to sigma' is ``x' = x0_hat + (sigma' / sigma)(x - x0_hat)``
whichever way it goes, and a DPM-Solver++(2M) step ``x' = (sigma'/sigma) x - expm1(-h) D`` with
``h = log(sigma / sigma')`` (negative going up) and the second-order combination ``D`` of the last
two estimates. The image is taken as the state at the grid's smallest positive sigma; the error of
inversion is that each step evaluates the denoiser where the step starts, not along it, so it
shrinks with the number of steps.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from tqdm.auto import tqdm

SOLVERS = ("ddim", "dpmpp_2m")


@torch.no_grad()
def invert(denoiser, x0: Tensor, sigmas: Tensor, cond=None, solver: str = "ddim", progress: bool = True) -> Tensor:
    """The state at ``sigmas[0]`` (the top of the descending grid ``sigmas``) that ``solver`` run down
    ``sigmas`` maps back to about ``x0``."""
    if solver not in SOLVERS:
        raise ValueError(f"inversion is built for the deterministic solvers {', '.join(SOLVERS)}, got {solver!r}")
    up = torch.as_tensor(sigmas).double().flip(0).tolist()
    up = [s for s in up if s > 0]
    x, previous = x0.clone(), None
    for i in tqdm(range(len(up) - 1), disable=not progress, desc=f"invert ({solver})", leave=False):
        sigma, sigma_next = up[i], up[i + 1]
        x0_hat = denoiser(x, torch.full((len(x),), sigma, dtype=torch.float64, device=x.device), cond)
        h = math.log(sigma / sigma_next)
        estimate = x0_hat
        if solver == "dpmpp_2m" and previous is not None:
            r = previous[1] / h
            estimate = (1 + 1 / (2 * r)) * x0_hat - (1 / (2 * r)) * previous[0]
        x = (sigma_next / sigma) * x - math.expm1(-h) * estimate
        previous = (x0_hat, h)
    return x
