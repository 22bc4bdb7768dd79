"""The training loop: AdamW with warm-up, clipping, accumulation, AMP, EMA, DDP, atomic checkpoints.

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
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from torch import Tensor

from ..conditioning import TextConditioner, conditioner_for
from ..config import Config
from ..data import load_data
from ..generate import generate
from . import checkpoint as ckpt
from .build import adamw, autocast, build_denoiser, build_unet, data_shape, diffusion_loss
from .distributed import DistInfo, barrier, init_distributed, mean_across_ranks
from .ema import EMA, ema_decay


TEXT_ENCODER_FILE = "text_encoder.json"  # which frozen encoder (and weights) a text model was trained against


class TrainingError(RuntimeError):
    pass


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


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


def lr_at(step: int, cfg: Config) -> float:
    """Linear warm-up, then constant or cosine decay to zero at ``train.steps``."""
    t = cfg.train
    if step < t.warmup:
        return t.lr * (step + 1) / t.warmup
    if t.lr_schedule == "cosine":
        progress = (step - t.warmup) / max(1, t.steps - t.warmup)
        return t.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return t.lr


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
    (``loss``) and the records that pin what the model depends on (``records``).
    """

    def __init__(self, cfg: Config, resume: bool = False, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.device = resolve_device(cfg.train.device)
        self.dist = init_distributed(self.device)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        self.micro = _check_batch(cfg, self.dist)
        try:  # an autocast the device cannot run fails here, before any data is loaded or encoded
            autocast(self.device.type, cfg.train.precision)
        except ValueError as err:
            raise TrainingError(str(err)) from None
        self.run = Path(cfg.out)
        self.resuming = resume
        if resume:
            ckpt.check_run(self.run)
        elif (self.run / "trainer_state.pt").exists():
            raise TrainingError(f"{self.run} already holds a run; pass --resume to continue it "
                                "or choose another folder with out=...")
        self.data = load_data(cfg.data, "train")
        torch.manual_seed(cfg.train.seed)
        self.net = self.build().to(self.device)
        self.ema = EMA(self.net)
        self.train_net = DistributedDataParallel(self.net) if self.dist.enabled else self.net
        self.opt = adamw(self.net, cfg.train.lr, cfg.train.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.train.precision == "fp16")
        self.step = 0
        self.seconds = 0.0  # training wall time of earlier sessions of this run
        self.last_checkpoint = None
        if resume:
            self._resume()

    # ------------------------------------------------------- what is trained
    def build(self) -> torch.nn.Module:
        """The U-Net, after setting up latents (``model.vae``) and conditioning (labels or text)."""
        self.vae = None
        if self.cfg.model.vae:
            from ..latents import VAE_FILE, latent_data, load_vae, vae_identity

            data_shape(self.cfg)  # latents the U-Net cannot downsample fail here, before any encoding
            self.vae = load_vae(self.cfg.model.vae, self.device)
            self.vae_record = vae_identity(self.vae, self.cfg.model.vae)
            if self.resuming:  # refuse another VAE before encoding the data with it
                self.check_record(VAE_FILE, self.vae_record)
            # the main rank encodes and writes the cache; the others wait, then read it
            if self.dist.is_main:
                self.data = latent_data(self.vae, self.cfg, self.data, self.run, progress=self.progress)
            barrier(self.dist)
            if not self.dist.is_main:
                self.data = latent_data(self.vae, self.cfg, self.data, self.run, progress=False)
        self.conditioner = conditioner_for(self.cfg, self.data, progress=self.progress and self.dist.is_main)
        self.labels = (self.conditioner.labels(self.data.captions) if isinstance(self.conditioner, TextConditioner)
                       else self.data.labels)
        return build_unet(self.cfg, self.conditioner)

    @functools.cached_property
    def train_denoiser(self):
        return build_denoiser(self.cfg, self.train_net)

    @property
    def schedule(self):
        return self.train_denoiser.schedule

    def records(self) -> dict[str, dict]:
        """Run files that pin what the model was trained against: written at the start, checked on resume."""
        out = {}
        if isinstance(self.conditioner, TextConditioner):
            out[TEXT_ENCODER_FILE] = self.conditioner.identity()
        if self.vae is not None:
            from ..latents import VAE_FILE

            out[VAE_FILE] = self.vae_record
        return out

    def check_record(self, name: str, mine: dict) -> None:
        """Refuse to resume against another text encoder or VAE than the run recorded in ``name``."""
        from ..latents import VAE_FILE, check_vae

        path = self.run / name
        if not path.exists():
            return
        recorded = json.loads(path.read_text())
        try:
            if name == TEXT_ENCODER_FILE:
                self.conditioner.check_identity(recorded, self.run)
            elif name == VAE_FILE:
                check_vae(recorded, mine, self.run)
        except ValueError as err:
            raise TrainingError(str(err)) from None

    def global_batch(self) -> tuple:
        null = self.conditioner.null_index if self.conditioner else None
        return global_batch(self.data.images, self.labels, null, self.cfg, self.step, self.schedule)

    def rank_batch(self) -> tuple:
        """This rank's rows of the global batch, on the device (labels stay on the CPU: they index CPU tables)."""
        x0, sigma, noise, labels = self.global_batch()
        labels = labels[self.rows] if labels is not None else None
        return self.to_rank(x0), self.to_rank(sigma), self.to_rank(noise), labels

    def loss(self, batch: tuple, mb: slice) -> Tensor:
        x0, sigma, noise, labels = batch
        cond = self.conditioner.cond(labels[mb]).to(self.device) if labels is not None else None
        return diffusion_loss(self.cfg, self.train_denoiser, x0[mb], sigma[mb], noise[mb], cond)

    @property
    def rows(self) -> slice:
        n = self.micro * self.cfg.train.grad_accum
        return slice(self.dist.rank * n, (self.dist.rank + 1) * n)

    def to_rank(self, t: Tensor) -> Tensor:
        return t[self.rows].to(self.device)

    # ------------------------------------------------------------ checkpoints
    def _resume(self) -> None:
        for name, mine in self.records().items():
            self.check_record(name, mine)
        state = ckpt.load_trainer_state(self.run)
        steps = {ckpt.load_weights(self.run / "model.safetensors", self.net),
                 ckpt.load_weights(self.run / "ema.safetensors", self.ema.model), state["step"]}
        if len(steps) != 1:
            raise TrainingError(f"checkpoint files in {self.run} disagree on the step ({sorted(steps)}); "
                                "the run was interrupted while saving")
        self.opt.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = self.last_checkpoint = state["step"]
        self.seconds = state.get("seconds", 0.0)

    def save(self) -> None:
        if self.dist.is_main:
            state = {"step": self.step, "optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict(),
                     "seconds": self.seconds + time.time() - self.start_time}
            ckpt.save_checkpoint(self.run, self.net, self.ema.model, state)
        self.last_checkpoint = self.step
        barrier(self.dist)

    # ------------------------------------------------------------------ steps
    def train_step(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        batch = self.rank_batch()
        torch.manual_seed((t.seed * 1_000_003 + self.step) * 4096 + self.dist.rank)  # dropout, per rank
        self.net.train()
        self.opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for j in range(t.grad_accum):
            mb = slice(j * self.micro, (j + 1) * self.micro)
            sync = self.dist.enabled and j < t.grad_accum - 1
            with (self.train_net.no_sync() if sync else nullcontext()), autocast(self.device.type, t.precision):
                loss = self.loss(batch, mb) / t.grad_accum
            self.scaler.scale(loss).backward()
            total += loss.detach()
        total = mean_across_ranks(total, self.dist)
        if not torch.isfinite(total):
            where = (f"the last good checkpoint (step {self.last_checkpoint}) is in {self.run}"
                     if self.last_checkpoint is not None else "no checkpoint was written yet")
            raise TrainingError(f"loss became {total.item()} at step {self.step}; training stopped, {where}")
        self.scaler.unscale_(self.opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), t.grad_clip if t.grad_clip > 0 else math.inf)
        lr = lr_at(self.step, cfg)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.scaler.step(self.opt)
        self.scaler.update()
        self.ema.update(self.net, ema_decay(self.step, t.ema_decay, t.ema_warmup))
        self.step += 1
        return {"step": self.step, "loss": total.item(), "grad_norm": grad_norm.item(), "lr": lr}

    def sample_grid(self) -> None:
        from ..images import save_grid

        ema_denoiser = build_denoiser(self.cfg, self.ema.model)
        c, nrow, cond, null = self.conditioner, 8, None, None
        if isinstance(c, TextConditioner):  # one row per shape, one column per colour
            from ..data.shapes import COLOURS, SHAPES
            from ..pipelines import single_object_prompts

            prompts = single_object_prompts(len(SHAPES) * len(COLOURS))[0]
            n, nrow, cond, null = len(prompts), len(COLOURS), c.encode(prompts), c.null()
        elif c is not None:
            n, nrow = 10 * min(c.num_classes, 10), 10
            cond, null = c.cond(torch.arange(n) % c.num_classes), c.null()
        else:
            n = 64
        e = self.cfg.eval
        x = generate(ema_denoiser, self.data.images.shape[1:], n, cond=cond, null_cond=null, sampler=e.sampler,
                     steps=min(e.steps, 25), spacing=e.spacing, guidance=e.guidance, seed=e.seed, progress=False)
        if self.vae is not None:
            from ..latents import decode_latents

            x = decode_latents(self.vae, x)
        save_grid(x, self.run / "samples" / f"step_{self.step:07d}.png", nrow=nrow)

    def finish(self) -> None:
        """After the last step (also when a finished run is resumed); the VAE trainer estimates its scaling here."""

    def fit(self) -> Path:
        cfg, t = self.cfg, self.cfg.train
        if self.dist.is_main:
            self.run.mkdir(parents=True, exist_ok=True)
            ckpt.write_text(self.run / "config.yaml", _yaml(cfg))
            for name, record in self.records().items():
                ckpt.write_json(self.run / name, record)
        self.start_time, self.first_step = time.time(), self.step
        bar = tqdm(total=t.steps, initial=self.step, disable=not (self.progress and self.dist.is_main),
                   desc="train", dynamic_ncols=True)
        log = open(self.run / "metrics.jsonl", "a") if self.dist.is_main else None
        try:
            while self.step < t.steps:
                stats = self.train_step()
                bar.update(1)
                if self.step % t.log_every == 0 or self.step == t.steps:
                    bar.set_postfix(loss=f"{stats['loss']:.4f}")
                    if log:
                        stats["seconds"] = round(self.seconds + time.time() - self.start_time, 3)
                        log.write(json.dumps(stats) + "\n")
                        log.flush()
                if self.step % t.checkpoint_every == 0 or self.step == t.steps:
                    self.save()
                if t.sample_every and self.dist.is_main and (self.step % t.sample_every == 0 or self.step == t.steps):
                    self.sample_grid()
        finally:
            bar.close()
            if log:
                log.close()
        self.finish()
        return self.run


def _yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def train(cfg: Config, resume: bool = False, progress: bool = True) -> Path:
    """Train (or resume) the run ``cfg.out``; returns the run folder."""
    return Trainer(cfg, resume=resume, progress=progress).fit()
