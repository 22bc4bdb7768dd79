"""The analytic mixture's posterior mean against independent computations."""
import torch

from difflab.testing import GaussianMixture


def test_diagonal_stds_equal_isotropic_when_constant():
    iso = GaussianMixture.default(3)
    diag = GaussianMixture(iso.means, iso.stds[:, None].expand(4, 3), iso.log_weights.exp())
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    for sigma in (0.01, 0.7, 30.0):
        torch.testing.assert_close(diag(x, sigma), iso(x, sigma), rtol=1e-12, atol=1e-12)


def test_single_gaussian_posterior_mean_is_the_wiener_filter():
    gm = GaussianMixture.spectral(dim=16)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s2 = gm.stds[0] ** 2
    for sigma in (0.05, 1.0):
        torch.testing.assert_close(gm(x, sigma), s2 / (s2 + sigma**2) * x, rtol=1e-12, atol=1e-12)


def test_posterior_mean_matches_monte_carlo():
    gm = GaussianMixture([[0.0, 1.0], [1.5, -1.0]], [[0.3, 0.8], [0.5, 0.2]], [0.3, 0.7])
    g = torch.Generator().manual_seed(2)
    x0 = gm.sample(400_000, g)
    x, sigma = torch.tensor([[0.4, 0.1], [1.2, -0.6]], dtype=torch.float64), 0.5
    log_lik = -((x[:, None] - x0[None]) ** 2).sum(-1) / (2 * sigma**2)  # p(x | x0), up to a constant
    mc = (log_lik.softmax(1)[..., None] * x0[None]).sum(1)
    torch.testing.assert_close(gm(x, sigma), mc, rtol=0, atol=2e-2)
    assert abs(x0.std(0)[1].item() - (0.3 * 0.8**2 + 0.7 * 0.2**2 + 0.3 * 0.7 * 4) ** 0.5) < 0.01
