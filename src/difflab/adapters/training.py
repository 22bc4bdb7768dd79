"""Training an adapter on a frozen base run, by the shared loop (checkpoints, resume, EMA, DDP).

    difflab train configs/shapes-latent-control-edges.yaml     # adapter.kind=controlnet, adapter.base=RUN

The adapter run's config is the base run's (model, VAE, diffusion, data, eval) with the adapter's
own ``out``, ``adapter`` and ``train`` sections; ``base.json`` records the base's weights, and the
checkpoints hold only the adapter's weights.
"""
from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from .. import runs
from ..config import Config, ConfigError
from ..data import SHAPES_HELDOUT_START, ImageData, load_image_folder, load_shapes_scenes
from ..data.shapes import COLOURS, ShapesWorld
from ..generate import generate
from ..images import save_grid
from ..latents import decode_latents
from ..loading import load
from ..metrics.shapes_clip import image_scorer
from ..nn import ControlledUNet, IPAdaptedUNet, IPAdapter
from ..seeds import derive_seed
from ..train.build import build_denoiser, diffusion_loss
from ..train.trainer import Trainer, TrainingError, batch_indices, step_generator
from .control import base_identity, build_controlnet, check_base, hints
from .image_encoder import IMAGE_ENCODER_RECORD, check_encoder, embed_images, encoder_identity
from .lora import add_lora, save_lora, set_lora_scale

GRID_SCENES = 8  # held-out hints in a sample grid (a row of hints over a row of samples)


def adapter_config(cfg: Config) -> Config:
    """``cfg`` with the base run's model, VAE, diffusion, data and eval sections."""
    a = cfg.adapter
    if not a.kind:
        return cfg
    try:
        base = runs.read_config(a.base)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"config key 'adapter.base': {err}") from None
    if base.adapter.kind:
        raise ConfigError(f"adapter.base={a.base} is itself an adapter run; name the model it was trained on")
    if a.kind in ("controlnet", "ip_adapter") and base.data.dataset != "shapes":
        raise ConfigError(f"adapter.kind={a.kind} trains on the shapes world (its maps and renders); the base "
                          f"{a.base} was trained on {base.data.dataset}")
    if a.kind == "ip_adapter" and not base.model.text_encoder:
        raise ConfigError(f"an IP-Adapter adds to cross-attention: the base {a.base} must be a text model")
    return replace(cfg, model=base.model, vae=base.vae, diffusion=base.diffusion, data=base.data, eval=base.eval)


class AdapterTrainer(Trainer):
    """What every adapter trainer shares: the frozen base U-Net with the base run's EMA weights
    (``frozen_base``), and the record of those weights, written at the start and checked on resume."""

    def frozen_base(self) -> torch.nn.Module:
        base = super().build()  # latents, conditioner and the text table, as the base was trained
        runs.load_weights(runs.weights_path(runs.check_run(self.cfg.adapter.base), "ema"), base)
        self.base_record = base_identity(base, self.cfg.adapter.base)
        return base.to(self.device).eval().requires_grad_(False)

    def records(self) -> dict[str, dict]:
        return {**super().records(), runs.BASE_RECORD: self.base_record}

    def check_record(self, name: str, mine: dict) -> None:
        if name != runs.BASE_RECORD:
            return super().check_record(name, mine)
        recorded = runs.read_record(self.run, name)
        if recorded is None:
            return
        try:
            check_base(recorded, mine, self.run)
        except ValueError as err:
            raise TrainingError(str(err)) from None


class ControlNetTrainer(AdapterTrainer):
    """Trains a ControlNet (Zhang et al. 2023) on the base's training scenes and their hint maps:
    the diffusion loss of the base U-Net under the ControlNet, gradients only in the ControlNet.
    Prompts are dropped at ``train.label_dropout`` (the paper drops half of them, so the ControlNet
    learns to read the hint on its own)."""

    def training_data(self) -> ImageData:
        scenes = load_shapes_scenes(self.cfg.data, "train", maps=True)
        self.hints = hints(scenes, self.cfg.adapter.control)
        return ImageData(scenes.images, None, None, captions=scenes.captions)

    def build(self) -> torch.nn.Module:
        self.base = self.frozen_base()
        return build_controlnet(self.base, self.cfg.data.image_size, self.data.images.shape[-1])

    @functools.cached_property
    def train_denoiser(self):
        return build_denoiser(self.cfg, ControlledUNet(self.base, self.parts.train_net))

    def rank_batch(self) -> tuple:
        x0, sigma, noise, labels, _ = super().rank_batch()
        t = self.cfg.train
        idx = batch_indices(self.step, t.batch_size, len(self.hints), t.seed)  # the rows global_batch drew
        return x0, sigma, noise, labels, self.to_rank(self.hints[idx])

    def loss(self, batch: tuple, mb: slice) -> Tensor:
        x0, sigma, noise, labels, hint = batch
        cond = replace(self.conditioner.cond(labels[mb]).to(self.device), control=hint[mb])
        return diffusion_loss(self.cfg, self.train_denoiser, x0[mb], sigma[mb], noise[mb], cond)

    def sample_grid(self) -> None:
        """Held-out hints (top row) over the EMA ControlNet's samples for their captions (bottom row)."""
        scenes = load_shapes_scenes(self.cfg.data, "heldout", GRID_SCENES, maps=True)
        hint = hints(scenes, self.cfg.adapter.control).to(self.device)
        cond = replace(self.conditioner.encode(scenes.captions).to(self.device), control=hint)
        null = replace(self.conditioner.null().to(self.device).expand(GRID_SCENES), control=hint)
        model = build_denoiser(self.cfg, ControlledUNet(self.base, self.ema.model))
        x = generate(model, self.data.images.shape[1:], GRID_SCENES, self.grid_settings(), cond=cond,
                     null_cond=null, progress=False)
        if self.vae is not None:
            x = decode_latents(self.vae, x)
        grid = torch.cat([hint.expand(-1, 3, -1, -1).cpu() * 2 - 1, x.cpu()])
        save_grid(grid, runs.sample_grid_path(self.run, self.step), nrow=GRID_SCENES)


class LoRATrainer(AdapterTrainer):
    """Fine-tunes LoRA layers (``adapters.lora``, through peft) of the frozen base on a folder of
    images that share one caption (personalisation: DreamBooth's setting, Ruiz et al. 2023, with
    LoRA instead of the full weights). With ``adapter.prior_images`` = N the base's own samples for
    N of its training captions join the data, and the concept's images are repeated to as many:
    DreamBooth's prior preservation, which keeps the old prompts as they were. When the last step
    is done the EMA LoRA is also written as ``lora.safetensors`` in the run: a small file that
    names its base."""

    def training_data(self) -> ImageData:
        a, d = self.cfg.adapter, self.cfg.data
        images = load_image_folder(a.images, d.image_size, d.channels, conditional=False).images
        captions = [a.caption] * len(images)
        if a.prior_images:
            prior, prior_captions = self.prior_samples(a.prior_images)
            repeats = -(-len(prior) // len(images))
            images, captions = torch.cat([images.repeat(repeats, 1, 1, 1), prior]), captions * repeats + prior_captions
        return ImageData(images, None, None, captions=captions)

    def prior_samples(self, n: int) -> tuple[Tensor, list[str]]:
        """The frozen base's samples (its eval settings, seeded by ``train.seed``) for the first ``n``
        captions of its training scenes."""
        captions = load_shapes_scenes(self.cfg.data, "train", n).captions
        base = load(self.cfg.adapter.base)
        return base(captions, n=n, seed=self.cfg.train.seed, progress=False).cpu(), captions

    def build(self) -> torch.nn.Module:
        a = self.cfg.adapter
        return add_lora(self.frozen_base().train(), a.rank, a.alpha or None, a.convs)

    def save(self) -> None:
        super().save()
        if self.step == self.cfg.train.steps and self.dist.is_main:
            save_lora(self.ema.model, self.run / LORA_FILE, self.base_record, {"caption": self.cfg.adapter.caption})

    def sample_grid(self) -> None:
        """EMA samples of the caption, then of the same seeds at LoRA scale 0 (the base)."""
        model = self.ema.model
        cond, null = self.conditioner.encode([self.cfg.adapter.caption] * GRID_SCENES), self.conditioner.null()
        rows = []
        for scale in (1.0, 0.0):
            set_lora_scale(model, scale)
            x = generate(build_denoiser(self.cfg, model), self.data.images.shape[1:], GRID_SCENES, self.grid_settings(),
                         cond=cond.to(self.device), null_cond=null.to(self.device), progress=False)
            rows.append(decode_latents(self.vae, x) if self.vae is not None else x)
        set_lora_scale(model, 1.0)
        save_grid(torch.cat(rows).cpu(), runs.sample_grid_path(self.run, self.step), nrow=GRID_SCENES)


class IPAdapterTrainer(AdapterTrainer):
    """Trains an IP-Adapter (Ye et al. 2023) on the base's training scenes: each render's own image
    embedding (the frozen image encoder's) is its image prompt, dropped to zeros at
    ``adapter.image_dropout`` and the caption at ``train.label_dropout``, each from its own stream
    (the paper drops each 5% of the time); only the projection and the ``kv_ip`` train.

    With ``adapter.colour_captions`` each single-object scene is also trained under the caption of
    its colour alone ("a red"), its image prompt unchanged -- a departure from the paper (full
    captions only): the image is then the one source of the shape, and a prompt that names a
    colour combines with an image prompt that shows a shape."""

    def training_data(self) -> ImageData:
        a = self.cfg.adapter
        scenes = load_shapes_scenes(self.cfg.data, "train")
        self.encoder = image_scorer(a.image_encoder)
        self.encoder_record = encoder_identity(self.encoder, a.image_encoder)
        self.embeds = embed_images(self.encoder, scenes.images)  # from the pixels, before any VAE
        images, captions = scenes.images, list(scenes.captions)
        if a.colour_captions:
            single = (scenes.counts == 1).nonzero()[:, 0]
            images, self.embeds = torch.cat([images, images[single]]), torch.cat([self.embeds, self.embeds[single]])
            captions += [f"a {COLOURS[c]}" for c in scenes.colours[single, 0].tolist()]
        return ImageData(images, None, None, captions=captions)

    def build(self) -> torch.nn.Module:
        self.base = self.frozen_base()
        return IPAdapter(self.base, self.embeds.shape[1], self.cfg.adapter.tokens)

    def records(self) -> dict[str, dict]:
        return {**super().records(), IMAGE_ENCODER_RECORD: self.encoder_record}

    def check_record(self, name: str, mine: dict) -> None:
        if name != IMAGE_ENCODER_RECORD:
            return super().check_record(name, mine)
        try:
            check_encoder(runs.read_record(self.run, name), mine, self.run)
        except ValueError as err:
            raise TrainingError(str(err)) from None

    @functools.cached_property
    def train_denoiser(self):  # the adapter is called as a hook, not through DDP's forward: one process
        if self.dist.enabled:
            raise TrainingError("IP-Adapter training runs in one process (its weights are used as an "
                                "attention hook, which DDP cannot synchronise); run it without torchrun")
        return build_denoiser(self.cfg, IPAdaptedUNet(self.base, self.net))

    def rank_batch(self) -> tuple:
        x0, sigma, noise, labels, _ = super().rank_batch()
        t, a = self.cfg.train, self.cfg.adapter
        idx = batch_indices(self.step, t.batch_size, len(self.embeds), t.seed)
        g = step_generator(derive_seed(t.seed, IMAGE_DROP_STREAM), self.step)
        keep = (torch.rand(len(idx), generator=g) >= a.image_dropout).float()[:, None]
        return x0, sigma, noise, labels, self.to_rank(self.embeds[idx] * keep)

    def loss(self, batch: tuple, mb: slice) -> Tensor:
        x0, sigma, noise, labels, embeds = batch
        cond = replace(self.conditioner.cond(labels[mb]).to(self.device), image_prompt=embeds[mb])
        return diffusion_loss(self.cfg, self.train_denoiser, x0[mb], sigma[mb], noise[mb], cond)

    def sample_grid(self) -> None:
        """Held-out single-object renders (top row) over EMA samples with them as image prompts and an
        empty text prompt (bottom row)."""
        world = ShapesWorld(self.cfg.data.image_size, 1, 1, self.cfg.data.world_seed)
        refs = world.load(GRID_SCENES, start=SHAPES_HELDOUT_START).images
        embeds = embed_images(self.encoder, refs).to(self.device)
        empty = self.conditioner.null().to(self.device).expand(GRID_SCENES)
        x = generate(build_denoiser(self.cfg, IPAdaptedUNet(self.base, self.ema.model)), self.data.images.shape[1:],
                     GRID_SCENES, self.grid_settings(), cond=replace(empty, image_prompt=embeds),
                     null_cond=replace(empty, image_prompt=torch.zeros_like(embeds)), progress=False)
        if self.vae is not None:
            x = decode_latents(self.vae, x)
        save_grid(torch.cat([refs, x.cpu()]), runs.sample_grid_path(self.run, self.step), nrow=GRID_SCENES)


IMAGE_DROP_STREAM = 1 << 41  # an IP-Adapter's dropped image prompts of step k: derive_seed(derive_seed(seed, this), k)
LORA_FILE = "lora.safetensors"
#: `difflab finetune`'s training (before the user's overrides), measured on the star concept of
#: benchmarks/lora.py: LoRA of rank 4 on the attention projections and the convolutions (the
#: attention-only LoRA draws no star on this model: its attention sits at 4x4), the base's own
#: samples of 500 of its captions as the prior (without them the old prompts lose 8-15 points),
#: captions dropped at 0.1 (so the unconditional branch learns the concept too and guidance helps)
FINETUNE_DEFAULTS = ["adapter.convs=true", "adapter.prior_images=500", "train.steps=2500", "train.batch_size=16",
                     "train.lr=3.0e-3", "train.warmup=20", "train.label_dropout=0.1", "train.checkpoint_every=500",
                     "train.sample_every=500", "train.log_every=50"]
TRAINERS = {"controlnet": ControlNetTrainer, "lora": LoRATrainer, "ip_adapter": IPAdapterTrainer}


def train_adapter(cfg: Config, resume: bool = False, progress: bool = True, verify: bool = True) -> Path:
    """Train (or resume) the adapter run ``cfg.out`` on the frozen ``cfg.adapter.base``."""
    cfg = adapter_config(cfg)
    return TRAINERS[cfg.adapter.kind](cfg, resume=resume, progress=progress, verify=verify).fit()
