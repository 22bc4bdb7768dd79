import math

import numpy as np
import pytest
import torch

from difflab import schedules


def test_cosine_matches_improved_ddpm_formula():
    T = 1000
    abar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    ref = np.array([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)])
    betas = schedules.cosine_betas(T)
    assert betas.dtype == torch.float64
    np.testing.assert_allclose(betas.numpy(), ref, rtol=1e-12, atol=0)
    assert betas[-1] == 0.999  # the cap is hit at the end


def test_linear_scaled_sigmoid_endpoints():
    assert schedules.linear_betas(1000)[0] == 1e-4 and schedules.linear_betas(1000)[-1] == 0.02
    sl = schedules.scaled_linear_betas(1000)
    assert sl[0].item() == pytest.approx(0.00085, rel=1e-12) and sl[-1].item() == pytest.approx(0.012, rel=1e-12)
    sg = schedules.sigmoid_betas(1000)
    assert sg[0].item() == pytest.approx(1e-4 + (0.02 - 1e-4) / (1 + math.exp(6)), rel=1e-12)
    assert (sg.diff() > 0).all()


def test_zero_terminal_snr_rescale():
    betas = schedules.linear_betas(1000)
    rescaled = schedules.rescale_zero_terminal_snr(betas)
    abar_old, abar_new = torch.cumprod(1 - betas, 0), torch.cumprod(1 - rescaled, 0)
    assert abar_new[-1] == pytest.approx(0, abs=1e-20)
    assert abar_new[0].item() == pytest.approx(abar_old[0].item(), rel=1e-12)
    sched = schedules.linear(1000, zero_terminal_snr=True)
    assert math.isfinite(sched.sigma_max) and sched.sigma_max == pytest.approx(2**12, rel=1e-6)


def test_discrete_sigma_t_roundtrip_and_interpolation():
    s = schedules.cosine(1000)
    t = torch.tensor([0.0, 0.25, 1.5, 500.75, 998.9, 999.0], dtype=torch.float64)
    torch.testing.assert_close(s.t(s.sigma(t)), t, rtol=0, atol=1e-9)
    ints = torch.arange(1000)
    torch.testing.assert_close(s.sigma(ints.double()), s.sigmas_table, rtol=1e-12, atol=0)
    # between two entries sigma is geometric (linear in log sigma)
    mid = s.sigma(torch.tensor(10.5, dtype=torch.float64))
    assert mid.item() == pytest.approx(math.sqrt(s.sigmas_table[10] * s.sigmas_table[11]), rel=1e-12)
    expected = ((1 - s.alphas_cumprod) / s.alphas_cumprod).sqrt()
    torch.testing.assert_close(s.sigmas_table, expected)
    assert s.alpha(0).item() == pytest.approx(math.sqrt(s.alphas_cumprod[0].item()), rel=1e-12)


def test_timestep_spacings_match_diffusers_formulas():
    s = schedules.linear(1000)
    assert s.timesteps(10, "leading").tolist() == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert s.timesteps(10, "trailing").tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert s.timesteps(10, "linspace").tolist() == np.round(np.linspace(0, 999, 10))[::-1].astype(int).tolist()
    sig = s.sigmas(10, "trailing")
    assert sig[-1] == 0 and len(sig) == 11 and sig[0] == s.sigmas_table[999]
    with pytest.raises(ValueError, match="unknown timestep spacing|unknown spacing"):
        s.sigmas(10, "quadratic")


def test_karras_and_exponential_grids():
    g = schedules.karras_grid(5, 0.002, 80.0, rho=7)
    ramp = np.linspace(0, 1, 5)
    ref = (80 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    np.testing.assert_allclose(g[:-1].numpy(), ref, rtol=1e-13)
    assert g[-1] == 0 and g.dtype == torch.float64
    e = schedules.exponential_grid(4, 0.1, 10.0)
    np.testing.assert_allclose(e[:-1].numpy(), [10, 10 ** (1 / 3), 10 ** (-1 / 3), 0.1], rtol=1e-13)
    sched = schedules.cosine(1000)
    k = sched.sigmas(7, "karras")
    assert k[0].item() == pytest.approx(sched.sigma_max) and k[-2].item() == pytest.approx(sched.sigma_min)
    clamped = sched.clamp([1e6, 1.0, 1e-9, 0.0])
    assert clamped.tolist() == [sched.sigma_max, 1.0, sched.sigma_min, 0.0]


def test_continuous_vp_and_edm():
    vp = schedules.ContinuousVP()
    t = torch.linspace(1e-5, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(vp.t(vp.sigma(t)), t, rtol=0, atol=1e-12)
    assert vp.sigma(1.0).item() == pytest.approx(math.sqrt(math.exp(0.5 * 19.9 + 0.1) - 1), rel=1e-12)
    grid = vp.sigmas(5)
    assert grid[0].item() == pytest.approx(vp.sigma_max) and grid[-1] == 0
    edm = schedules.EDM()
    draws = edm.sample_sigma(200_000, torch.Generator().manual_seed(0)).log()
    assert draws.mean().item() == pytest.approx(-1.2, abs=0.01) and draws.std().item() == pytest.approx(1.2, abs=0.01)
    assert edm.c_noise(torch.tensor(math.e**4)).item() == pytest.approx(1.0)


def test_discrete_training_draws_are_table_entries():
    s = schedules.cosine(50)
    draws = s.sample_sigma(1000, torch.Generator().manual_seed(0))
    assert torch.isin(draws, s.sigmas_table).all() and draws.dtype == torch.float64
    with pytest.raises(ValueError, match="positive integer"):
        s.sigmas(0)
