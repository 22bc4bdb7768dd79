"""Latent diffusion (Rombach et al. 2022): the VAE a latent model works in, and its cached latents.

A latent model's config names a VAE run folder (``model.vae``, trained by ``difflab train-vae``).
Training images are encoded once (posterior mean times the VAE's ``scaling_factor``) into
``latents.safetensors`` in the model's run folder (``difflab.runs`` names the files); the file records the VAE's weights hash and
the images' hash, so a cache made with another VAE or other data is rebuilt, never reused.
The run records the VAE in ``vae.json``; resuming or loading refuses a VAE with other weights.
"""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from . import runs
from .config import Config
from .data import ImageData
from .files import atomic_write
from .nn import AutoencoderKL
from .runs import weights_sha256


def build_vae(cfg: Config) -> AutoencoderKL:
    """The autoencoder of ``cfg.vae`` for images of ``cfg.data.channels`` channels."""
    v = cfg.vae
    return AutoencoderKL(in_channels=cfg.data.channels, latent_channels=v.latent_channels, channels=v.channels,
                         channel_mult=tuple(v.channel_mult), num_res_blocks=v.num_res_blocks, groups=v.groups,
                         mid_attn=v.mid_attn, checkpointing=v.checkpointing)


def load_vae(run, device="cpu", weights: str = "ema") -> AutoencoderKL:
    """The frozen VAE of a ``difflab train-vae`` run folder, in eval mode; its scaling factor must be set."""
    vae = build_vae(runs.read_config(run))
    runs.load_weights(runs.weights_path(run, weights), vae)
    if not torch.isfinite(vae.scaling_factor):
        raise ValueError(f"the VAE in {run} has no latent scaling factor yet (it is estimated when training "
                         f"ends); finish it with `difflab train-vae {run / 'config.yaml'} --resume`")
    return vae.to(device).eval().requires_grad_(False)


def vae_identity(vae: AutoencoderKL, run) -> dict:
    return {"path": str(run), "weights_sha256": weights_sha256(vae), "scaling_factor": vae.scaling_factor.item()}


def check_vae(recorded: dict, mine: dict, where) -> None:
    """Refuse a VAE other than the one ``recorded`` in a run (same folder name, other weights)."""
    if recorded["weights_sha256"] != mine["weights_sha256"]:
        raise ValueError(f"{where} was trained in the latent space of the VAE from {recorded['path']} (weights "
                         f"sha256 {recorded['weights_sha256'][:12]}...), but the VAE now at {mine['path']} has "
                         f"sha256 {mine['weights_sha256'][:12]}...; point model.vae at the original VAE run")


@torch.no_grad()
def encode_images(vae: AutoencoderKL, images: Tensor, batch_size: int = 256, progress: bool = True) -> Tensor:
    """Scaled latents of ``images`` (N, C, H, W) in [-1, 1], encoded in batches on the VAE's device."""
    device = vae.scaling_factor.device
    chunks = range(0, len(images), batch_size)
    return torch.cat([vae.to_latent(images[i:i + batch_size].to(device)).cpu()
                      for i in tqdm(chunks, disable=not progress, desc="encode latents")])


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, z: Tensor, batch_size: int = 256) -> Tensor:
    """Images (on the CPU) from scaled latents ``z``, decoded in slices of ``batch_size`` rows on the
    VAE's device (bounded decoder memory)."""
    device = vae.scaling_factor.device
    return torch.cat([vae.from_latent(z[i:i + batch_size].to(device)).cpu() for i in range(0, len(z), batch_size)])


def _fingerprint(vae: AutoencoderKL, images: Tensor) -> dict[str, str]:
    data = hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()
    return {"vae_sha256": weights_sha256(vae), "images_sha256": data, "shape": str(tuple(images.shape))}


def cached_latents(vae: AutoencoderKL, images: Tensor, path: Path, progress: bool = True) -> Tensor:
    """Latents of ``images`` from the cache file ``path`` if it was built by this VAE from these
    images, else encoded now and written there (atomically)."""
    path = Path(path)
    key = _fingerprint(vae, images)
    if path.exists():
        meta = runs.weights_metadata(path)
        if all(meta.get(k) == v for k, v in key.items()):
            return load_file(str(path))["latents"]
        stale = "another VAE" if meta.get("vae_sha256") != key["vae_sha256"] else "other images"
        warnings.warn(f"latent cache {path} was built with {stale}; rebuilding it", stacklevel=2)
    latents = encode_images(vae, images, progress=progress).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file({"latents": latents}, tmp, metadata=key))
    return latents


def latent_data(vae: AutoencoderKL, cfg: Config, data: ImageData, run, progress: bool = True) -> ImageData:
    """``data`` with its images replaced by their (cached) latents; labels and captions unchanged."""
    if data.images.shape[1] != vae.in_channels:
        raise ValueError(f"the VAE {cfg.model.vae} encodes {vae.in_channels}-channel images, "
                         f"but the data has {data.images.shape[1]} channels")
    latents = cached_latents(vae, data.images, Path(run) / runs.LATENT_CACHE, progress)
    return ImageData(latents, data.labels, data.num_classes, data.class_names, data.captions)
