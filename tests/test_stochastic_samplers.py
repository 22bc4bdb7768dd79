"""Stochastic samplers: reproducible from seeds, and sampling the right distribution (analytic mixture)."""
import math
import statistics

import pytest
import torch

from difflab import samplers
from difflab.samplers import BrownianNoise, SeededNoise
from difflab.testing import GaussianMixture

GM = GaussianMixture.default(2)
N = 1000
STOCHASTIC = sorted(name for name, info in samplers.SAMPLERS.items() if info.stochastic)


def mmd2(a, b, bandwidths=(0.2, 0.5, 1.0)):
    """Unbiased squared MMD with a sum of Gaussian kernels."""
    xx, yy, xy = torch.cdist(a, a) ** 2, torch.cdist(b, b) ** 2, torch.cdist(a, b) ** 2
    n, m = len(a), len(b)
    total = 0.0
    for h in bandwidths:
        k = lambda d: (-d / (2 * h * h)).exp()  # noqa: E731
        total += (k(xx).sum() - n) / (n * (n - 1)) + (k(yy).sum() - m) / (m * (m - 1)) - 2 * k(xy).mean()
    return float(total)


@pytest.fixture(scope="module")
def floor():
    """MMD^2 between independent exact draws of size N: mean + 3 sd over 10 pairs."""
    draws = [mmd2(GM.sample(N, torch.Generator().manual_seed(100 + i)),
                  GM.sample(N, torch.Generator().manual_seed(200 + i))) for i in range(10)]
    return statistics.mean(draws) + 3 * statistics.stdev(draws)


class FlowMap:
    """GM's exact consistency function: its probability-flow ODE from (x, sigma) down to 0 (Heun on
    a fine geometric grid). Consistency sampling samples p only with such a model; with the plain
    denoiser (the posterior mean) it would not."""
    schedule = GM.schedule

    def __call__(self, x, sigma, cond=None):
        s, s_min = float(sigma[0]), GM.schedule.sigma_min
        if s <= s_min * (1 + 1e-9):  # the boundary f(x, sigma_min) = x
            return x
        grid = torch.logspace(math.log10(s), math.log10(s_min), 48, dtype=torch.float64)
        return samplers.sample_heun(GM, x, torch.cat([grid, grid.new_zeros(1)]), progress=False)


def _run(name, seeds, steps=100, brownian=False):
    model = FlowMap() if name == "consistency" else GM
    steps = min(steps, 4) if name == "consistency" else steps  # its use: a few steps of a consistency model
    sigmas = GM.schedule.sigmas(steps)
    noise = SeededNoise(seeds, (2,), dtype=torch.float64)
    x = noise() * sigmas[0]
    if brownian:
        noise = BrownianNoise(seeds, (2,), float(sigmas[-2]), float(sigmas[0]), dtype=torch.float64)
    return samplers.get_sampler(name)(model, x, sigmas, noise=noise, progress=False)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_distribution_matches_the_mixture(name, floor):
    target = GM.sample(N, torch.Generator().manual_seed(7))
    assert mmd2(_run(name, range(N)), target) <= floor


def test_mmd_has_power(floor):
    """A mixture with other weights is detected: the test above can fail."""
    other = GaussianMixture(GM.means, GM.stds, [0.4, 0.3, 0.2, 0.1])
    target = GM.sample(N, torch.Generator().manual_seed(7))
    assert mmd2(other.sample(N, torch.Generator().manual_seed(8)), target) > 3 * floor


@pytest.mark.parametrize("name", STOCHASTIC)
def test_seeds_reproduce_and_differ(name):
    brownian = samplers.SAMPLERS[name].brownian
    a = _run(name, [1, 2, 3], steps=10, brownian=brownian)
    assert torch.equal(a, _run(name, [1, 2, 3], steps=10, brownian=brownian))
    assert (a - _run(name, [4, 5, 6], steps=10, brownian=brownian)).abs().min() > 1e-6
    torch.testing.assert_close(_run(name, [2, 3], steps=10, brownian=brownian), a[1:], rtol=0, atol=1e-12)


def test_brownian_noise_is_consistent_across_step_counts():
    """Increments over [s2, s0] equal the (scaled) sum over [s2, s1] and [s1, s0]: one path, any grid."""
    noise = BrownianNoise([0, 1], (3,), 0.01, 10.0, dtype=torch.float64)
    whole = noise(4.0, 1.0) * (4.0 - 1.0) ** 0.5
    parts = noise(4.0, 2.0) * (4.0 - 2.0) ** 0.5 + noise(2.0, 1.0) * (2.0 - 1.0) ** 0.5
    torch.testing.assert_close(whole, parts, rtol=1e-6, atol=1e-6)
