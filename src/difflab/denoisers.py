"""Denoisers: a network plus its parametrisation, in sigma space.

``D(x, sigma, cond) = c_skip x + c_out F(c_in x, c_noise, cond)`` (Karras et
al. 2022, Eq. 7). Each wrapper only chooses the four ``c_*``; the forward pass
and the training loss are written once. Conversions between eps, x0, v and the
score live here and nowhere else.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cond import Cond
from .schedules import NoiseSchedule
from .tensors import append_dims, batch_sigma

WEIGHTINGS = ("uniform", "min_snr", "edm")
LOSS_KINDS = ("mse", "l1", "huber")


# ------------------------------------------------ conversions (x in sigma space)

def eps_from_x0(x: Tensor, x0: Tensor, sigma) -> Tensor:
    return (x - x0) / sigma


def x0_from_eps(x: Tensor, eps: Tensor, sigma) -> Tensor:
    return x - sigma * eps


def v_from_x0(x: Tensor, x0: Tensor, sigma) -> Tensor:
    """v = alpha eps - sigma_vp x0 (Salimans & Ho 2022), with alpha = 1/sqrt(1+sigma^2)."""
    alpha = (1 + sigma**2) ** -0.5
    return alpha * (eps_from_x0(x, x0, sigma) - sigma * x0)


def x0_from_v(x: Tensor, v: Tensor, sigma) -> Tensor:
    alpha = (1 + sigma**2) ** -0.5
    return alpha**2 * x - sigma * alpha * v


def velocity_from_x0(x: Tensor, x0: Tensor, sigma) -> Tensor:
    """The flow velocity dx_t/dt = n - x0 of ``x_t = (1 - t) x0 + t n`` (Liu et al. 2023), with
    ``x = x_t / (1 - t)`` in sigma space, ``sigma = t / (1 - t)``."""
    return eps_from_x0(x, x0, sigma) - x0


def x0_from_velocity(x: Tensor, v: Tensor, sigma) -> Tensor:
    """x0 = x_t - t v, i.e. (x - sigma v) / (1 + sigma) in sigma space."""
    return (x - sigma * v) / (1 + sigma)


def score_from_x0(x: Tensor, x0: Tensor, sigma) -> Tensor:
    """grad_x log p_sigma(x) = (x0_hat - x) / sigma^2 (Tweedie)."""
    return (x0 - x) / sigma**2


# ----------------------------------------------------------------- denoisers
#
# The Denoiser protocol, all that samplers, guidance and ``generate`` rely on:
#   denoiser(x, sigma, cond=None) -> x0_hat   x in sigma space, sigma (B,) float64, cond a Cond or None
#   denoiser.schedule                          its NoiseSchedule: sigma_min, sigma_max, sigmas(steps, spacing)
# ``Denoiser`` below (a network and its parametrisation) and every ``DenoiserWrapper`` keep it.


class Denoiser(nn.Module):
    """Base class: subclasses define ``scalings(sigma) -> (c_skip, c_out, c_in)`` in float64."""

    def __init__(self, net: nn.Module, schedule: NoiseSchedule):
        super().__init__()
        self.net = net
        self.schedule = schedule

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in), each a (B,) float64 tensor like ``sigma``."""
        raise NotImplementedError

    def c_noise(self, sigma: Tensor) -> Tensor:
        return self.schedule.c_noise(sigma)

    def _net(self, x: Tensor, sigma: Tensor, cond: Cond | None):
        # one stack, cast and reshape for the three (B,) coefficients: a sampler pays this per call
        c = torch.stack(self.scalings(sigma)).to(x.dtype).reshape(3, len(x), *(1,) * (x.ndim - 1))
        c_skip, c_out, c_in = c.unbind(0)
        out = self.net(x * c_in, self.c_noise(sigma).to(torch.float32), cond)
        return out, c_skip, c_out

    def forward(self, x: Tensor, sigma, cond: Cond | None = None) -> Tensor:
        """x0_hat for a sigma-space input ``x = x0 + sigma n``."""
        sigma = batch_sigma(x, sigma)
        out, c_skip, c_out = self._net(x, sigma, cond)
        return torch.addcmul(c_skip * x, c_out, out.to(x.dtype))

    def loss_weight(self, sigma: Tensor, weighting: str = "uniform", min_snr_gamma: float = 5.0) -> Tensor:
        """Per-sample weight on the network-space loss.

        ``uniform`` is the plain loss on this parametrisation's target (eps-MSE
        for an eps model). ``min_snr`` weights the x0 error by min(SNR, gamma)
        (Hang et al. 2023); ``edm`` by (sigma^2 + sigma_d^2)/(sigma sigma_d)^2
        (Karras et al. 2022, Table 1). An x0-space weight w becomes w c_out^2
        in network space.
        """
        if weighting == "uniform":
            return torch.ones_like(sigma)
        c_out2 = self.scalings(sigma)[1] ** 2
        if weighting == "min_snr":
            return (sigma**-2).clamp(max=min_snr_gamma) * c_out2
        if weighting == "edm":
            sd = getattr(self, "sigma_data", 1.0)
            return (sigma**2 + sd**2) / (sigma * sd) ** 2 * c_out2
        raise ValueError(f"unknown weighting {weighting!r}; expected one of {', '.join(WEIGHTINGS)}")

    def loss(self, x0: Tensor, sigma, noise: Tensor, cond: Cond | None = None, *,
             weighting: str = "uniform", kind: str = "mse", min_snr_gamma: float = 5.0,
             huber_delta: float = 1.0) -> Tensor:
        """Per-sample training loss at ``x = x0 + sigma noise`` against this parametrisation's target."""
        sigma = batch_sigma(x0, sigma)
        x = x0 + append_dims(sigma, x0.ndim).to(x0.dtype) * noise
        out, c_skip, c_out = self._net(x, sigma, cond)
        target = (x0 - c_skip * x) / c_out
        out = out.float()
        target = target.float()
        if kind == "mse":
            err = (out - target) ** 2
        elif kind == "l1":
            err = (out - target).abs()
        elif kind == "huber":
            err = F.huber_loss(out, target, reduction="none", delta=huber_delta)
        else:
            raise ValueError(f"unknown loss kind {kind!r}; expected one of {', '.join(LOSS_KINDS)}")
        weight = self.loss_weight(sigma, weighting, min_snr_gamma).to(err.dtype)
        return err.flatten(1).mean(1) * weight


class EpsDenoiser(Denoiser):
    """VP network predicting eps: c_skip = 1, c_out = -sigma, c_in = 1/sqrt(sigma^2+1)."""

    def scalings(self, sigma):
        return torch.ones_like(sigma), -sigma, (sigma**2 + 1).rsqrt()


class VDenoiser(Denoiser):
    """VP network predicting v = alpha eps - sigma_vp x0 (Salimans & Ho 2022, Sec. 4)."""

    def scalings(self, sigma):
        return 1 / (sigma**2 + 1), -sigma * (sigma**2 + 1).rsqrt(), (sigma**2 + 1).rsqrt()


class X0Denoiser(Denoiser):
    """VP network predicting x0 directly."""

    def scalings(self, sigma):
        return torch.zeros_like(sigma), torch.ones_like(sigma), (sigma**2 + 1).rsqrt()


class EDMDenoiser(Denoiser):
    """EDM preconditioning (Karras et al. 2022, Table 1), sigma_data = 0.5 by default."""

    def __init__(self, net: nn.Module, schedule: NoiseSchedule, sigma_data: float = 0.5):
        super().__init__(net, schedule)
        self.sigma_data = sigma_data

    def scalings(self, sigma):
        sd2 = self.sigma_data**2
        return sd2 / (sigma**2 + sd2), sigma * self.sigma_data * (sigma**2 + sd2).rsqrt(), (sigma**2 + sd2).rsqrt()

    def c_noise(self, sigma):
        return sigma.log() / 4


class FlowDenoiser(Denoiser):
    """A network predicting the flow velocity v = n - x0 from x_t = x / (1 + sigma) (rectified flow,
    Liu et al. 2023; flow matching, Lipman et al. 2023): x0 = x_t - t v, so c_skip = c_in = 1/(1+sigma)
    and c_out = -sigma/(1+sigma). Its uniform loss is the flow-matching loss ||v_hat - (n - x0)||^2."""

    def scalings(self, sigma):
        c = 1 / (1 + sigma)
        return c, -sigma * c, c


class ConsistencyDenoiser(EDMDenoiser):
    """A consistency function f(x, sigma) (Song et al. 2023, Appendix C): EDM's c_in and c_noise with
    c_skip = sigma_d^2 / ((sigma - sigma_min)^2 + sigma_d^2) and c_out = sigma_d (sigma - sigma_min) /
    sqrt(sigma^2 + sigma_d^2), so f(x, sigma_min) = x exactly (the boundary condition). Its schedule's
    native grid is ``karras_trailing``: an evaluation at sigma_min would return its input."""

    def __init__(self, net: nn.Module, schedule: NoiseSchedule, sigma_data: float = 0.5):
        super().__init__(net, schedule.with_native_spacing("karras_trailing"), sigma_data)

    def scalings(self, sigma):
        sd, s = self.sigma_data, sigma - self.schedule.sigma_min
        return sd**2 / (s**2 + sd**2), sd * s * (sigma**2 + sd**2).rsqrt(), (sigma**2 + sd**2).rsqrt()


PARAMETRIZATIONS = {"eps": EpsDenoiser, "v": VDenoiser, "x0": X0Denoiser, "edm": EDMDenoiser, "flow": FlowDenoiser,
                    "consistency": ConsistencyDenoiser}


def build(parametrization: str, net: nn.Module, schedule: NoiseSchedule, sigma_data: float = 0.5) -> Denoiser:
    if parametrization not in PARAMETRIZATIONS:
        raise ValueError(f"unknown parametrization {parametrization!r}; expected one of {', '.join(PARAMETRIZATIONS)}")
    if parametrization in ("edm", "consistency"):
        return PARAMETRIZATIONS[parametrization](net, schedule, sigma_data)
    return PARAMETRIZATIONS[parametrization](net, schedule)


class DenoiserWrapper:
    """Base of the wrappers that take a Denoiser and are one (guidance, editing): they keep the
    wrapped ``denoiser`` and its ``schedule``, so wrappers nest and run in any sampler."""

    def __init__(self, denoiser):
        self.denoiser = denoiser

    @property
    def schedule(self) -> NoiseSchedule:
        return self.denoiser.schedule
