import math

import pytest
import torch

from conftest import GaussianDenoiser
from difflab.samplers.unipc import sample_unipc
from difflab.schedules import karras_grid

MU, S = 0.3, 0.7


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _diffusers_run(variant, order, steps, lower_order_final=True, float64_coeffs=True):
    """Run diffusers' UniPCMultistepScheduler (x0 model, linspace timesteps on a linear-beta table).

    Returns our inputs (VE sigmas, VE x_T), diffusers' corrected sample at every sigma_i (in VE:
    x_vp / alpha_i, alpha_i = 1/sqrt(1+sigma_i^2) exactly as its ``_sigma_to_alpha_sigma_t``), its final
    sample (VP = VE at sigma 0) or None, and the last model output.
    """
    diffusers = pytest.importorskip("diffusers")
    cls = getattr(diffusers, "UniPCMultistepScheduler", None) or diffusers.UNIPCMultistepScheduler
    sched = cls(beta_schedule="linear", prediction_type="sample", predict_x0=True, solver_type=variant,
                solver_order=order, lower_order_final=lower_order_final, final_sigmas_type="zero",
                thresholding=False)
    sched.set_timesteps(steps)
    sigmas = sched.sigmas.double()
    if float64_coeffs:
        # diffusers stores its grid as float32 and derives alpha, lambda, h, rho from it in that dtype
        # (~1e-7 relative error on a float64 sample). Same grid values, promoted, so both run in float64.
        sched.sigmas = sigmas
    den = GaussianDenoiser(MU, S)
    g = torch.Generator().manual_seed(0)
    x_ve = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) * sigmas[0]
    x, traj = x_ve / math.sqrt(1 + sigmas[0].item() ** 2), []
    for i, t in enumerate(sched.timesteps):
        alpha = (1 + sigmas[i] ** 2) ** -0.5
        out = den(x / alpha, sigmas[i].expand(len(x)))
        try:
            x = sched.step(out, t, x).prev_sample
        except torch.linalg.LinAlgError:  # order > 1 step to sigma = 0 (lambda = inf): R is singular
            x = None
        traj.append(sched.last_sample / alpha)  # set before the predictor, i.e. after UniC
    return sigmas, x_ve, traj, x, out


@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_parity_with_diffusers(variant, order, steps):
    sigmas, x_ve, ref_traj, ref, last_out = _diffusers_run(variant, order, steps)
    traj = []
    x0 = sample_unipc(GaussianDenoiser(MU, S), x_ve, sigmas, order=order, variant=variant,
                      callback=lambda d: traj.append(d["x"]), progress=False)
    assert len(traj) == len(ref_traj) == steps
    assert max(_rel(a, b) for a, b in zip(traj, ref_traj)) <= 1e-12
    if variant == "bh1":
        # diffusers' last step (order 1, sigma_next = 0) computes x - alpha_t * B(h) * 0 with
        # B(h) = h = -inf, i.e. NaN. Its limit, x0_hat of the last evaluation, is what we return.
        assert torch.isnan(ref).all()
        ref = last_out
    assert _rel(x0, ref) <= 1e-12


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_parity_with_diffusers_float32_grid_and_no_lower_order_final(variant):
    # diffusers' own float32 coefficients: agreement to ~1e-7
    sigmas, x_ve, _, ref, last_out = _diffusers_run(variant, 3, 20, float64_coeffs=False)
    x0 = sample_unipc(GaussianDenoiser(MU, S), x_ve, sigmas, order=3, variant=variant, progress=False)
    assert _rel(x0, last_out if variant == "bh1" else ref) <= 1e-5
    # Without lower_order_final the penultimate step keeps order 3 (diffusers then fails on the
    # step to sigma = 0, which we take as x = x0_hat); the trajectory up to there must agree.
    sigmas, x_ve, ref_traj, _, _ = _diffusers_run(variant, 3, 20, lower_order_final=False)
    traj = []
    sample_unipc(GaussianDenoiser(MU, S), x_ve, sigmas, order=3, variant=variant, lower_order_final=False,
                 callback=lambda d: traj.append(d["x"]), progress=False)
    assert max(_rel(a, b) for a, b in zip(traj, ref_traj)) <= 1e-12
    assert _rel(traj[-1], _diffusers_run(variant, 3, 20)[2][-1]) > 1e-6  # lower_order_final does matter


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_convergence_order(variant, order):
    """UniC lifts UniP-p to order p + 1 (Zhao et al. 2023). Measured observed orders
    log2(err_n / err_2n) over n = 20 -> 40 -> 80 Karras steps: >= 1.96 / 3.10 / 3.97 for p = 1 / 2 / 3
    (without the corrector: 0.99 / 2.12 / 3.12), so p + 0.5 separates the two."""
    den = GaussianDenoiser(MU, S)
    z = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errs = []
    for n in (20, 40, 80):
        sigmas = karras_grid(n, 0.002, 80.0)
        x_T = z * sigmas[0]
        exact = MU + S * (x_T - MU) / math.sqrt(S**2 + sigmas[0].item() ** 2)
        errs.append((sample_unipc(den, x_T, sigmas, order=order, variant=variant, progress=False)
                     - exact).abs().max().item())
    observed = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
    assert min(observed) >= order + 0.5, (errs, observed)


def test_keeps_dtype_and_reports_each_step():
    sigmas = karras_grid(6, 0.002, 80.0)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * sigmas[0].item()
    calls = []
    out = sample_unipc(GaussianDenoiser(MU, S), x, sigmas, callback=calls.append, progress=False)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert [c["i"] for c in calls] == list(range(6)) and calls[-1]["sigma_next"] == 0.0


@pytest.mark.parametrize("kw, match", [({"order": 4}, "order must be 1, 2 or 3"),
                                       ({"order": 0}, "order must be 1, 2 or 3"),
                                       ({"variant": "bh3"}, "expected 'bh1'.*or 'bh2'")])
def test_bad_arguments(kw, match):
    sigmas = karras_grid(4, 0.002, 80.0)
    with pytest.raises(ValueError, match=match):
        sample_unipc(GaussianDenoiser(MU, S), torch.zeros(1, 2), sigmas, progress=False, **kw)
