"""What every few-step student shares: its run config (the teacher's model, data and diffusion,
evaluated at its own step count) and the frozen, guided teacher it learns from.

A student run is a plain run folder: ``difflab.load``, ``sample`` and ``eval`` take it like any
other, at the steps, sampler and grid its ``eval`` section names; ``teacher.json`` records the
teacher's weights, written at the start and checked on resume.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from .. import runs
from ..config import Config, ConfigError, validate
from ..guidance import ClassifierFreeGuidance
from ..train.build import build_denoiser, build_unet
from ..train.trainer import Trainer, TrainingError

TEACHER_RECORD = "teacher.json"  # which teacher (and weights) a student learned from


def teacher_config(cfg: Config) -> Config:
    try:
        return runs.read_config(cfg.distill.teacher)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"config key 'distill.teacher': {err}") from None


def student_config(cfg: Config, *, steps: int, sampler: str, parametrization: str | None = None) -> Config:
    """``cfg`` with the teacher's model, VAE, data and diffusion sections (``parametrization`` may
    change), evaluated without guidance (the student learned the guided teacher) at ``steps`` on the
    nested ``karras_trailing`` grid."""
    teacher = teacher_config(cfg)
    if teacher.adapter.kind:
        raise ConfigError(f"distill.teacher={cfg.distill.teacher} is an adapter run; distil the model itself")
    diffusion = replace(teacher.diffusion, parametrization=parametrization or teacher.diffusion.parametrization)
    spacing = "" if diffusion.schedule == "flow" else "karras_trailing"
    evaluation = replace(teacher.eval, sampler=sampler, steps=steps, spacing=spacing, guidance=1.0, extra_guidance=[])
    return validate(replace(cfg, model=teacher.model, vae=teacher.vae, data=teacher.data, diffusion=diffusion,
                            eval=evaluation))


def teacher_guidance(cfg: Config) -> float:
    """The guidance the teacher is run at: ``distill.guidance``, or 1 for a teacher that is itself a
    student (it learned its teacher's guidance)."""
    return 1.0 if teacher_config(cfg).distill.method else cfg.distill.guidance


class StudentTrainer(Trainer):
    """A trainer whose network starts as the teacher's EMA weights, with the frozen teacher
    (guided at ``teacher_guidance``) as ``self.teacher``: a Denoiser for the student's conditions."""

    needs_teacher = True  # False: the student only starts from the teacher's weights

    def build(self) -> torch.nn.Module:
        net = super().build()  # the student: the teacher's U-Net, conditioner and (latent) data
        weights = runs.weights_path(runs.check_run(self.cfg.distill.teacher), "ema")
        runs.load_weights(weights, net)
        self.teacher_record = {"path": self.cfg.distill.teacher, "weights": "ema",
                               "weights_sha256": runs.weights_sha256(net)}
        if self.needs_teacher:
            self.teacher = self.frozen_teacher(weights)
        return net

    def frozen_teacher(self, weights):
        """The teacher's denoiser on its EMA ``weights``, guided at ``teacher_guidance``."""
        frozen = build_unet(self.cfg, self.conditioner)
        runs.load_weights(weights, frozen)
        teacher = build_denoiser(teacher_config(self.cfg), frozen.to(self.device).eval().requires_grad_(False))
        scale = teacher_guidance(self.cfg)
        if scale != 1 and self.conditioner is None:
            raise ConfigError(f"distill.guidance={scale} needs a conditional teacher; {self.cfg.distill.teacher} "
                              "is unconditional (pass distill.guidance=1)")
        return teacher if scale == 1 else ClassifierFreeGuidance(teacher, scale, self.conditioner.null())

    def records(self) -> dict[str, dict]:
        return {**super().records(), TEACHER_RECORD: self.teacher_record}

    def check_record(self, name: str, mine: dict) -> None:
        if name != TEACHER_RECORD:
            return super().check_record(name, mine)
        recorded = runs.read_record(self.run, name)
        if recorded is not None and recorded["weights_sha256"] != mine["weights_sha256"]:
            raise TrainingError(f"{self.run} is a student of the model trained in {recorded['path']} (weights sha256 "
                                f"{recorded['weights_sha256'][:12]}...), but the model now at {mine['path']} has sha256 "
                                f"{mine['weights_sha256'][:12]}...; point distill.teacher at the original run")

    def cond(self, labels, mb: slice):
        return self.conditioner.cond(labels[mb]).to(self.device) if labels is not None else None
