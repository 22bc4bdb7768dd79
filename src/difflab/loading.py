"""A trained model from its run folder: ``Pipeline`` (denoiser, conditioner, VAE, config) and ``load``.

    pipe = difflab.load("runs/digits")
    images = pipe(n=16, labels=[3] * 16, sampler="ddim", steps=50, guidance=3, seed=0)
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from . import editing, runs
from .adapters import lora
from .adapters.control import base_identity, build_controlnet, check_base, with_control
from .adapters.image_encoder import IMAGE_ENCODER_RECORD, check_encoder, embed_images, encoder_identity
from .conditioning import ClassConditioner, TextConditioner, conditioner_for
from .config import Config
from .devices import resolve_device
from .generate import DEFAULTS, SamplingSettings, generate
from .latents import check_vae, decode_latents, encode_images, load_vae, vae_identity
from .metrics.shapes_clip import image_scorer
from .nn import ControlledUNet, IPAdaptedUNet, IPAdapter
from .train.build import build_denoiser, build_unet, data_shape

GUIDANCE_FIELDS = ("guidance", "guidance_rescale", "negative_prompt", "image_guidance")


class Pipeline:
    """A trained denoiser (EMA weights by default) with its config and conditioner, and for a latent
    model the VAE whose latents it generates (decoded, scaling undone, before they are returned).
    An adapter run's pipeline also holds its adapter: ``controlnet`` (what ``control=`` hints steer
    the model with), or ``ip_adapter`` and ``image_encoder`` (what ``image_prompt=`` images go
    through); a LoRA run's U-Net holds its LoRA layers."""

    def __init__(self, cfg: Config, denoiser, conditioner=None, run: Path | None = None, vae=None, controlnet=None):
        if isinstance(conditioner, int):  # the earlier signature took num_classes
            conditioner = ClassConditioner(conditioner)
        self.cfg, self.denoiser, self.conditioner, self.run = cfg, denoiser.eval(), conditioner, run
        self.vae, self.controlnet = vae, controlnet
        self.ip_adapter = self.image_encoder = None  # an IP-Adapter run's adapter and its image encoder
        if (vae is None) != (not cfg.model.vae):
            raise ValueError(f"model.vae={cfg.model.vae!r}: a latent model needs its VAE and a pixel model none")

    @property
    def num_classes(self) -> int | None:
        return self.conditioner.num_classes if isinstance(self.conditioner, ClassConditioner) else None

    @property
    def is_text(self) -> bool:
        return isinstance(self.conditioner, TextConditioner)

    @property
    def shape(self) -> tuple[int, int, int]:
        """The (C, H, W) of the images the pipeline returns."""
        d = self.cfg.data
        return (d.channels, d.image_size, d.image_size)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """The (C, H, W) the denoiser generates: the images, or their VAE latents."""
        return data_shape(self.cfg)

    def settings(self, settings: SamplingSettings | None = None, **overrides) -> SamplingSettings:
        """``settings`` and ``overrides`` with every unset field from the run's ``eval`` config and the
        schedule's own sigma grid: the complete settings this pipeline samples with."""
        s = SamplingSettings.of(settings, **overrides).resolve(SamplingSettings.from_eval(self.cfg.eval))
        s = s.resolve(DEFAULTS)
        return s if s.spacing else replace(s, spacing=self.denoiser.schedule.spacings[0])

    def encode(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """What the denoiser generates for ``images`` in [-1, 1]: the images, or their scaled VAE latents."""
        return images if self.vae is None else encode_images(self.vae, images, batch_size, progress=False)

    def decode(self, z: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Images from generated latents, in slices of ``batch_size`` (bounded decoder memory)."""
        return z if self.vae is None else decode_latents(self.vae, z, batch_size)

    def conds(self, n: int, labels=None, prompt=None, negative_prompt: str = ""):
        """(cond, null_cond) for ``n`` samples: class labels (cycling through the classes by
        default) or prompts (one string for all, or one per sample); None for unconditional models."""
        if self.is_text:
            if labels is not None:
                raise ValueError("this model is text-conditional; pass prompt=..., not labels")
            if prompt is None:
                raise ValueError("this model is text-conditional: pass prompt='a red circle' (or a list of n prompts)")
            prompts = [prompt] * n if isinstance(prompt, str) else list(prompt)
            if len(prompts) != n:
                raise ValueError(f"expected a string or a list of {n} prompts, got a list of {len(prompts)}")
            return self.conditioner.encode(prompts), self.conditioner.encode([negative_prompt])
        if prompt is not None or negative_prompt:
            raise ValueError("this model is not text-conditional; it takes no prompt")
        if self.num_classes:
            labels = torch.arange(n) % self.num_classes if labels is None else _integer_labels(labels)
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                wrong = sorted(set(labels[(labels < 0) | (labels >= self.num_classes)].tolist()))
                raise ValueError(f"labels must lie in [0, {self.num_classes - 1}], got {', '.join(map(str, wrong))}")
            return self.conditioner.cond(labels), self.conditioner.null()
        if labels is not None:
            raise ValueError("this model is unconditional; it takes no labels")
        return None, None

    def __call__(self, prompt=None, n: int = 64, labels=None, settings: SamplingSettings | None = None, *,
                 guide=None, first_index: int = 0, progress: bool = True, edit=None, control=None,
                 image_prompt=None, **overrides) -> torch.Tensor:
        """``n`` images in [-1, 1], (n, C, H, W).

        Text models take ``prompt`` (one string or n); class models cycle through the classes unless
        ``labels`` are given. ``settings`` (a ``SamplingSettings``) and keyword ``overrides`` of its
        fields (``sampler``, ``steps``, ``guidance``, ``negative_prompt``, ...; other keywords are
        sampler options such as ``eta``) say how to sample; what neither sets comes from the run's
        ``eval`` config. ``guide``, a function of the denoiser returning a guided one
        (``SafeGuidance``, ``ClassifierGuidance``, ...), replaces classifier-free guidance: it then
        takes no guidance settings. ``edit`` (a ``generate.Edit``: inpainting, image-to-image, ...,
        see ``difflab.editing``) changes how each batch is sampled. ``control`` (a ControlNet run's
        hint: (C, H, W) for all samples or (n, C, H, W), in [0, 1] at image resolution) steers the
        model through its ControlNet at the setting ``control_scale`` (one number, or one per level
        and then the middle). ``image_prompt`` (an IP-Adapter run's: RGB images in [-1, 1], one for
        all samples or n) prompts the model with images at ``ip_scale``, beside the text prompt."""
        model, cond, null, s = self.sampling_parts(prompt, n, labels, settings, guide=guide, control=control,
                                                   image_prompt=image_prompt, **overrides)
        x = generate(model, self.latent_shape, n, s, cond=cond, null_cond=null, first_index=first_index,
                     progress=progress, edit=edit)
        return self.decode(x, s.batch_size).clamp(-1, 1)

    def inpaint(self, image, mask, prompt=None, **options) -> torch.Tensor:
        """Complete ``image`` where ``mask`` (1 = keep) is 0: ``difflab.editing.inpaint``."""
        return editing.inpaint(self, image, mask, prompt, **options)

    def outpaint(self, image, prompt=None, **options) -> torch.Tensor:
        """``image`` on a larger canvas (``size=(H, W)``), the rest generated: ``difflab.editing.outpaint``."""
        return editing.outpaint(self, image, prompt, **options)

    def img2img(self, image, prompt=None, **options) -> torch.Tensor:
        """SDEdit at ``strength``: ``difflab.editing.img2img``."""
        return editing.img2img(self, image, prompt, **options)

    def invert(self, image, prompt=None, **options) -> torch.Tensor:
        """The noise a deterministic sampler maps back to ``image``: ``difflab.editing.invert_image``."""
        return editing.invert_image(self, image, prompt, **options)

    def reconstruct(self, noise, prompt=None, **options) -> torch.Tensor:
        """Images sampled down from ``invert``'s noise: ``difflab.editing.reconstruct``."""
        return editing.reconstruct(self, noise, prompt, **options)

    def invert_null_text(self, image, prompt, **options):
        """(noise, per-step nulls) of null-text inversion: ``difflab.editing.invert_null_text``."""
        return editing.invert_null_text(self, image, prompt, **options)

    def edit(self, source, target, **options) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt-to-prompt, (sources, edits): ``difflab.editing.edit_prompt``."""
        return editing.edit_prompt(self, source, target, **options)

    def sampling_parts(self, prompt=None, n: int = 64, labels=None, settings: SamplingSettings | None = None, *,
                       guide=None, control=None, image_prompt=None, **overrides):
        """(denoiser, cond, null_cond, settings) that ``__call__`` hands to ``generate``."""
        if not (prompt is None or isinstance(prompt, (str, list, tuple))):
            raise TypeError(f"prompt must be a string or a list of strings, got {prompt!r} (pass the count as n=...)")
        asked = SamplingSettings.of(settings, **overrides)
        if guide is not None and asked.is_set(*GUIDANCE_FIELDS):
            raise ValueError(f"guide replaces classifier-free guidance; it takes no {', '.join(asked.is_set(*GUIDANCE_FIELDS))}")
        s = self.settings(asked)
        cond, null = self.conds(n, labels, prompt, "" if guide is not None else s.negative_prompt)
        model = self.denoiser
        if s.image_guidance is not None and image_prompt is None:
            raise ValueError("image_guidance weighs an image prompt: pass image_prompt=... (an IP-Adapter run's)")
        if image_prompt is not None:
            model, cond, null = self.image_prompted(cond, null, image_prompt, s.ip_scale, n)
        if control is not None:
            model, cond, null = self.controlled(model, cond, null, control, s.control_scale, n)
        if guide is not None or null is None:
            model, null = (guide(model) if guide is not None else model), None
            s = replace(s, guidance=None, guidance_rescale=None, image_guidance=None)
        return model, cond, null, s

    def load_lora(self, path, scale: float = 1.0) -> "Pipeline":
        """Add the LoRA of ``path`` (``difflab finetune ... --lora``) to this model at ``scale``;
        refused unless it was trained on this model's weights. Returns the pipeline."""
        lora.load_lora(self.denoiser.net, path, scale, where=self.run)
        self.denoiser.net.requires_grad_(False)
        return self

    def set_lora_scale(self, scale: float) -> None:
        """0 = the base model, 1 = the LoRA as trained."""
        lora.set_lora_scale(self.denoiser.net, scale)

    def controlled(self, model, cond, null, control, scale, n: int):
        """(denoiser, cond, null) under the ControlNet: ``model``'s U-Net with its residuals added."""
        if self.controlnet is None:
            raise ValueError("this model has no ControlNet, so it takes no control image: load the run of a "
                             "ControlNet trained on it (difflab.load('runs/...-control-edges'))")
        device = self.controlnet.hint.out.weight.device
        model = build_denoiser(self.cfg, ControlledUNet(model.net, self.controlnet, scale)).to(device)
        return (model, *with_control(cond, null, control, n, device))

    def image_prompted(self, cond, null, images, scale: float, n: int):
        """(denoiser, cond, null) under the IP-Adapter: the images' embeddings in ``cond``, zeros (no
        image) in the null condition, so guidance pushes towards text and image together."""
        if self.ip_adapter is None:
            raise ValueError("this model has no IP-Adapter, so it takes no image prompt: load the run of an "
                             "IP-Adapter trained on it (difflab.load('runs/...-ip-adapter'))")
        embeds = embed_images(self.image_encoder, images)
        if len(embeds) not in (1, n):
            raise ValueError(f"pass one image prompt for all {n} samples or one per sample, got {len(embeds)}")
        device = self.ip_adapter.proj.weight.device
        embeds = embeds.expand(n, -1).to(device)
        model = build_denoiser(self.cfg, IPAdaptedUNet(self.denoiser.net, self.ip_adapter, scale)).to(device)
        cond = replace(cond, image_prompt=embeds)
        if null is not None:
            null = replace(null.expand(n), image_prompt=torch.zeros_like(embeds))
        return model, cond, null


def _integer_labels(labels) -> torch.Tensor:
    try:
        t = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"labels must be a list of integers, got {labels!r}") from None
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex() or t.ndim > 1:
        raise ValueError(f"labels must be a list of integers, got {labels!r}")
    return t.long().reshape(-1)


def load(run, weights: str = "ema", device: str = "auto", verify: bool = True) -> Pipeline:
    """The pipeline of a run folder's published checkpoint; ``weights`` is ``ema`` or ``model``.
    The weights are checked against the SHA-256 their checkpoint recorded (``verify=False`` skips
    it, for speed on huge models) and for NaN/inf values."""
    run = runs.check_run(run)
    path = runs.weights_path(run, weights)
    if verify:
        runs.verify_checkpoint(runs.published(run), [path.name])
    cfg = runs.read_config(run)
    if cfg.adapter.kind:
        return _with_adapter(run, cfg, path, device, verify)
    shapes = runs.weights_shapes(path)
    num_classes = shapes["label_emb.weight"][0] - 1 if "label_emb.weight" in shapes else None
    conditioner = conditioner_for(cfg, num_classes=num_classes, progress=False)
    recorded = runs.read_record(run, runs.TEXT_ENCODER_RECORD)
    if isinstance(conditioner, TextConditioner) and recorded is not None:
        conditioner.check_identity(recorded, run)
    device = resolve_device(device)
    vae = load_vae(cfg.model.vae, device) if cfg.model.vae else None
    recorded = runs.read_record(run, runs.VAE_RECORD)
    if vae is not None and recorded is not None:
        check_vae(recorded, vae_identity(vae, cfg.model.vae), run)
    net = build_unet(cfg, conditioner)
    runs.load_weights(path, net)
    return Pipeline(cfg, build_denoiser(cfg, net).to(device), conditioner, run, vae)


def _with_adapter(run: Path, cfg: Config, path: Path, device: str, verify: bool) -> Pipeline:
    """The base run's pipeline (its EMA weights, checked against the adapter's record) with the
    adapter run's weights at ``path`` attached."""
    pipe = load(cfg.adapter.base, "ema", device, verify)
    recorded = runs.read_record(run, runs.BASE_RECORD)
    if recorded is None:
        raise runs.RunFileError(run / runs.BASE_RECORD, "missing: the adapter run does not say which base it was "
                                "trained on", "train the adapter again")
    unet, a = pipe.denoiser.net, cfg.adapter
    check_base(recorded, base_identity(unet, a.base), run)
    device = next(unet.parameters()).device
    if a.kind == "lora":  # the run's checkpoint: the base with its LoRA layers
        runs.load_weights(path, lora.add_lora(unet, a.rank, a.alpha or None, a.convs))
        unet.requires_grad_(False)
    elif a.kind == "ip_adapter":
        encoder = image_scorer(a.image_encoder)
        check_encoder(runs.read_record(run, IMAGE_ENCODER_RECORD), encoder_identity(encoder, a.image_encoder), run)
        adapter = IPAdapter(unet, encoder.embed_dim, a.tokens)
        runs.load_weights(path, adapter)
        pipe.ip_adapter, pipe.image_encoder = adapter.to(device).eval().requires_grad_(False), encoder
    else:
        controlnet = build_controlnet(unet, cfg.data.image_size, pipe.latent_shape[-1])
        runs.load_weights(path, controlnet)
        pipe.controlnet = controlnet.to(device).eval().requires_grad_(False)
    pipe.run, pipe.cfg = run, cfg  # the adapter run's config: the base's sections and its adapter
    return pipe
