"""The training loop: AdamW with warm-up, clipping, accumulation, AMP, EMA, DDP, checkpoints.

A run has one writer (``runs.RunLock``); its checkpoints are published whole (``runs.save_checkpoint``),
so a kill at any moment loses at most the steps since the last one; SIGINT and SIGTERM save a
checkpoint after the current step and stop (``interrupts``).

Every random draw of step ``k`` (which examples, which noise levels, which
noise, which labels are dropped) comes from a generator seeded by (seed, k) and
is drawn for the whole global batch before each rank takes its slice. So
training is a pure function of the config: resuming gives bit-identical updates;
accumulating micro-batches or splitting the batch over ranks gives the same updates
up to float rounding (sums in another order; a text batch's padding is cut per slice).
"""
from __future__ import annotations

import functools
import json
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import devices, runs
from ..cond import Cond
from ..conditioning import TextConditioner, conditioner_for
from ..config import Config, ConfigError
from ..data import load_data
from ..data.shapes import COLOURS, SHAPES, single_object_prompts
from ..devices import DistInfo, barrier
from ..editing.masks import inpainting_input, random_masks
from ..generate import SamplingSettings, generate
from ..files import write_text
from ..images import save_grid
from ..interrupts import Interrupted, StopRequests
from ..latents import check_vae, decode_latents, latent_data, load_vae, vae_identity
from ..samplers import sampler_info
from ..seeds import derive_seed
from .build import autocast, build_denoiser, build_unet, data_shape, diffusion_loss
from .step import NonFiniteLoss, TrainingParts, training_step


class TrainingError(RuntimeError):
    pass


MASK_STREAM = 1 << 40  # an inpainting model's masks of step k come from derive_seed(derive_seed(seed, this), k)


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, step))


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """Rows of global batch ``step`` in an endless stream of per-epoch permutations."""
    parts, pos = [], step * batch_size
    while sum(len(p) for p in parts) < batch_size:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        part = perm[offset: offset + batch_size - sum(len(p) for p in parts)]
        parts.append(part)
        pos += len(part)
    return torch.cat(parts)


def global_batch(images: Tensor, labels: Tensor | None, null_label: int | None, cfg: Config, step: int,
                 schedule):
    """(x0, sigma, noise, labels) for the whole global batch of ``step``; dropped labels become ``null_label``.

    ``labels`` are class labels or, for captioned data, rows of the text-embedding table.
    """
    t = cfg.train
    g = step_generator(t.seed, step)
    idx = batch_indices(step, t.batch_size, len(images), t.seed)
    x0 = images[idx]
    sigma = schedule.sample_sigma(t.batch_size, g)
    noise = torch.randn(x0.shape, generator=g)
    if labels is not None:
        drop = torch.rand(t.batch_size, generator=g) < t.label_dropout
        labels = torch.where(drop, null_label, labels[idx])
    return x0, sigma, noise, labels


def _check_batch(cfg: Config, dist: DistInfo) -> int:
    parts = dist.world_size * cfg.train.grad_accum
    if cfg.train.batch_size % parts:
        raise TrainingError(f"train.batch_size={cfg.train.batch_size} must be divisible by "
                            f"world_size x grad_accum = {parts}")
    return cfg.train.batch_size // parts


class Trainer:
    """Owns the model, EMA, optimizer and run folder of one training job (a diffusion model).

    The loop, checkpoints and resume are shared with other trainers (``VAETrainer``), which name
    their network (``build``), the step's global batch (``global_batch``, ``rank_batch``), the loss
    (``loss``) and the records that pin what the model depends on (``records``). The step itself
    is ``train.step.training_step``.
    """

    def __init__(self, cfg: Config, resume: bool = False, progress: bool = True, verify: bool = True):
        self.cfg, self.progress, self.verify = cfg, progress, verify
        try:  # the eval sampler is named in the config; a wrong name should not wait for the first grid
            sampler_info(cfg.eval.sampler)
        except ValueError as err:
            raise ConfigError(f"config key 'eval.sampler': {err}") from None
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.device, self.dist = devices.setup(cfg.train.device)
        self.micro = _check_batch(cfg, self.dist)
        try:  # an autocast the device cannot run fails here, before any data is loaded or encoded
            autocast(self.device.type, cfg.train.precision)
        except ValueError as err:
            raise TrainingError(str(err)) from None
        self.run, self.resuming, self.lock = Path(cfg.out), resume, None
        self._claim_run(resume)
        try:
            self._prepare(resume)
        except BaseException:
            self.close()
            raise

    def _claim_run(self, resume: bool) -> None:
        """Lock the run folder (main rank), clear what interrupted writes left, and refuse to start
        over a run that has a checkpoint (or to resume a folder that is no run)."""
        if resume:
            runs.check_run(self.run, need_weights=False)
        if self.run.exists() and not self.run.is_dir():
            raise TrainingError(f"out={self.run} is a file, not a run folder; choose another folder with out=...")
        if self.dist.is_main:
            self.created = not self.run.exists()
            self.lock = runs.RunLock(self.run)
            for note in [self.lock.acquire()] + [_leftovers(runs.clean_unpublished(self.run))]:
                if note:
                    print(f"difflab: {note}", file=sys.stderr)
        barrier(self.dist)
        if not resume and runs.has_checkpoint(self.run):
            raise TrainingError(f"{self.run} already holds a run; pass --resume to continue it "
                                "or choose another folder with out=...")

    def _prepare(self, resume: bool) -> None:
        cfg = self.cfg
        self.data = self.training_data()
        torch.manual_seed(cfg.train.seed)
        t = cfg.train
        self.parts = TrainingParts.build(self.build().to(self.device), self.device, self.dist, lr=t.lr,
                                         weight_decay=t.weight_decay, precision=t.precision)
        self.step = 0
        self.seconds = 0.0  # training wall time of earlier sessions of this run
        self.last_checkpoint = None
        if resume:
            self._resume()

    def close(self) -> None:
        """Release the run folder (a folder this trainer created and left empty is removed)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
            if self.created and [p.name for p in self.run.iterdir()] == [runs.LOCK]:
                (self.run / runs.LOCK).unlink()
                self.run.rmdir()

    @property
    def net(self) -> torch.nn.Module:
        return self.parts.net

    @property
    def train_net(self) -> torch.nn.Module:
        return self.parts.train_net

    @property
    def ema(self):
        return self.parts.ema

    # ------------------------------------------------------- what is trained
    def training_data(self):
        return load_data(self.cfg.data, "train")

    def build(self) -> torch.nn.Module:
        """The U-Net, after setting up latents (``model.vae``) and conditioning (labels or text)."""
        self.vae = None
        if self.cfg.model.vae:
            self._encode_latents()
        self.conditioner = conditioner_for(self.cfg, self.data, progress=self.progress and self.dist.is_main)
        self.labels = (self.conditioner.labels(self.data.captions) if isinstance(self.conditioner, TextConditioner)
                       else self.data.labels)
        return build_unet(self.cfg, self.conditioner)

    def _encode_latents(self) -> None:
        """Swap the images for their latents under ``model.vae`` (the main rank encodes and writes the
        cache; the others wait, then read it)."""
        data_shape(self.cfg)  # latents the U-Net cannot downsample fail here, before any encoding
        self.vae = load_vae(self.cfg.model.vae, self.device)
        self.vae_record = vae_identity(self.vae, self.cfg.model.vae)
        if self.resuming:  # refuse another VAE before encoding the data with it
            self.check_record(runs.VAE_RECORD, self.vae_record)
        if self.dist.is_main:
            self.data = latent_data(self.vae, self.cfg, self.data, self.run, progress=self.progress)
        barrier(self.dist)
        if not self.dist.is_main:
            self.data = latent_data(self.vae, self.cfg, self.data, self.run, progress=False)

    @functools.cached_property
    def train_denoiser(self):
        return build_denoiser(self.cfg, self.parts.train_net)

    @property
    def schedule(self):
        return self.train_denoiser.schedule

    def records(self) -> dict[str, dict]:
        """Run files that pin what the model was trained against: written at the start, checked on resume."""
        out = {}
        if isinstance(self.conditioner, TextConditioner):
            out[runs.TEXT_ENCODER_RECORD] = self.conditioner.identity()
        if self.vae is not None:
            out[runs.VAE_RECORD] = self.vae_record
        return out

    def check_record(self, name: str, mine: dict) -> None:
        """Refuse to resume against another text encoder or VAE than the run recorded in ``name``."""
        recorded = runs.read_record(self.run, name)
        if recorded is None:
            return
        try:
            if name == runs.TEXT_ENCODER_RECORD:
                self.conditioner.check_identity(recorded, self.run)
            elif name == runs.VAE_RECORD:
                check_vae(recorded, mine, self.run)
        except ValueError as err:
            raise TrainingError(str(err)) from None

    def global_batch(self) -> tuple:
        null = self.conditioner.null_index if self.conditioner else None
        return global_batch(self.data.images, self.labels, null, self.cfg, self.step, self.schedule)

    def rank_batch(self) -> tuple:
        """This rank's rows of the global batch, on the device (labels stay on the CPU: they index CPU
        tables), and an inpainting model's masks (else None)."""
        x0, sigma, noise, labels = self.global_batch()
        labels = labels[self.rows] if labels is not None else None
        masks = None
        if self.cfg.model.inpainting:  # a stream of its own: other models' batches stay as they were
            g = step_generator(derive_seed(self.cfg.train.seed, MASK_STREAM), self.step)
            masks = self.to_rank(random_masks(len(x0), x0.shape[2:], g))
        return self.to_rank(x0), self.to_rank(sigma), self.to_rank(noise), labels, masks

    def loss(self, batch: tuple, mb: slice) -> Tensor:
        x0, sigma, noise, labels, masks = batch
        cond = self.conditioner.cond(labels[mb]).to(self.device) if labels is not None else None
        if masks is not None:
            cond = replace(cond or Cond(), image=inpainting_input(x0[mb], masks[mb]))
        return diffusion_loss(self.cfg, self.train_denoiser, x0[mb], sigma[mb], noise[mb], cond)

    @property
    def rows(self) -> slice:
        n = self.micro * self.cfg.train.grad_accum
        return slice(self.dist.rank * n, (self.dist.rank + 1) * n)

    def to_rank(self, t: Tensor) -> Tensor:
        return t[self.rows].to(self.device)

    # ------------------------------------------------------------ checkpoints
    def _resume(self) -> None:
        changed = _changed_keys(runs.read_config_dict(self.run), self.cfg)
        if changed:
            raise TrainingError(f"--resume with another model or data than the run's {runs.CONFIG}: "
                                f"{'; '.join(changed[:3])} (pass the run's own config: "
                                f"`difflab train {self.run / runs.CONFIG} out={self.run} --resume`)")
        for name, mine in self.records().items():
            self.check_record(name, mine)
        ckpt = runs.published(self.run)
        if ckpt is None:
            print(f"difflab: {self.run} has no checkpoint yet; training starts from step 0", file=sys.stderr)
            return
        if self.verify:
            runs.verify_checkpoint(ckpt)
        state = runs.load_trainer_state(self.run, ckpt)
        steps = {runs.load_weights(ckpt.path("model.safetensors"), self.net),
                 runs.load_weights(ckpt.path("ema.safetensors"), self.ema.model), state["step"]}
        if len(steps) != 1:
            raise TrainingError(f"checkpoint files in {ckpt.folder} disagree on the step ({sorted(steps)}); "
                                "the run was interrupted while saving")
        try:
            self.parts.opt.load_state_dict(state["optimizer"])
            self.parts.scaler.load_state_dict(state["scaler"])
        except (ValueError, KeyError, RuntimeError) as err:
            raise runs.RunFileError(ckpt.path(runs.TRAINER_STATE), f"its optimizer state does not fit the model ({err})",
                                    "it belongs to another run") from None
        self.step = self.last_checkpoint = state["step"]
        self.seconds = state.get("seconds", 0.0)
        if self.dist.is_main:
            _trim_log(self.run / runs.TRAINING_LOG, self.step)

    def save(self) -> None:
        """Publish a checkpoint of this step (once); a full disk leaves the last one published."""
        if self.step == self.last_checkpoint:
            return
        if self.dist.is_main:
            state = {"step": self.step, "optimizer": self.parts.opt.state_dict(),
                     "scaler": self.parts.scaler.state_dict(), "seconds": self.seconds + time.time() - self.start_time}
            try:
                runs.save_checkpoint(self.run, self.net, self.ema.model, state, keep=self.cfg.train.keep_checkpoints)
            except OSError as err:
                kept = (f"the checkpoint of step {self.last_checkpoint} is intact" if self.last_checkpoint is not None
                        else "no checkpoint was published yet")
                raise TrainingError(f"{self.run}: could not write the checkpoint of step {self.step}: "
                                    f"{err.strerror or err} ({kept}; free space, then continue with --resume)") from None
        self.last_checkpoint = self.step
        barrier(self.dist)

    # ------------------------------------------------------------------ steps
    def train_step(self) -> dict:
        batch = self.rank_batch()
        micro = self.micro
        try:
            stats = training_step(self.parts, lambda j: self.loss(batch, slice(j * micro, (j + 1) * micro)),
                                  self.cfg, self.step)
        except NonFiniteLoss as err:
            where = (f"the last good checkpoint (step {self.last_checkpoint}) is in {self.run}"
                     if self.last_checkpoint is not None else "no checkpoint was written yet")
            raise TrainingError(f"{err} at step {self.step}; training stopped, {where}") from None
        self.step += 1
        return stats

    def sample_grid(self) -> None:
        """A grid of EMA samples at the eval settings (at most 25 steps): one column per class (up to 10
        rows of them), or one row per shape and one column per colour for a text model."""
        c, nrow, cond, null = self.conditioner, 8, None, None
        if isinstance(c, TextConditioner):
            prompts = single_object_prompts(len(SHAPES) * len(COLOURS))[0]
            n, nrow, cond, null = len(prompts), len(COLOURS), c.encode(prompts), c.null()
        elif c is not None:
            n, nrow = 10 * min(c.num_classes, 10), 10
            cond, null = c.cond(torch.arange(n) % c.num_classes), c.null()
        else:
            n = 64
        x = generate(build_denoiser(self.cfg, self.ema.model), self.data.images.shape[1:], n,
                     self.grid_settings(guided=null is not None), cond=cond, null_cond=null, progress=False)
        if self.vae is not None:
            x = decode_latents(self.vae, x)
        save_grid(x, runs.sample_grid_path(self.run, self.step), nrow=nrow)

    def grid_settings(self, guided: bool = True) -> SamplingSettings:
        """The sample grids' settings: the eval sampler and guidance (when ``guided``), at most 25 steps."""
        e = self.cfg.eval
        return SamplingSettings(sampler=e.sampler, steps=min(e.steps, 25), spacing=e.spacing or None,
                                guidance=e.guidance if guided else None, seed=e.seed)

    def fit(self) -> Path:
        """Train to ``train.steps``; on SIGINT/SIGTERM save after the current step and raise ``Interrupted``."""
        t = self.cfg.train
        self.start_time, self.first_step = time.time(), self.step
        bar = tqdm(total=t.steps, initial=self.step, disable=not (self.progress and self.dist.is_main),
                   desc="train", dynamic_ncols=True)
        log = None
        try:
            if self.dist.is_main:
                self.run.mkdir(parents=True, exist_ok=True)
                runs.write_config(self.run, self.cfg)
                for name, record in self.records().items():
                    runs.write_record(self.run, name, record)
                log = open(self.run / runs.TRAINING_LOG, "a")
            with StopRequests() as stop:
                while self.step < t.steps:
                    self._after_step(self.train_step(), bar, log)
                    if devices.any_across_ranks(stop.requested, self.dist):
                        self.save()
                        raise Interrupted(stop.signum or signal.SIGTERM, f"{stop.name} at step {self.step}: checkpoint saved "
                                          f"in {self.run}; continue with `difflab train ... --resume`")
        finally:
            bar.close()
            if log:
                log.close()
            self.close()
        return self.run

    def _after_step(self, stats: dict, bar, log) -> None:
        """Progress, the log line, the checkpoint and the sample grid that fall due at this step."""
        t, last = self.cfg.train, self.step == self.cfg.train.steps
        bar.update(1)
        if self.step % t.log_every == 0 or last:
            bar.set_postfix(loss=f"{stats['loss']:.4f}")
            if log:
                stats["seconds"] = round(self.seconds + time.time() - self.start_time, 3)
                log.write(json.dumps(stats) + "\n")
                log.flush()
        if self.step % t.checkpoint_every == 0 or last:
            self.save()
        if t.sample_every and self.dist.is_main and (self.step % t.sample_every == 0 or last):
            self.sample_grid()


#: what a resumed run must share with the run it continues (paths may move; the records pin what they hold)
FIXED_SECTIONS = ("model", "vae", "diffusion", "data", "adapter", "distill")
MOVABLE = {"model.vae", "model.text_encoder_path", "data.path", "adapter.base", "distill.teacher"}


def _changed_keys(recorded: dict, cfg: Config) -> list[str]:
    mine = cfg.to_dict()
    return [f"{sec}.{k}={v!r} here, {recorded[sec][k]!r} in the run" for sec in FIXED_SECTIONS
            for k, v in mine[sec].items()
            if f"{sec}.{k}" not in MOVABLE and k in recorded.get(sec, {}) and recorded[sec][k] != v]


def _leftovers(paths: list[Path]) -> str | None:
    if not paths:
        return None
    return f"removed {len(paths)} leftovers of an interrupted write: {', '.join(p.name for p in paths[:4])}"


def _trim_log(path: Path, step: int) -> None:
    """Drop the log lines of steps after the checkpoint a run resumes from (they are trained again)
    and a line a kill cut short."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("step", 0) <= step and line.endswith("\n"):
            kept.append(line)
    if kept != lines:
        write_text(path, "".join(kept))


def train(cfg: Config, resume: bool = False, progress: bool = True, verify: bool = True) -> Path:
    """Train (or resume) the run ``cfg.out``; returns the run folder. ``verify=False`` skips the
    SHA-256 check of the checkpoint a run resumes from."""
    return Trainer(cfg, resume=resume, progress=progress, verify=verify).fit()
