"""Noise schedules and sampling grids, in float64 sigma space.

Every schedule answers the same questions: the noise level ``sigma(t)`` of its
time coordinate ``t`` and back, the VP signal scale ``alpha = 1/sqrt(1+sigma^2)``,
the log-SNR ``-2 log sigma``, how to draw training noise levels, and which
descending ``sigmas`` grid (ending in 0) a sampler should walk.

A discrete VP (DDPM) schedule ``x_t = sqrt(abar_t) x0 + sqrt(1-abar_t) eps`` is
the same process as ``x = x0 + sigma n`` with ``sigma_t = sqrt((1-abar_t)/abar_t)``
(Karras et al. 2022, "Elucidating the Design Space", Table 1).

This module imports nothing from difflab.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import Tensor

F64 = torch.float64


def _f64(x) -> Tensor:
    return torch.as_tensor(x, dtype=F64)


# ---------------------------------------------------------------- beta tables

def linear_betas(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """DDPM's linear schedule (Ho et al. 2020, Sec. 4)."""
    return torch.linspace(beta_start, beta_end, T, dtype=F64)


def scaled_linear_betas(T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """Linear in sqrt(beta): the Stable Diffusion / latent diffusion schedule."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=F64) ** 2


def cosine_betas(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Improved DDPM cosine schedule (Nichol & Dhariwal 2021, Eq. 17), beta capped at 0.999."""
    t = torch.arange(T + 1, dtype=F64) / T
    abar = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


def sigmoid_betas(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Sigmoid schedule as in diffusers' DDPMScheduler (GeoDiff, Xu et al. 2022)."""
    return torch.sigmoid(torch.linspace(-6, 6, T, dtype=F64)) * (beta_end - beta_start) + beta_start


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Shift and scale sqrt(abar) so the last step has SNR 0 (Lin et al. 2024, Alg. 1)."""
    sqrt_abar = torch.cumprod(1 - _f64(betas), 0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


BETA_TABLES = {"linear": linear_betas, "scaled_linear": scaled_linear_betas,
               "cosine": cosine_betas, "sigmoid": sigmoid_betas}


# ------------------------------------------------------------- sigma grids

def karras_grid(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022, Eq. 5: n levels from sigma_max to sigma_min, then 0."""
    ramp = torch.linspace(0, 1, n, dtype=F64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def exponential_grid(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """n levels uniform in log sigma (= uniform in log-SNR), then 0."""
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=F64).exp())


def polyexponential_grid(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> Tensor:
    """Log sigma falls as ramp^rho (k-diffusion's polyexponential); rho = 1 is the exponential grid."""
    ramp = torch.linspace(1, 0, n, dtype=F64) ** rho
    return _append_zero((ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)).exp())


def karras_trailing_grid(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """The Karras grid of n + 1 levels with its last level (sigma_min) replaced by 0, as diffusers'
    "trailing" spacing drops the lowest timestep. A model whose output at sigma_min is its input (a
    consistency model) gets n useful evaluations, and halving n keeps every other level
    (progressive distillation's nested grids): level i of n is level 2i of 2n."""
    return torch.cat([karras_grid(n + 1, sigma_min, sigma_max, rho)[:-2], torch.zeros(1, dtype=F64)])


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _check_steps(steps: int) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")


# --------------------------------------------------------------- schedules

class NoiseSchedule:
    """Protocol: ``sigma(t)``, ``t(sigma)``, training draws and sampling grids, all float64."""

    sigma_min: float
    sigma_max: float
    spacings: tuple[str, ...] = ("karras", "karras_trailing", "exponential", "logsnr", "polyexponential")

    def sigma(self, t) -> Tensor:
        raise NotImplementedError

    def t(self, sigma) -> Tensor:
        raise NotImplementedError

    def alpha(self, t) -> Tensor:
        """VP signal scale: x_vp = alpha * x_ve."""
        return (1 + self.sigma(t) ** 2).rsqrt()

    def log_snr(self, t) -> Tensor:
        return -2 * self.sigma(t).log()

    def c_noise(self, sigma) -> Tensor:
        """The network's noise-level input for ``sigma`` (its time coordinate by default)."""
        return self.t(sigma)

    def sample_sigma(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError

    def sigmas(self, steps: int, spacing: str | None = None, rho: float | None = None) -> Tensor:
        """A descending grid of ``steps`` noise levels followed by 0, within the model's range.

        ``spacing`` defaults to the schedule's first (native) spacing; ``logsnr``
        (uniform in log-SNR) is the same grid as ``exponential``. ``rho`` is 7 for
        karras and 1 for polyexponential unless given.
        """
        _check_steps(steps)
        spacing = spacing or self.spacings[0]
        if spacing == "karras":
            return karras_grid(steps, self.sigma_min, self.sigma_max, 7.0 if rho is None else rho)
        if spacing == "karras_trailing":
            return karras_trailing_grid(steps, self.sigma_min, self.sigma_max, 7.0 if rho is None else rho)
        if spacing in ("exponential", "logsnr"):
            return exponential_grid(steps, self.sigma_min, self.sigma_max)
        if spacing == "polyexponential":
            return polyexponential_grid(steps, self.sigma_min, self.sigma_max, 1.0 if rho is None else rho)
        raise ValueError(f"unknown spacing {spacing!r} for {type(self).__name__}; "
                         f"expected one of {', '.join(self.spacings)}")

    def with_native_spacing(self, spacing: str) -> "NoiseSchedule":
        """This schedule with ``spacing`` as its default grid (the other spacings stay available)."""
        if spacing not in self.spacings:
            raise ValueError(f"unknown spacing {spacing!r} for {type(self).__name__}; expected one of "
                             f"{', '.join(self.spacings)}")
        other = copy.copy(self)
        other.spacings = (spacing,) + tuple(s for s in self.spacings if s != spacing)
        return other

    def clamp(self, sigmas) -> Tensor:
        """Clamp a custom grid to the model's support, keeping an exact final 0."""
        s = _f64(sigmas)
        return torch.where(s > 0, s.clamp(self.sigma_min, self.sigma_max), s)


class DiscreteVP(NoiseSchedule):
    """A DDPM schedule of T steps defined by its betas; ``t`` is the (fractional) step index.

    ``t(sigma)`` interpolates linearly in log sigma between table entries, as
    k-diffusion's ``DiscreteSchedule`` does, so any sigma maps to a network input.
    """

    spacings = ("trailing", "leading", "linspace", "karras", "karras_trailing", "exponential", "logsnr",
                "polyexponential")

    def __init__(self, betas: Tensor):
        betas = _f64(betas)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D tensor with values in (0, 1]")
        self.betas = betas
        # A zero-terminal-SNR table ends in abar = 0; keep sigma finite there
        # (the same 2**-24 floor diffusers uses).
        self.alphas_cumprod = torch.cumprod(1 - betas, 0).clamp(min=2.0**-24)
        self.sigmas_table = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
        self.log_sigmas = self.sigmas_table.log()
        self._log_sigmas_np = self.log_sigmas.numpy()  # for t(sigma), called once per sampler step
        self._timesteps_np = np.arange(self.num_timesteps, dtype=np.float64)
        self.sigma_min = float(self.sigmas_table[0])
        self.sigma_max = float(self.sigmas_table[-1])

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    def sigma(self, t) -> Tensor:
        t = _f64(t).clamp(0, self.num_timesteps - 1)
        lo = t.floor().long().clamp(max=self.num_timesteps - 2)
        w = t - lo
        return ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[lo + 1]).exp()

    def t(self, sigma) -> Tensor:
        # np.interp is the piecewise-linear map log sigma -> index, clamped at both ends, and on a
        # (B,) vector it costs a few microseconds where the torch equivalent costs ~30.
        s = _f64(sigma)
        with np.errstate(divide="ignore"):  # sigma = 0 maps to t = 0, as torch.log's -inf did
            t = np.interp(np.log(s.cpu().numpy()), self._log_sigmas_np, self._timesteps_np)
        return torch.from_numpy(np.asarray(t, dtype=np.float64)).reshape(s.shape).to(s.device)

    def sample_sigma(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        t = torch.randint(0, self.num_timesteps, (n,), generator=generator)
        return self.sigmas_table[t]

    def timesteps(self, steps: int, spacing: str = "trailing", offset: int = 0) -> Tensor:
        """Integer timesteps, descending, with diffusers' three spacings."""
        _check_steps(steps)
        T = self.num_timesteps
        if steps > T:
            raise ValueError(f"steps={steps} exceeds the schedule's {T} training timesteps")
        if spacing == "linspace":
            ts = torch.linspace(0, T - 1, steps, dtype=F64).round()
        elif spacing == "leading":
            ts = torch.arange(steps, dtype=F64) * (T // steps) + offset
        elif spacing == "trailing":
            ts = (torch.arange(T, 0, -T / steps, dtype=F64).round() - 1).flip(0)
        else:
            raise ValueError(f"unknown timestep spacing {spacing!r}; expected leading, trailing or linspace")
        return ts.long().clamp(0, T - 1).flip(0)

    def sigmas(self, steps: int, spacing: str | None = None, rho: float | None = None) -> Tensor:
        spacing = spacing or self.spacings[0]
        if spacing in ("leading", "trailing", "linspace"):
            return _append_zero(self.sigmas_table[self.timesteps(steps, spacing)])
        return super().sigmas(steps, spacing, rho)


class ContinuousVP(NoiseSchedule):
    """Song et al. 2021 VP-SDE with linear beta(t): sigma(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1).

    ``t`` is in [eps_t, 1]; constants are EDM's ``VPPrecond`` defaults.
    """

    spacings = ("uniform", "karras", "karras_trailing", "exponential", "logsnr", "polyexponential")

    def __init__(self, beta_min: float = 0.1, beta_d: float = 19.9, eps_t: float = 1e-5):
        self.beta_min, self.beta_d, self.eps_t = beta_min, beta_d, eps_t
        self.sigma_min = float(self.sigma(eps_t))
        self.sigma_max = float(self.sigma(1.0))

    def sigma(self, t) -> Tensor:
        t = _f64(t)
        return torch.expm1(0.5 * self.beta_d * t**2 + self.beta_min * t).sqrt()

    def t(self, sigma) -> Tensor:
        s = _f64(sigma)
        return ((self.beta_min**2 + 2 * self.beta_d * torch.log1p(s**2)).sqrt() - self.beta_min) / self.beta_d

    def c_noise(self, sigma) -> Tensor:
        """(M - 1) t with M = 1000, as EDM's VPPrecond feeds its network."""
        return 999 * self.t(sigma)

    def sample_sigma(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        t = self.eps_t + (1 - self.eps_t) * torch.rand(n, generator=generator, dtype=F64)
        return self.sigma(t)

    def sigmas(self, steps: int, spacing: str | None = None, rho: float | None = None) -> Tensor:
        if (spacing or self.spacings[0]) == "uniform":
            _check_steps(steps)
            return _append_zero(self.sigma(torch.linspace(1, self.eps_t, steps, dtype=F64)))
        return super().sigmas(steps, spacing, rho)


class EDM(NoiseSchedule):
    """Karras et al. 2022 (EDM) / variance-exploding: t = sigma, training ln sigma ~ N(P_mean, P_std^2)."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 p_mean: float = -1.2, p_std: float = 1.2):
        self.sigma_min, self.sigma_max, self.p_mean, self.p_std = sigma_min, sigma_max, p_mean, p_std

    def sigma(self, t) -> Tensor:
        return _f64(t)

    def t(self, sigma) -> Tensor:
        return _f64(sigma)

    def c_noise(self, sigma) -> Tensor:
        """EDM's c_noise = ln(sigma) / 4."""
        return _f64(sigma).log() / 4

    def sample_sigma(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return (self.p_mean + self.p_std * torch.randn(n, generator=generator, dtype=F64)).exp()


class RectifiedFlow(NoiseSchedule):
    """The straight path of rectified flow / flow matching (Liu et al. 2023; Lipman et al. 2023),
    ``x_t = (1 - t) x0 + t n``, in sigma space: ``x_t = x / (1 + sigma)`` with ``sigma = t / (1 - t)``.

    Logit-normal training times (Esser et al. 2024, SD3: logit t ~ N(m, s^2)) are log-normal noise
    levels, since ``logit t = ln sigma``. The native grid is uniform in t from ``t_max`` (t = 1 is
    sigma = inf; starting at 0.999 leaves out a 0.001 share of the signal) to 0, the grid of an
    Euler flow sampler; DDIM / Euler in sigma space is exactly that Euler step. ``c_noise`` is
    1000 t, as SD3 feeds its time embedding.
    """

    spacings = ("uniform", "karras", "karras_trailing", "exponential", "logsnr", "polyexponential")

    def __init__(self, t_min: float = 1e-3, t_max: float = 0.999, logit_mean: float = 0.0, logit_std: float = 1.0):
        self.t_min, self.t_max, self.logit_mean, self.logit_std = t_min, t_max, logit_mean, logit_std
        self.sigma_min, self.sigma_max = float(self.sigma(t_min)), float(self.sigma(t_max))

    def sigma(self, t) -> Tensor:
        t = _f64(t)
        return t / (1 - t)

    def t(self, sigma) -> Tensor:
        s = _f64(sigma)
        return s / (1 + s)

    def c_noise(self, sigma) -> Tensor:
        return 1000 * self.t(sigma)

    def sample_sigma(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return (self.logit_mean + self.logit_std * torch.randn(n, generator=generator, dtype=F64)).exp()

    def sigmas(self, steps: int, spacing: str | None = None, rho: float | None = None) -> Tensor:
        if (spacing or self.spacings[0]) == "uniform":
            _check_steps(steps)
            return _append_zero(self.sigma(torch.linspace(self.t_max, 0, steps + 1, dtype=F64)[:-1]))
        return super().sigmas(steps, spacing, rho)


def discrete(name: str = "cosine", timesteps: int = 1000, zero_terminal_snr: bool = False, **kwargs) -> DiscreteVP:
    """A DiscreteVP from a named beta table (linear, scaled_linear, cosine, sigmoid)."""
    if name not in BETA_TABLES:
        raise ValueError(f"unknown beta schedule {name!r}; expected one of {', '.join(BETA_TABLES)}")
    betas = BETA_TABLES[name](timesteps, **kwargs)
    return DiscreteVP(rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas)


def linear(timesteps: int = 1000, **kw) -> DiscreteVP:
    return discrete("linear", timesteps, **kw)


def scaled_linear(timesteps: int = 1000, **kw) -> DiscreteVP:
    return discrete("scaled_linear", timesteps, **kw)


def cosine(timesteps: int = 1000, **kw) -> DiscreteVP:
    return discrete("cosine", timesteps, **kw)


def sigmoid(timesteps: int = 1000, **kw) -> DiscreteVP:
    return discrete("sigmoid", timesteps, **kw)


def build(name: str, timesteps: int = 1000, zero_terminal_snr: bool = False) -> NoiseSchedule:
    """Schedule from its config name: a beta table name, ``vp`` (continuous), ``edm`` or ``flow``."""
    if name == "flow":
        return RectifiedFlow()
    if name == "vp":
        return ContinuousVP()
    if name == "edm":
        return EDM()
    return discrete(name, timesteps, zero_terminal_snr)
