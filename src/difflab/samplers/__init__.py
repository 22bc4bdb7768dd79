"""Samplers in sigma space and their registry (name -> function, NFE per step, order, stochastic).

Every sampler has the signature ``sample_x(denoiser, x, sigmas, cond=None, *,
noise=None, callback=None, progress=True, **knobs)``.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable

from .dpm import (fast_orders, sample_dpm_fast, sample_dpm_solver_1, sample_dpm_solver_2, sample_dpm_solver_3,
                  sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_2s_ancestral, sample_dpmpp_3m,
                  sample_dpmpp_3m_sde, sample_dpmpp_sde)
from .noise import BrownianNoise, SeededNoise, global_noise
from .unipc import sample_unipc
from .sampling import (ancestral_step, sample_consistency, sample_ddim, sample_ddpm, sample_euler,
                       sample_euler_ancestral, sample_heun)


@dataclass(frozen=True)
class SamplerInfo:
    fn: Callable
    nfe_per_step: int
    order: int  # the ODE order of the default formula (eta = 0); tests/test_sampler_convergence.py measures it
    stochastic: bool
    brownian: bool = False  # draws its noise from a Brownian tree by default


SAMPLERS: dict[str, SamplerInfo] = {
    "euler": SamplerInfo(sample_euler, 1, 1, False),
    "ddim": SamplerInfo(sample_ddim, 1, 1, False),  # stochastic only with eta > 0
    "ddpm": SamplerInfo(sample_ddpm, 1, 1, True),
    "euler_ancestral": SamplerInfo(sample_euler_ancestral, 1, 1, True),
    "heun": SamplerInfo(sample_heun, 2, 2, False),
    "dpm_solver_1": SamplerInfo(sample_dpm_solver_1, 1, 1, False),
    "dpm_solver_2": SamplerInfo(sample_dpm_solver_2, 2, 2, False),
    "dpm_solver_3": SamplerInfo(sample_dpm_solver_3, 3, 3, False),
    "dpm_fast": SamplerInfo(sample_dpm_fast, 1, 3, False),  # `steps` is the NFE budget
    "dpmpp_2m": SamplerInfo(sample_dpmpp_2m, 1, 2, False),
    # the references' 3M converges with order 2 (see sample_dpmpp_3m_sde); taylor_d2=True makes it 3
    "dpmpp_3m": SamplerInfo(sample_dpmpp_3m, 1, 2, False),
    "dpmpp_2s_ancestral": SamplerInfo(sample_dpmpp_2s_ancestral, 2, 2, True),
    "dpmpp_sde": SamplerInfo(sample_dpmpp_sde, 2, 2, True, brownian=True),
    "dpmpp_2m_sde": SamplerInfo(sample_dpmpp_2m_sde, 1, 2, True, brownian=True),
    "dpmpp_3m_sde": SamplerInfo(sample_dpmpp_3m_sde, 1, 2, True, brownian=True),
    # UniP-3 + UniC: p + 1 (fit 4.1 over NFE 12-192); corrector=False gives 3
    "unipc": SamplerInfo(sample_unipc, 1, 4, False),
    # for consistency models: no ODE (order 0), fresh noise between its evaluations
    "consistency": SamplerInfo(sample_consistency, 1, 0, True),
}


def get_sampler(name: str) -> Callable:
    return sampler_info(name).fn


def sampler_info(name: str) -> SamplerInfo:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(sorted(SAMPLERS))}")
    return SAMPLERS[name]


CALLER_KEYWORDS = ("noise", "progress")  # what ``difflab.generate`` passes every sampler itself


def check_options(name: str, options: dict) -> dict:
    """``options`` for sampler ``name``, checked against its keyword arguments and their defaults'
    types (an int or a numeric string becomes a float where the default is a float); a ValueError
    names the valid options or the expected type."""
    params = inspect.signature(sampler_info(name).fn).parameters
    defaults = {k: p.default for k, p in params.items() if p.kind is p.KEYWORD_ONLY and k not in CALLER_KEYWORDS}
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"sampler {name!r} has no option {', '.join(map(repr, unknown))}; "
                         f"its options: {', '.join(k for k in defaults if k != 'callback') or 'none'}")
    return {k: _option_value(name, k, v, defaults[k]) for k, v in options.items()}


def _option_value(name: str, key: str, value, default):
    wrong = ValueError(f"expected {type(default).__name__} for sampler {name!r} option {key!r} "
                       f"(default {default!r}), got {value!r}")
    if isinstance(default, float) and type(value) is not bool:
        try:
            value = float(value)  # YAML reads 1e-3 and inf as strings
        except (TypeError, ValueError):
            raise wrong from None
        return _float_option(name, key, value, default)
    if default is None or ((type(value) is bool) == (type(default) is bool) and isinstance(value, type(default))):
        return value
    raise wrong


def _float_option(name: str, key: str, value: float, default: float) -> float:
    """Every float option of the samplers (eta, s_churn, s_tmin, s_tmax, s_noise, r) is a scale or a
    sigma: >= 0, and infinite only where its default is (s_tmax)."""
    if math.isnan(value) or value < 0 or (math.isinf(value) and not math.isinf(default)):
        raise ValueError(f"sampler {name!r} option {key!r} must be a {'' if math.isinf(default) else 'finite '}"
                         f"number >= 0, got {value!r}")
    return value


__all__ = ["SAMPLERS", "BrownianNoise", "SamplerInfo", "SeededNoise", "ancestral_step", "check_options",
           "fast_orders", "get_sampler", "global_noise", "sampler_info"] + [n for n in dir() if n.startswith("sample_")]
