import math

import pytest
import torch

from conftest import GaussianDenoiser
from difflab import samplers, schedules
from difflab.samplers import SeededNoise, get_sampler, sample_ddim, sample_ddpm, sample_euler


class FixedNoise:
    """Replays a list of noise tensors, so two formulas can share the same draws."""

    def __init__(self, draws):
        self.draws, self.i = draws, 0

    def __call__(self, *_):
        self.i += 1
        return self.draws[self.i - 1]


def _setup(steps=10, seed=0):
    sched = schedules.linear(1000)
    ts = sched.timesteps(steps, "leading")
    sigmas = torch.cat([sched.sigmas_table[ts], torch.zeros(1, dtype=torch.float64)])
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64) * sigmas[0]
    draws = [torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64) for _ in range(steps)]
    return sched, ts, sigmas, x, draws


def _abar(sched, ts, i):
    return sched.alphas_cumprod[ts[i]].item() if i < len(ts) else 1.0


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_equals_alpha_space_formula(eta):
    """Song et al. 2021 Eq. 12 with step skipping, vs sample_ddim in sigma space, float64."""
    sched, ts, sigmas, x, draws = _setup()
    den = GaussianDenoiser()
    out = sample_ddim(den, x.clone(), sigmas, eta=eta, noise=FixedNoise(draws), progress=False)
    z = x * math.sqrt(_abar(sched, ts, 0))  # VP coordinates
    for i in range(len(ts)):
        a, a_prev = _abar(sched, ts, i), _abar(sched, ts, i + 1)
        sigma = math.sqrt((1 - a) / a)
        x0 = den(z / math.sqrt(a), sigma)
        eps = (z - math.sqrt(a) * x0) / math.sqrt(1 - a)
        s = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        z = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - s**2) * eps + (s * draws[i] if i < len(ts) - 1 else 0)
    torch.testing.assert_close(out, z, rtol=0, atol=1e-10)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_equals_alpha_space_posterior(variance):
    """Ho et al. 2020 posterior mean/variance (guided-diffusion p_sample), respaced, vs sample_ddpm."""
    sched, ts, sigmas, x, draws = _setup(steps=25)
    den = GaussianDenoiser()
    out = sample_ddpm(den, x.clone(), sigmas, variance=variance, noise=FixedNoise(draws), progress=False)
    z = x * math.sqrt(_abar(sched, ts, 0))
    for i in range(len(ts)):
        a, a_prev = _abar(sched, ts, i), _abar(sched, ts, i + 1)
        beta = 1 - a / a_prev  # respaced beta
        x0 = den(z / math.sqrt(a), math.sqrt((1 - a) / a))
        mean = beta * math.sqrt(a_prev) / (1 - a) * x0 + (1 - a_prev) * math.sqrt(1 - beta) / (1 - a) * z
        var = beta * (1 - a_prev) / (1 - a) if variance == "fixed_small" else beta
        z = mean + (math.sqrt(var) * draws[i] if i < len(ts) - 1 else 0)
    x_out = z / math.sqrt(_abar(sched, ts, len(ts)))
    torch.testing.assert_close(out, x_out, rtol=0, atol=1e-10)


def test_euler_is_ddim_eta0_and_converges_on_gaussian():
    sched, ts, sigmas, x, _ = _setup()
    den = GaussianDenoiser()
    torch.testing.assert_close(sample_euler(den, x, sigmas, progress=False),
                               sample_ddim(den, x, sigmas, eta=0.0, progress=False), rtol=0, atol=1e-12)
    # the PF-ODE maps N(0, sigma_max^2) to N(mu, s^2 + ...): exact solution x0 = mu + s (x - mu)/sqrt(s^2+sigma^2)
    x = torch.randn(2000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 80
    exact = 0.3 + 0.7 * (x - 0.3) / math.sqrt(0.49 + 80**2)
    err = {n: (sample_euler(den, x, schedules.EDM(0.002, 80).sigmas(n), progress=False) - exact).abs().max().item()
           for n in (100, 200, 400)}
    assert err[400] < 0.02
    # first order: doubling the steps halves the error
    assert 0.4 < err[400] / err[200] < 0.6 and 0.4 < err[200] / err[100] < 0.6


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_distribution_matches_target(variance):
    sched = schedules.linear(1000)
    den = GaussianDenoiser(mu=0.3, s=0.7)
    sigmas = sched.sigmas(1000, "trailing")
    torch.manual_seed(0)
    x = torch.randn(20000, 1, dtype=torch.float64) * sigmas[0]
    out = sample_ddpm(den, x, sigmas, variance=variance, progress=False)
    assert out.mean().item() == pytest.approx(0.3, abs=0.02)
    assert out.std().item() == pytest.approx(0.7, abs=0.02)


def test_seeded_noise_is_batch_independent_and_reproducible():
    den = GaussianDenoiser()
    sigmas = schedules.cosine(1000).sigmas(8)

    def run(seeds):
        noise = SeededNoise(seeds, (3,), dtype=torch.float64)
        return sample_ddpm(den, noise() * sigmas[0], sigmas, noise=noise, progress=False)

    full = run([10, 11, 12, 13])
    torch.testing.assert_close(run([12, 13]), full[2:], rtol=0, atol=0)
    torch.testing.assert_close(run([10, 11, 12, 13]), full, rtol=0, atol=0)
    assert not torch.equal(run([20, 21, 22, 23]), full)


def test_callback_registry_and_errors():
    seen = []
    sigmas = schedules.cosine(1000).sigmas(5)
    sample_euler(GaussianDenoiser(), torch.zeros(1, 2), sigmas, callback=seen.append, progress=False)
    assert [d["i"] for d in seen] == [0, 1, 2, 3, 4] and set(seen[0]) >= {"x", "sigma", "x0_hat"}
    assert seen[-1]["sigma_next"] == 0
    with pytest.raises(ValueError, match="valid samplers: consistency, ddim, ddpm, dpm_fast, .*, euler, euler_ancestral, heun"):
        get_sampler("dpm++")
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample_euler(GaussianDenoiser(), torch.zeros(1, 2), torch.tensor([1.0, 2.0, 0.0]), progress=False)
    with pytest.raises(ValueError, match="fixed_small or fixed_large"):
        sample_ddpm(GaussianDenoiser(), torch.zeros(1, 2), sigmas, variance="learned", progress=False)
    assert samplers.ancestral_step(1.0, 0.0) == (0.0, 0.0)
