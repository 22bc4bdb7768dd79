import pytest
import torch

from difflab import denoisers, schedules


def _sample(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(6, 2, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(6, 2, 4, 4, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.1, 0.5, 1.0, 5.0, 80.0], dtype=torch.float64)
    return x0, noise, sigma, x0 + sigma.view(-1, 1, 1, 1) * noise


def test_conversions_round_trip():
    x0, noise, sigma, x = _sample()
    s = sigma.view(-1, 1, 1, 1)
    eps = denoisers.eps_from_x0(x, x0, s)
    torch.testing.assert_close(eps, noise)
    torch.testing.assert_close(denoisers.x0_from_eps(x, eps, s), x0)
    v = denoisers.v_from_x0(x, x0, s)
    torch.testing.assert_close(denoisers.x0_from_v(x, v, s), x0)
    alpha, sigma_vp = (1 + s**2) ** -0.5, s * (1 + s**2) ** -0.5
    torch.testing.assert_close(v, alpha * noise - sigma_vp * x0)  # v = alpha eps - sigma x0 in VP terms
    torch.testing.assert_close(denoisers.score_from_x0(x, x0, s), -noise / s)


class Oracle(torch.nn.Module):
    """Returns whatever target the test sets, ignoring its inputs."""
    target = None

    def forward(self, x, c_noise, cond=None):
        return self.target


@pytest.mark.parametrize("name,target_fn", [
    ("eps", lambda x0, n, s, x: n),
    ("v", lambda x0, n, s, x: denoisers.v_from_x0(x, x0, s)),
    ("x0", lambda x0, n, s, x: x0),
])
def test_vp_wrappers_recover_x0_from_their_target(name, target_fn):
    x0, noise, sigma, x = _sample()
    net = Oracle()
    net.target = target_fn(x0, noise, sigma.view(-1, 1, 1, 1), x)
    d = denoisers.build(name, net, schedules.cosine(1000))
    torch.testing.assert_close(d(x, sigma), x0, rtol=1e-10, atol=1e-10)
    loss = d.loss(x0, sigma, noise)
    assert loss.shape == (6,) and loss.abs().max() < 1e-10


def test_edm_scalings_and_weighting():
    x0, noise, sigma, x = _sample()
    d = denoisers.EDMDenoiser(Oracle(), schedules.EDM(), sigma_data=0.5)
    c_skip, c_out, c_in = d.scalings(sigma)
    torch.testing.assert_close(c_skip, 0.25 / (sigma**2 + 0.25))
    torch.testing.assert_close(c_out, sigma * 0.5 / (sigma**2 + 0.25).sqrt())
    torch.testing.assert_close(c_in, 1 / (sigma**2 + 0.25).sqrt())
    # lambda(sigma) c_out^2 = 1: EDM weighting is uniform in network space
    torch.testing.assert_close(d.loss_weight(sigma, "edm"), torch.ones_like(sigma))
    torch.testing.assert_close(d.c_noise(sigma), sigma.log() / 4)


def test_min_snr_weights_match_their_usual_forms():
    sigma = torch.tensor([0.05, 0.3, 1.0, 10.0], dtype=torch.float64)
    snr, gamma = sigma**-2, 5.0
    eps = denoisers.EpsDenoiser(Oracle(), schedules.cosine())
    torch.testing.assert_close(eps.loss_weight(sigma, "min_snr", gamma), snr.clamp(max=gamma) / snr)
    v = denoisers.VDenoiser(Oracle(), schedules.cosine())
    torch.testing.assert_close(v.loss_weight(sigma, "min_snr", gamma), snr.clamp(max=gamma) / (snr + 1))
    x0 = denoisers.X0Denoiser(Oracle(), schedules.cosine())
    torch.testing.assert_close(x0.loss_weight(sigma, "min_snr", gamma), snr.clamp(max=gamma))


def test_loss_kinds_and_errors():
    x0, noise, sigma, x = _sample()
    net = Oracle()
    net.target = noise + 0.5
    d = denoisers.EpsDenoiser(net, schedules.cosine())
    torch.testing.assert_close(d.loss(x0, sigma, noise, kind="mse"), torch.full((6,), 0.25, dtype=torch.float32))
    torch.testing.assert_close(d.loss(x0, sigma, noise, kind="l1"), torch.full((6,), 0.5, dtype=torch.float32))
    torch.testing.assert_close(d.loss(x0, sigma, noise, kind="huber", huber_delta=0.1),
                               torch.full((6,), 0.1 * (0.5 - 0.05), dtype=torch.float32))
    with pytest.raises(ValueError, match="unknown loss kind"):
        d.loss(x0, sigma, noise, kind="l3")
    with pytest.raises(ValueError, match="unknown weighting"):
        d.loss(x0, sigma, noise, weighting="snr")
    with pytest.raises(ValueError, match="sigma must be a scalar or have shape"):
        d(x, sigma[:3])
    with pytest.raises(ValueError, match="unknown parametrization"):
        denoisers.build("score", net, schedules.cosine())


def test_discrete_c_noise_is_fractional_timestep():
    s = schedules.cosine(1000)
    d = denoisers.EpsDenoiser(Oracle(), s)
    torch.testing.assert_close(d.c_noise(s.sigmas_table[[0, 10, 999]]), torch.tensor([0.0, 10.0, 999.0],
                                                                                     dtype=torch.float64))
