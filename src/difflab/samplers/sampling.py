"""Samplers: one function per method, one signature (k-diffusion style).

    x0 = sample_<name>(denoiser, x, sigmas, cond=None, *, noise=None,
                       callback=None, progress=True, **knobs)

``x`` arrives scaled by ``sigmas[0]``; ``sigmas`` descends and ends in 0;
``denoiser(x, sigma, cond)`` returns x0_hat. Coefficients are computed in
float64 (Python floats) whatever the dtype of ``x``; state lives in locals.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .noise import global_noise


def _steps(sigmas: Tensor, progress: bool):
    """(i, sigma, sigma_next) as Python floats, with a tqdm bar."""
    s = torch.as_tensor(sigmas).double().tolist()
    if not isinstance(s, list) or len(s) < 2 or any(b >= a for a, b in zip(s, s[1:])) or s[-1] < 0:
        shown = s if not isinstance(s, list) or len(s) <= 8 else s[:4] + ["..."] + s[-3:]
        raise ValueError(f"sigmas must be a 1-D, strictly decreasing, non-negative grid of at least "
                         f"2 levels, got {shown}")
    for i in tqdm(range(len(s) - 1), disable=not progress, desc="sampling", leave=False):
        yield i, s[i], s[i + 1]


def _denoise(denoiser, x: Tensor, sigma: float, cond) -> Tensor:
    return denoiser(x, torch.full((len(x),), sigma, dtype=torch.float64, device=x.device), cond)


def _report(callback, x, i, sigma, sigma_next, x0_hat):
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_next": sigma_next, "x0_hat": x0_hat})


def add_noise(x, std: float, noise, sigma: float, sigma_next: float):
    """x + std z with z = noise(sigma, sigma_next), drawing z only when std > 0."""
    return x + std * noise(sigma, sigma_next).to(x) if std > 0 else x


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up): split a step into a deterministic part and fresh noise.

    sigma_up^2 = eta^2 sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2, capped at sigma_next.
    With eta = 1 this is the DDPM posterior; eta scales it as in DDIM (Song et al. 2021, Eq. 16).
    """
    if sigma_next == 0:
        return 0.0, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


def _churn(x, sigma, n_steps, noise, s_churn, s_tmin, s_tmax, s_noise):
    """EDM Alg. 2 lines 4-6: raise sigma to sigma_hat = sigma (1 + gamma) by adding fresh noise."""
    gamma = min(s_churn / n_steps, 2**0.5 - 1) if s_churn > 0 and s_tmin <= sigma <= s_tmax else 0.0
    if gamma == 0:
        return x, sigma
    sigma_hat = sigma * (1 + gamma)
    return add_noise(x, math.sqrt(sigma_hat**2 - sigma**2) * s_noise, noise, sigma, sigma_hat), sigma_hat


@torch.no_grad()
def sample_euler(denoiser, x, sigmas, cond=None, *, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"),
                 s_noise=1.0, noise=None, callback=None, progress=True):
    """Euler steps of the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma
    (Karras et al. 2022, Alg. 2 with Euler steps). Identical to DDIM(eta=0) when s_churn = 0."""
    noise = noise or global_noise(x)
    for i, sigma, sigma_next in _steps(sigmas, progress):
        x, sigma_hat = _churn(x, sigma, len(sigmas) - 1, noise, s_churn, s_tmin, s_tmax, s_noise)
        x0_hat = _denoise(denoiser, x, sigma_hat, cond)
        _report(callback, x, i, sigma_hat, sigma_next, x0_hat)
        x = x0_hat + (sigma_next / sigma_hat) * (x - x0_hat)
    return x


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, cond=None, *, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"),
                s_noise=1.0, noise=None, callback=None, progress=True):
    """Karras et al. 2022, Alg. 2: Heun's 2nd-order method with optional churn (Alg. 1 when s_churn = 0).

    The last step (to sigma = 0) is an Euler step, so N steps cost 2N - 1 evaluations.
    """
    noise = noise or global_noise(x)
    for i, sigma, sigma_next in _steps(sigmas, progress):
        x, sigma_hat = _churn(x, sigma, len(sigmas) - 1, noise, s_churn, s_tmin, s_tmax, s_noise)
        x0_hat = _denoise(denoiser, x, sigma_hat, cond)
        _report(callback, x, i, sigma_hat, sigma_next, x0_hat)
        d = (x - x0_hat) / sigma_hat
        x_next = x + (sigma_next - sigma_hat) * d
        if sigma_next > 0:
            d_next = (x_next - _denoise(denoiser, x_next, sigma_next, cond)) / sigma_next
            x_next = x + (sigma_next - sigma_hat) * (d + d_next) / 2
        x = x_next
    return x


@torch.no_grad()
def sample_euler_ancestral(denoiser, x, sigmas, cond=None, *, eta=1.0, s_noise=1.0, noise=None,
                           callback=None, progress=True):
    """Euler step to sigma_down, then fresh noise of std sigma_up (k-diffusion); eta = 1 is DDPM-like."""
    noise = noise or global_noise(x)
    for i, sigma, sigma_next in _steps(sigmas, progress):
        x0_hat = _denoise(denoiser, x, sigma, cond)
        _report(callback, x, i, sigma, sigma_next, x0_hat)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = add_noise(x0_hat + (sigma_down / sigma) * (x - x0_hat), sigma_up * s_noise, noise, sigma, sigma_next)
    return x


def sample_ddim(denoiser, x, sigmas, cond=None, *, eta=0.0, noise=None, callback=None, progress=True):
    """DDIM(eta) (Song et al. 2021, Eq. 12) is Euler-ancestral(eta) in sigma space.

    x_next = x0_hat + sigma_down eps_hat + sigma_up z equals the classic
    sqrt(abar') x0 + sqrt(1 - abar' - s^2) eps + s z, divided by sqrt(abar').
    """
    return sample_euler_ancestral(denoiser, x, sigmas, cond, eta=eta, noise=noise, callback=callback,
                                  progress=progress)


@torch.no_grad()
def sample_ddpm(denoiser, x, sigmas, cond=None, *, variance="fixed_small", noise=None,
                callback=None, progress=True):
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2), with step skipping.

    The posterior q(x_next | x, x0_hat) in sigma space has mean
    x0_hat + (sigma_next/sigma)^2 (x - x0_hat) and variance
    ``fixed_small``: sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2  (beta-tilde), or
    ``fixed_large``: (sigma^2 - sigma_next^2)(1 + sigma_next^2) / (1 + sigma^2)  (beta),
    each the alpha-space variance divided by abar_next.
    """
    if variance not in ("fixed_small", "fixed_large"):
        raise ValueError(f"unknown DDPM variance {variance!r}; expected fixed_small or fixed_large")
    noise = noise or global_noise(x)
    for i, sigma, sigma_next in _steps(sigmas, progress):
        x0_hat = _denoise(denoiser, x, sigma, cond)
        _report(callback, x, i, sigma, sigma_next, x0_hat)
        if variance == "fixed_small":
            var = sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2
        else:
            var = (sigma**2 - sigma_next**2) * (1 + sigma_next**2) / (1 + sigma**2) if sigma_next > 0 else 0.0
        x = add_noise(x0_hat + (sigma_next / sigma) ** 2 * (x - x0_hat), math.sqrt(var), noise, sigma, sigma_next)
    return x


@torch.no_grad()
def sample_consistency(denoiser, x, sigmas, cond=None, *, noise=None, callback=None, progress=True):
    """Multistep consistency sampling (Song et al. 2023, Alg. 1): x0 = f(x, sigma), then fresh noise
    back up to the next level, x = x0 + sqrt(sigma_next^2 - sigma_min^2) z. One step is the
    one-evaluation sample f(sigma_max z, sigma_max); sigma_min is the model schedule's."""
    noise = noise or global_noise(x)
    sigma_min = denoiser.schedule.sigma_min
    for i, sigma, sigma_next in _steps(sigmas, progress):
        x0_hat = _denoise(denoiser, x, sigma, cond)
        _report(callback, x, i, sigma, sigma_next, x0_hat)
        x = add_noise(x0_hat, math.sqrt(max(sigma_next**2 - sigma_min**2, 0.0)), noise, sigma, sigma_next)
    return x
