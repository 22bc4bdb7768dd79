"""Parity with k-diffusion's samplers (float64, same denoiser, same grid, same noise draws)."""
import math

import pytest
import torch

from difflab import samplers
from difflab.testing import GaussianMixture

K = pytest.importorskip("k_diffusion.sampling")

GM = GaussianMixture.default(3)


def kd_model(x, sigma):
    return GM(x, sigma)


class KeyedNoise:
    """Noise that depends only on the (rounded) interval, so both libraries draw the same values."""

    def __init__(self, shape):
        self.shape = shape

    def __call__(self, sigma, sigma_next):
        key = hash((round(math.log(float(sigma)), 6), round(math.log(float(sigma_next)), 6))) % 2**31
        return torch.randn(self.shape, generator=torch.Generator().manual_seed(key), dtype=torch.float64)


def _inputs(steps=12, n=64):
    sigmas = GM.schedule.sigmas(steps)
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigmas[0]
    return x, sigmas


def _close(a, b):
    rel = ((a - b).norm() / b.norm()).item()
    assert rel <= 1e-5, rel


CASES = [  # (ours, kwargs, k-diffusion function, its kwargs, needs noise)
    ("euler", {}, K.sample_euler, {}, False),
    ("heun", {}, K.sample_heun, {}, False),
    ("euler_ancestral", {"eta": 0.7}, K.sample_euler_ancestral, {"eta": 0.7}, True),
    ("dpmpp_2m", {}, K.sample_dpmpp_2m, {}, False),
    ("dpmpp_2s_ancestral", {"eta": 1.0}, K.sample_dpmpp_2s_ancestral, {"eta": 1.0}, True),
    ("dpmpp_sde", {"eta": 1.0}, K.sample_dpmpp_sde, {"eta": 1.0}, True),
    ("dpmpp_2m_sde", {"eta": 1.0}, K.sample_dpmpp_2m_sde, {"eta": 1.0}, True),
    ("dpmpp_2m_sde", {"eta": 0.5, "solver_type": "heun"}, K.sample_dpmpp_2m_sde,
     {"eta": 0.5, "solver_type": "heun"}, True),
    ("dpmpp_3m_sde", {"eta": 1.0}, K.sample_dpmpp_3m_sde, {"eta": 1.0}, True),
    ("dpmpp_3m", {}, K.sample_dpmpp_3m_sde, {"eta": 0.0}, False),
]


@pytest.mark.parametrize("steps", [8, 20])
@pytest.mark.parametrize("name,ours_kw,kd_fn,kd_kw,noisy", CASES, ids=[c[0] + str(c[1]) for c in CASES])
def test_matches_k_diffusion(name, ours_kw, kd_fn, kd_kw, noisy, steps):
    x, sigmas = _inputs(steps)
    if name == "dpmpp_3m" or name == "dpmpp_3m_sde":
        ours_kw = {**ours_kw, "lower_order_final": False}  # k-diffusion never lowers the final orders
    if noisy:
        ours_kw = {**ours_kw, "noise": KeyedNoise(x.shape)}
        kd_kw = {**kd_kw, "noise_sampler": KeyedNoise(x.shape)}
    ours = samplers.get_sampler(name)(GM, x.clone(), sigmas, progress=False, **ours_kw)
    theirs = kd_fn(kd_model, x.clone(), sigmas, disable=True, **kd_kw)
    _close(ours, theirs)


def test_heun_churn_matches_k_diffusion():
    x, sigmas = _inputs(10)
    knobs = dict(s_churn=20.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)
    torch.manual_seed(3)  # k-diffusion draws one randn_like per step, used or not
    draws = {float(s): torch.randn_like(x) for s in sigmas[:-1]}
    ours = samplers.sample_heun(GM, x.clone(), sigmas, progress=False, noise=lambda s, s_hat: draws[s], **knobs)
    torch.manual_seed(3)
    theirs = K.sample_heun(kd_model, x.clone(), sigmas, disable=True, **knobs)
    _close(ours, theirs)
    assert (ours - samplers.sample_heun(GM, x.clone(), sigmas, progress=False)).abs().max() > 1e-3  # churn acts


@pytest.mark.parametrize("nfe", [6, 10, 11, 20])
def test_dpm_fast_matches_k_diffusion(nfe):
    x, sigmas = _inputs(nfe)
    ours = samplers.sample_dpm_fast(GM, x.clone(), sigmas, nfe=nfe, progress=False)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # k-diffusion builds its lambda grid with torch.tensor(float)
    try:
        theirs = K.sample_dpm_fast(kd_model, x.clone(), float(sigmas[-2]), float(sigmas[0]), nfe, disable=True)
    finally:
        torch.set_default_dtype(default)
    _close(ours, theirs)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_dpm_solver_singlestep_matches_k_diffusion_steps(order):
    x, sigmas = _inputs(10)
    ours = samplers.get_sampler(f"dpm_solver_{order}")(GM, x.clone(), sigmas, progress=False)
    solver = K.DPMSolver(kd_model)
    step = {1: solver.dpm_solver_1_step, 2: solver.dpm_solver_2_step, 3: solver.dpm_solver_3_step}[order]
    y = x.clone()
    for s, s_next in zip(sigmas[:-2], sigmas[1:-1]):
        y, _ = step(y, solver.t(s), solver.t(s_next))
    y = GM(y, sigmas[-2])  # the step to sigma = 0 is x0_hat
    _close(ours, y)


def test_grids_match_k_diffusion():
    from difflab import schedules

    for ours, theirs in [
        (schedules.karras_grid(13, 0.002, 80.0), K.get_sigmas_karras(13, 0.002, 80.0)),
        (schedules.exponential_grid(13, 0.002, 80.0), K.get_sigmas_exponential(13, 0.002, 80.0)),
        (schedules.polyexponential_grid(13, 0.002, 80.0, 2.0), K.get_sigmas_polyexponential(13, 0.002, 80.0, 2.0)),
    ]:
        torch.testing.assert_close(ours.float(), theirs.float(), rtol=1e-6, atol=0)
    sched = schedules.EDM()
    torch.testing.assert_close(sched.sigmas(9, "logsnr"), sched.sigmas(9, "exponential"), rtol=0, atol=0)
