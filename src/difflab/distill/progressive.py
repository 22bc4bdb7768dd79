"""Progressive distillation (Salimans & Ho 2022, Algorithm 2): a student learns to take one DDIM
step where its teacher takes two, and becomes the teacher of the next halving.

    difflab distill progressive --teacher runs/digits distill.steps=64     # 64 -> 32 -> ... -> 1 steps

Each halving is a run folder ``<out>/<n>-steps`` that samples with its own step count. The
grids are ``karras_trailing`` ones (a flow's: uniform in t), which nest: level i of the student's
n-step grid is level 2i of the teacher's 2n-step grid. The first teacher is run with classifier-free guidance at
``distill.guidance`` (Meng et al. 2023 distil the guided output); its students already carry it.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from .. import runs
from ..config import Config
from ..seeds import derive_seed
from ..tensors import append_dims
from ..train.build import build_schedule
from ..train.trainer import step_generator
from .students import StudentTrainer, student_config

# the student levels of step k come from derive_seed(derive_seed(seed, this), k); odd and below 2^32, since
# torch's CPU generator keeps a seed's low 32 bits only (1 << 41 would fold onto the training batch's stream)
LEVEL_STREAM = 0x85EBCA77
#: a halving's training unless overridden: the student starts at its teacher, so a short, gentle run
DEFAULTS = ["train.steps=1000", "train.lr=0.0005", "train.warmup=0", "train.label_dropout=0.0",
            "train.checkpoint_every=500", "train.sample_every=0"]


def ddim_step(x: Tensor, x0: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """DDIM (eta = 0) in sigma space, per row: x_next = x0 + (sigma_next / sigma) (x - x0)."""
    return x0 + append_dims(sigma_next / sigma, x.ndim).to(x.dtype) * (x - x0)


def two_step_target(teacher, x: Tensor, sigma: Tensor, sigma_mid: Tensor, sigma_next: Tensor, cond=None) -> Tensor:
    """The x0 a single DDIM step from ``sigma`` to ``sigma_next`` must predict to land where two
    teacher DDIM steps (through ``sigma_mid``) land: x0 = (x'' - r x) / (1 - r), r = sigma_next /
    sigma (Salimans & Ho 2022, Alg. 2, with alpha = 1 in sigma space). Per-row (B,) float64 levels."""
    x_mid = ddim_step(x, teacher(x, sigma, cond), sigma, sigma_mid)
    x_next = ddim_step(x_mid, teacher(x_mid, sigma_mid, cond), sigma_mid, sigma_next)
    r = append_dims(sigma_next / sigma, x.ndim).to(x.dtype)
    return (x_next - r * x) / (1 - r)


def progressive_loss(student, teacher, x0: Tensor, teacher_grid: Tensor, level: Tensor, noise: Tensor,
                     cond=None) -> Tensor:
    """Per-row loss of the student at its level ``level`` (rows of ``teacher_grid``'s every other
    level): the x0 error against ``two_step_target``, weighted by the truncated SNR max(SNR, 1),
    SNR = 1 / sigma^2 (Salimans & Ho 2022, Sec. 4)."""
    grid = teacher_grid.to(x0.device)
    sigma, sigma_mid, sigma_next = grid[2 * level], grid[2 * level + 1], grid[2 * level + 2]
    x = x0 + append_dims(sigma, x0.ndim).to(x0.dtype) * noise
    with torch.no_grad():
        target = two_step_target(teacher, x, sigma, sigma_mid, sigma_next, cond)
    err = (student(x, sigma, cond) - target).float().pow(2).flatten(1).mean(1)
    return err * (sigma**-2).clamp(min=1).to(err.dtype)


def teacher_grid(cfg: Config) -> Tensor:
    """The teacher's ``distill.steps``-step grid on the student's own spacing (``karras_trailing``,
    or a flow's uniform-t grid), whose every other level is the student's sampling grid."""
    return build_schedule(cfg).sigmas(cfg.distill.steps, cfg.eval.spacing or None)


class ProgressiveTrainer(StudentTrainer):
    """One halving: the student takes ``distill.steps // 2`` DDIM steps where the teacher takes ``distill.steps``."""

    def build(self) -> torch.nn.Module:
        net = super().build()
        self.teacher_grid = teacher_grid(self.cfg)
        return net

    def rank_batch(self) -> tuple:
        x0, _, noise, labels, _ = super().rank_batch()
        t = self.cfg.train
        g = step_generator(derive_seed(t.seed, LEVEL_STREAM), self.step)
        level = torch.randint(0, self.cfg.distill.steps // 2, (t.batch_size,), generator=g)[self.rows]
        return x0, level.to(self.device), noise, labels

    def loss(self, batch: tuple, mb: slice) -> Tensor:
        x0, level, noise, labels = batch
        return progressive_loss(self.train_denoiser, self.teacher, x0[mb], self.teacher_grid, level[mb], noise[mb],
                                self.cond(labels, mb)).mean()


def stage_config(cfg: Config, teacher: str, teacher_steps: int) -> Config:
    out = Path(cfg.out) / f"{teacher_steps // 2}-steps"
    stage = replace(cfg, out=str(out), distill=replace(cfg.distill, teacher=str(teacher), steps=teacher_steps))
    return student_config(stage, steps=teacher_steps // 2, sampler="ddim")


def distill_progressive(cfg: Config, resume: bool = False, progress: bool = True) -> list[Path]:
    """Every halving from ``distill.steps`` teacher steps down to a 1-step student, each its own run
    folder under ``cfg.out``, each the next one's teacher. With ``resume`` every halving resumes:
    a finished one trains no further (after the checks of any resume: same teacher weights, same
    config), an interrupted one continues; returns the run folders, most steps first."""
    folders, teacher, steps = [], cfg.distill.teacher, cfg.distill.steps
    while steps >= 2:
        stage = stage_config(cfg, teacher, steps)
        run = Path(stage.out)
        ProgressiveTrainer(stage, resume=resume and runs.has_checkpoint(run), progress=progress).fit()
        folders.append(run)
        teacher, steps = run, steps // 2
    return folders
