"""Consistency models (Song et al. 2023; improved techniques, Song & Dhariwal 2023): a network
f(x, sigma) that maps every point of a probability-flow trajectory to its origin, sampled in 1-4
evaluations with the ``consistency`` sampler.

    difflab distill consistency --teacher runs/digits                 # consistency distillation (CD)
    difflab train diffusion.parametrization=consistency out=runs/ct   # consistency training (iCT)

Both train f at adjacent levels sigma_n < sigma_{n+1} of a Karras grid to agree:
d(f(x_{n+1}, sigma_{n+1}), f^-(x_n, sigma_n)), with x_{n+1} = x0 + sigma_{n+1} z. CD takes x_n
from one ODE step of the (guided) teacher, with any deterministic registry sampler; CT takes
x_n = x0 + sigma_n z, the one-sample estimate that needs no teacher. The boundary condition
f(x, sigma_min) = x is in the parametrisation (``denoisers.ConsistencyDenoiser``).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..config import Config, ConfigError
from ..samplers import sampler_info
from ..schedules import karras_grid
from ..seeds import derive_seed
from ..tensors import append_dims
from ..train.build import build_denoiser
from ..train.trainer import Trainer, step_generator
from .students import StudentTrainer, student_config

# the levels of step k come from derive_seed(derive_seed(seed, this), k); odd and below 2^32, since torch's
# CPU generator keeps a seed's low 32 bits only (1 << 42 would fold onto the training batch's stream)
LEVEL_STREAM = 0xC2B2AE3D
#: consistency distillation's training unless overridden (the EMA is also the target network)
DEFAULTS = ["train.steps=3000", "train.lr=0.0002", "train.warmup=0", "train.label_dropout=0.0",
            "train.ema_decay=0.95", "train.ema_warmup=false", "train.checkpoint_every=500", "train.sample_every=0"]
P_MEAN, P_STD = -1.1, 2.0  # iCT's log-normal over the levels


def ascending_levels(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """sigma_1 = sigma_min < ... < sigma_n = sigma_max, the Karras grid (rho = 7) the paper steps along."""
    return karras_grid(n, sigma_min, sigma_max)[:-1].flip(0)


def distance(a: Tensor, b: Tensor, kind: str = "pseudo_huber") -> Tensor:
    """Per-row d(a, b): ``l2`` the mean squared error, ``pseudo_huber`` sqrt(||a - b||^2 + c^2) - c with
    c = 0.00054 sqrt(dim) (Song & Dhariwal 2023, Sec. 3.3)."""
    sq = (a.float() - b.float()).pow(2).flatten(1)
    if kind == "l2":
        return sq.mean(1)
    if kind == "pseudo_huber":
        c = 0.00054 * math.sqrt(sq.shape[1])
        return (sq.sum(1) + c**2).sqrt() - c
    raise ValueError(f"unknown consistency distance {kind!r}; expected pseudo_huber or l2")


def consistency_loss(model, target_model, x_next: Tensor, sigma_next: Tensor, x: Tensor, sigma: Tensor, cond,
                     kind: str) -> Tensor:
    """d(f(x_next, sigma_next), stopgrad f^-(x, sigma)), per row."""
    with torch.no_grad():
        target = target_model(x, sigma, cond)
    return distance(model(x_next, sigma_next, cond), target, kind)


def ct_levels(step: int, total_steps: int, start: int = 10, end: int = 1280) -> int:
    """iCT's discretisation curriculum (Song & Dhariwal 2023, Eq. 5): N(k) = min(s0 2^floor(k/K'), s1) + 1,
    K' = floor(K / (log2 floor(s1/s0) + 1))."""
    k_prime = max(1, math.floor(total_steps / (math.log2(math.floor(end / start)) + 1)))
    return min(start * 2 ** (step // k_prime), end) + 1


def ct_level_probs(levels: Tensor) -> Tensor:
    """p(sigma_i) proportional to erf((ln sigma_{i+1} - P_mean) / (sqrt 2 P_std))
    - erf((ln sigma_i - P_mean) / (sqrt 2 P_std)),
    for the pairs (i, i + 1) of the ascending ``levels`` (Song & Dhariwal 2023, Sec. 3.5)."""
    cdf = torch.erf((levels.log() - P_MEAN) / (math.sqrt(2) * P_STD))
    p = cdf[1:] - cdf[:-1]
    return p / p.sum()


class ConsistencyTrainer(Trainer):
    """Consistency training from data alone (improved CT): pseudo-Huber distance, log-normal levels,
    the doubling curriculum, weight 1 / (sigma_{n+1} - sigma_n), and the online network with a stop
    gradient as the target (no EMA target: Song & Dhariwal 2023, Sec. 3.2)."""

    def rank_batch(self) -> tuple:
        x0, _, noise, labels, _ = super().rank_batch()
        t, d = self.cfg.train, self.cfg.distill
        s = self.schedule
        levels = ascending_levels(ct_levels(self.step, t.steps, d.ct_start, d.ct_end), s.sigma_min, s.sigma_max)
        g = step_generator(derive_seed(t.seed, LEVEL_STREAM), self.step)
        n = torch.multinomial(ct_level_probs(levels), t.batch_size, replacement=True, generator=g)[self.rows]
        return x0, levels[n].to(self.device), levels[n + 1].to(self.device), noise, labels

    @property
    def target_denoiser(self):
        return build_denoiser(self.cfg, self.net)

    def loss(self, batch: tuple, mb: slice) -> Tensor:
        x0, sigma, sigma_next, noise, labels = (v[mb] if torch.is_tensor(v) else v for v in batch)
        cond = self.conditioner.cond(labels).to(self.device) if labels is not None else None
        x = x0 + append_dims(sigma, x0.ndim).to(x0.dtype) * noise
        x_next = x0 + append_dims(sigma_next, x0.ndim).to(x0.dtype) * noise
        loss = consistency_loss(self.train_denoiser, self.target_denoiser, x_next, sigma_next, x, sigma, cond,
                                self.cfg.distill.distance)
        return (loss / (sigma_next - sigma).to(loss.dtype)).mean()


class ConsistencyDistillTrainer(StudentTrainer):
    """Consistency distillation: x_n is one step of ``distill.teacher_sampler`` on the guided teacher
    from sigma_{n+1} to sigma_n (a one-step solver gives its order there: heun, dpm_solver_2/3; a
    multistep one has no history on a two-level grid and takes its first-order step, i.e. Euler/DDIM,
    as Song et al.'s Euler CD does); the target network is the EMA (``train.ema_decay``) or, with
    ``distill.ema_target=false``, the online one. Rows share their level n in ``distill.level_groups``
    groups, since a sampler walks one grid for its whole batch."""

    def build(self) -> torch.nn.Module:
        d = self.cfg.distill
        info = sampler_info(d.teacher_sampler)
        if info.stochastic:
            raise ConfigError(f"distill.teacher_sampler={d.teacher_sampler} is stochastic; the teacher's step follows "
                              "the probability-flow ODE (heun, euler, dpmpp_2m, ...)")
        self.teacher_step = info.fn
        net = super().build()
        s = self.teacher.schedule
        self.levels = ascending_levels(d.levels, s.sigma_min, s.sigma_max)
        return net

    def rank_batch(self) -> tuple:
        x0, _, noise, labels, _ = super().rank_batch()
        t, groups = self.cfg.train, self.cfg.distill.level_groups
        g = step_generator(derive_seed(t.seed, LEVEL_STREAM), self.step)
        n = torch.randint(0, len(self.levels) - 1, (groups,), generator=g)
        return x0, n.repeat_interleave(-(-t.batch_size // groups))[:t.batch_size][self.rows], noise, labels

    def loss(self, batch: tuple, mb: slice) -> Tensor:
        x0, n, noise, labels = batch
        x0, n, noise, cond = x0[mb], n[mb], noise[mb], self.cond(labels, mb)
        sigma, sigma_next = self.levels[n].to(self.device), self.levels[n + 1].to(self.device)
        x_next = x0 + append_dims(sigma_next, x0.ndim).to(x0.dtype) * noise
        x = torch.empty_like(x_next)
        with torch.no_grad():
            for level in n.unique().tolist():
                rows = (n == level).nonzero().squeeze(1)
                grid = self.levels[[level + 1, level]]
                x[rows] = self.teacher_step(self.teacher, x_next[rows], grid, _rows(cond, rows), progress=False)
        target = build_denoiser(self.cfg, self.ema.model if self.cfg.distill.ema_target else self.net)
        return consistency_loss(self.train_denoiser, target, x_next, sigma_next, x, sigma, cond,
                                self.cfg.distill.distance).mean()


def _rows(cond, rows: Tensor):
    return None if cond is None else cond[rows]


def consistency_config(cfg: Config, steps: int = 1) -> Config:
    """The student run's config for consistency distillation from ``distill.teacher``."""
    return student_config(cfg, steps=steps, sampler="consistency", parametrization="consistency")
