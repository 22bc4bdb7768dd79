"""Reflow (Liu et al. 2023, "Flow straight and fast", Sec. 2.3): retrain a rectified flow on its
own noise-sample pairs, so the paths between them straighten and few Euler steps suffice.

    difflab train configs/digits-flow.yaml       # 1-rectified flow (diffusion.parametrization=flow)
    difflab reflow runs/digits-flow              # 2-rectified flow in runs/digits-flow-reflow

The pairs (z, x) are the model's probability-flow ODE from z (``distill.pair_steps`` Euler steps,
guided at ``distill.guidance``; their noise from a seed stream of their own, so no evaluation
sample starts from a training pair's noise); the new model starts from the old one's weights and
trains on x_t = (1 - t) x + t z with the pair's own z (in sigma space: x + sigma z), so its loss is the same
flow-matching loss with the noise fixed per example. The pairs are kept in the run folder with
how they were drawn, so a resumed run trains on the same ones.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from .. import runs
from ..config import Config, ConfigError
from ..data import ImageData
from ..denoisers import velocity_from_x0
from ..files import atomic_write
from ..generate import Edit, SamplingSettings, generate
from ..loading import load
from ..samplers import sample_euler
from ..seeds import derive_seed
from ..train.trainer import batch_indices
from .students import StudentTrainer, student_config, teacher_guidance

PAIRS = "reflow_pairs.safetensors"
# the pairs' noise: seed derive_seed(train.seed, this), apart from the evaluation's seeds (an odd constant
# below 2^32: torch's CPU generator keeps a seed's low 32 bits only, so 1 << 43 would fold onto seed 0's stream)
PAIR_STREAM = 0x9E3779B1
#: reflow's training unless overridden: the default job's budget, starting from the flow's weights
DEFAULTS = ["train.steps=1500", "train.lr=0.0005", "train.warmup=0", "train.label_dropout=0.0", "train.sample_every=0"]


class KeepStartNoise(Edit):
    """Plain sampling that keeps each batch's start noise z (the state at sigmas[0] is sigma_max z)."""

    def __init__(self):
        self.noise: list[Tensor] = []

    def start(self, noise, sigmas, rows):
        x = super().start(noise, sigmas, rows)
        self.noise.append((x / float(sigmas[0])).float().cpu())
        return x


def draw_pairs(pipe, n: int, steps: int, guidance: float, seed: int = 0, progress: bool = True) -> dict[str, Tensor]:
    """``n`` (noise, sample, label) triples of the flow ``pipe``: Euler on its uniform-in-t grid,
    classes cycling (labels absent for an unconditional model)."""
    if pipe.is_text or pipe.vae is not None:
        raise ConfigError("reflow draws pairs of pixel models with class labels or none; this run is a "
                          f"{'text' if pipe.is_text else 'latent'} model")
    settings = SamplingSettings(sampler="euler", steps=steps, spacing="uniform", seed=seed,
                                guidance=guidance if pipe.num_classes else None)
    model, cond, null, s = pipe.sampling_parts(n=n, settings=settings)
    keep = KeepStartNoise()
    x = generate(model, pipe.latent_shape, n, s, cond=cond, null_cond=null, progress=progress, edit=keep)
    pairs = {"noise": torch.cat(keep.noise), "samples": x}
    if cond is not None:
        pairs["labels"] = cond.labels.cpu()
    return pairs


def straightness(model, noise: Tensor, steps: int = 100, cond=None) -> float:
    """Liu et al.'s S = int_0^1 E ||(z - x) - v(x_t, t)||^2 dt along the flow's own Euler path from z
    to its sample x (per-dimension mean; ``model`` a flow denoiser, or one guided), with the velocity
    v = (x - (1 + sigma) x0_hat) / sigma in sigma space. 0 for a straight path, which one Euler step
    follows exactly. The grid spans [t_min, t_max] rather than [0, 1], so z - x is the chord of that
    span: (x_{t_max} - x) / t_max in t = sigma / (1 + sigma) coordinates."""
    sigmas = model.schedule.sigmas(steps, "uniform")
    velocities = []

    def record(info):
        velocities.append(velocity_from_x0(info["x"], info["x0_hat"], info["sigma"]))
    x = sample_euler(model, noise * float(sigmas[0]), sigmas, cond, callback=record, progress=False)
    t = sigmas / (1 + sigmas)
    chord = (noise * float(t[0]) - x) / float(t[0] - t[-1])
    dt = (t[:-1] - t[1:]).tolist()
    gaps = [w * (chord - v).pow(2).flatten(1).mean(1) for w, v in zip(dt, velocities)]
    return float(torch.stack(gaps).sum(0).mean() / sum(dt))


def _read_pairs(path: Path, drawn: dict) -> dict[str, Tensor] | None:
    """The pairs kept at ``path`` if they were drawn as ``drawn`` says (teacher, count, steps,
    guidance, seed); None if absent or drawn otherwise (they are then drawn again)."""
    if not path.exists():
        return None
    with safe_open(path, "pt") as f:
        if f.metadata() != drawn:
            return None
    return load_file(path)


def reflow_config(cfg: Config) -> Config:
    config = student_config(cfg, steps=cfg.eval.steps, sampler="euler")
    if config.diffusion.parametrization != "flow":
        raise ConfigError(f"reflow retrains a rectified flow; {cfg.distill.teacher} has diffusion.parametrization="
                          f"{config.diffusion.parametrization} (train one with diffusion.parametrization=flow "
                          "diffusion.schedule=flow)")
    return config


class ReflowTrainer(StudentTrainer):
    """Trains the flow again on its own pairs (``draw_pairs``), from its weights."""

    needs_teacher = False  # the pairs come from the flow's pipeline; no frozen denoiser is trained against

    def training_data(self) -> ImageData:
        d, path = self.cfg.distill, Path(self.cfg.out) / PAIRS
        flow = load(d.teacher, device=self.device)
        guidance, seed = teacher_guidance(self.cfg), derive_seed(self.cfg.train.seed, PAIR_STREAM)
        drawn = {"teacher": str(runs.weights_sha256(flow.denoiser)), "pairs": str(d.pairs),
                 "pair_steps": str(d.pair_steps), "guidance": str(guidance), "seed": str(seed)}
        pairs = _read_pairs(path, drawn)  # a resumed run trains on the pairs it started with
        if pairs is None:
            pairs = draw_pairs(flow, d.pairs, d.pair_steps, guidance, seed, progress=self.progress and self.dist.is_main)
            if self.dist.is_main:
                atomic_write(path, lambda tmp: save_file(pairs, tmp, metadata=drawn))
        self.pair_noise = pairs["noise"]
        return ImageData(pairs["samples"], pairs.get("labels"), flow.num_classes)

    def global_batch(self) -> tuple:
        x0, sigma, _, labels = super().global_batch()
        t = self.cfg.train
        return x0, sigma, self.pair_noise[batch_indices(self.step, t.batch_size, len(self.pair_noise), t.seed)], labels
