"""Deterministic inversion: the probability-flow ODE run up the sampler's grid, from an image to the
noise that a deterministic sampler maps back onto it (DDIM inversion, Song et al. 2021 Sec. 4.3;
Dhariwal & Nichol 2021; Mokady et al. 2023 Sec. 3).

In sigma space a DDIM step from sigma to sigma' is ``x' = x0_hat + (sigma' / sigma)(x - x0_hat)``
whichever way it goes, and a DPM-Solver++(2M) step ``x' = (sigma'/sigma) x - expm1(-h) D`` with
``h = log(sigma / sigma')`` (negative going up) and the second-order combination ``D`` of the last
two estimates. Euler's step on the ODE ``dx/dsigma = (x - x0_hat) / sigma`` is DDIM's; Heun's
averages the slope where the step starts with the slope at the Euler prediction. The image is
taken as the state at the grid's smallest positive sigma; the error of inversion is that each
step evaluates the denoiser where the step starts, not along it, so it shrinks with the number of
steps (and with Heun's correction).
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..cond import Cond
from ..denoisers import DenoiserWrapper
from ..guidance import ClassifierFreeGuidance, rescale_guidance
from .img2img import FromState

SOLVERS = ("ddim", "euler", "heun", "dpmpp_2m")
NULL_TEXT_SOLVERS = ("ddim", "euler", "dpmpp_2m")  # one denoiser evaluation per step


def solver_step(solver: str, x: Tensor, sigma: float, sigma_next: float, x0_hat: Tensor, previous=None):
    """One ``ddim`` (= ``euler``) or ``dpmpp_2m`` step from ``sigma`` to ``sigma_next`` (down or up
    the grid) with the estimate ``x0_hat`` at ``x``; ``previous`` is the step before's (x0_hat, h).
    Returns the state and this step's (x0_hat, h). The step to sigma = 0 is x = x0_hat, as the
    samplers take it."""
    if sigma_next == 0:
        return x0_hat, None
    h = math.log(sigma / sigma_next)
    estimate = x0_hat
    if solver == "dpmpp_2m" and previous is not None:
        r = previous[1] / h
        estimate = (1 + 1 / (2 * r)) * x0_hat - (1 / (2 * r)) * previous[0]
    return (sigma_next / sigma) * x - math.expm1(-h) * estimate, (x0_hat, h)


def _check_solver(solver: str) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"inversion is built for the deterministic solvers {', '.join(SOLVERS)}, got {solver!r}")


def _full(x: Tensor, sigma: float) -> Tensor:
    return torch.full((len(x),), sigma, dtype=torch.float64, device=x.device)


@torch.no_grad()
def inversion_path(denoiser, x0: Tensor, sigmas: Tensor, cond=None, solver: str = "ddim",
                   progress: bool = True) -> list[Tensor]:
    """The states that inversion passes through, one per positive level of the descending grid
    ``sigmas``, from the smallest (``x0`` itself) to ``sigmas[0]``."""
    _check_solver(solver)
    up = [v for v in torch.as_tensor(sigmas).double().flip(0).tolist() if v > 0]
    path, previous = [x0.clone()], None
    for i in tqdm(range(len(up) - 1), disable=not progress, desc=f"invert ({solver})", leave=False):
        x0_hat = denoiser(path[-1], _full(x0, up[i]), cond)
        x, previous = solver_step(solver, path[-1], up[i], up[i + 1], x0_hat, previous)
        if solver == "heun":
            x = _heun_corrected(denoiser, path[-1], x, up[i], up[i + 1], x0_hat, cond)
        path.append(x)
    return path


def _heun_corrected(denoiser, x: Tensor, predicted: Tensor, sigma: float, sigma_next: float, x0_hat: Tensor, cond):
    """Heun's step (Karras et al. 2022, Alg. 1): the mean of the slopes at ``x`` and at the Euler
    prediction."""
    slope = (x - x0_hat) / sigma
    slope_next = (predicted - denoiser(predicted, _full(x, sigma_next), cond)) / sigma_next
    return x + (sigma_next - sigma) * (slope + slope_next) / 2


def invert(denoiser, x0: Tensor, sigmas: Tensor, cond=None, solver: str = "ddim", progress: bool = True) -> Tensor:
    """The state at ``sigmas[0]`` (the top of the descending grid ``sigmas``) that ``solver`` run down
    ``sigmas`` maps back to about ``x0``."""
    return inversion_path(denoiser, x0, sigmas, cond, solver, progress)[-1]


def grid_step(sigmas: Tensor, sigma) -> int:
    """The step of the descending grid ``sigmas`` that an evaluation at ``sigma`` belongs to: how
    many grid levels lie above it."""
    value = float(torch.as_tensor(sigma).flatten()[0])
    return int((torch.as_tensor(sigmas, dtype=torch.float64) > value * (1 + 1e-9)).sum())


def null_text_invert(denoiser, x0: Tensor, sigmas: Tensor, cond: Cond, null: Cond, scale: float,
                     solver: str = "ddim", *, rescale: float = 0.0, inner_steps: int = 10, lr: float = 1e-2,
                     epsilon: float = 1e-5, progress: bool = True) -> tuple[Tensor, list[Cond]]:
    """Null-text inversion (Mokady et al. 2023, "Null-text Inversion for Editing Real Images using
    Guided Diffusion Models", CVPR, Alg. 1): the noise and one optimised null condition per step
    with which guidance at ``scale`` retraces the conditional (guidance 1) inversion path of ``x0``.

    At each step down the grid the null embedding (text tokens and pooled vector; it starts from
    ``null``, then from the step before's result) takes up to ``inner_steps`` Adam steps on
    ``|x_next - x*_next|^2`` through the guided ``solver`` step, with the paper's decaying learning
    rate ``lr (1 - i / 100)`` and early stop at ``epsilon + 2e-5 i`` (i the step of 50; both scaled
    to the grid's length). The loss is taken on the variance-preserving state
    ``x / sqrt(1 + sigma^2)`` the paper's latents are; each row stops when all rows are below the
    bound. ``denoiser`` is unguided; the conditional branch is evaluated once per step."""
    if null.context is None:
        raise ValueError("null-text inversion optimises the null text embedding: it needs a text-conditional model")
    if solver not in NULL_TEXT_SOLVERS:
        raise ValueError(f"null-text inversion is built for the one-evaluation solvers {', '.join(NULL_TEXT_SOLVERS)}, "
                         f"got {solver!r}")
    grid = torch.as_tensor(sigmas).double().tolist()
    target = list(reversed(inversion_path(denoiser, x0, sigmas, cond, solver, progress)))  # state at grid[i]
    target.append(x0)  # what the last step, to sigma = 0, should give
    null = null.expand(len(x0))
    x, previous, nulls = target[0], None, []
    context, pooled = null.context, null.pooled
    for i in tqdm(range(len(grid) - 1), disable=not progress, desc="null-text inversion", leave=False):
        fraction = 50 * i / (len(grid) - 1)
        with torch.no_grad():
            x0_cond = denoiser(x, _full(x, grid[i]), cond)
        # fresh leaves: the nulls of the steps before must not share the storage Adam updates
        context, pooled = (None if t is None else t.detach().clone().requires_grad_(True) for t in (context, pooled))
        leaves = [t for t in (context, pooled) if t is not None]
        optimiser = torch.optim.Adam(leaves, lr=lr * (1 - fraction / 100))

        def guided_step(context, pooled):
            x0_null = denoiser(x, _full(x, grid[i]), replace(null, context=context, pooled=pooled))
            x0_hat = x0_null + scale * (x0_cond - x0_null)
            x0_hat = rescale_guidance(x0_hat, x0_cond, rescale) if rescale else x0_hat
            return solver_step(solver, x, grid[i], grid[i + 1], x0_hat, previous)

        for _ in range(inner_steps):
            x_next, _ = guided_step(context, pooled)
            loss = ((x_next - target[i + 1]) ** 2).flatten(1).mean(1) / (1 + grid[i + 1] ** 2)
            optimiser.zero_grad()
            for leaf, grad in zip(leaves, torch.autograd.grad(loss.sum(), leaves)):
                leaf.grad = grad
            optimiser.step()
            if float(loss.detach().max()) < epsilon + 2e-5 * fraction:
                break
        context, pooled = (None if t is None else t.detach() for t in (context, pooled))
        with torch.no_grad():
            x, previous = guided_step(context, pooled)
        nulls.append(replace(null, context=context, pooled=pooled))
    return target[0], nulls


class StepNullGuidance(DenoiserWrapper):
    """Classifier-free guidance at ``scale`` with the null condition of the grid step being sampled
    (``nulls[i]`` for step i of the descending grid ``sigmas``): null-text inversion's reconstruction."""

    def __init__(self, denoiser, scale: float, nulls: list[Cond], sigmas: Tensor, rescale: float = 0.0):
        super().__init__(denoiser)
        if len(nulls) != len(sigmas) - 1:
            raise ValueError(f"null-text inversion gave {len(nulls)} null conditions for a grid of "
                             f"{len(sigmas) - 1} steps: sample with the steps and grid it was inverted on")
        self.sigmas = sigmas
        self.steps = [ClassifierFreeGuidance(denoiser, scale, null, rescale) for null in nulls]

    def __call__(self, x: Tensor, sigma: Tensor, cond: Cond | None = None) -> Tensor:
        return self.steps[min(grid_step(self.sigmas, sigma), len(self.steps) - 1)](x, sigma, cond)


class NullTextReconstruction(FromState):
    """Sample down from null-text inversion's noise, guided with its per-step null conditions."""

    def __init__(self, x: Tensor, nulls: list[Cond], scale: float, rescale: float = 0.0):
        super().__init__(x)
        self.nulls, self.scale, self.rescale, self.sigmas = nulls, scale, rescale, None

    def grid(self, sigmas):
        self.sigmas = sigmas
        return sigmas

    def wrap(self, model, rows):
        nulls = [null[rows] for null in self.nulls]
        return StepNullGuidance(model, self.scale, nulls, self.sigmas, self.rescale)


__all__ = ["NULL_TEXT_SOLVERS", "SOLVERS", "NullTextReconstruction", "StepNullGuidance", "grid_step", "invert", "inversion_path",
           "null_text_invert", "solver_step"]
