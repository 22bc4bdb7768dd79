"""``difflab train-vae``: the first stage of latent diffusion, trained by the shared loop.

Same run folder, checkpoints, resume and EMA as a diffusion run; the loss is ``vae_loss``
(reconstruction + beta * KL, Rombach et al. 2022, App. G). When the last step is done, the latent
scaling factor (1 / std of the latents) is estimated on training images and saved with the weights.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .. import runs
from ..config import Config
from ..data import load_data, load_shapes_data
from ..devices import resolve_device
from ..images import save_grid
from ..latents import build_vae, load_vae
from ..metrics.reconstruction import psnr, ssim
from ..nn.vae import vae_loss
from .trainer import Trainer, batch_indices, step_generator

SCALING_IMAGES = 2000  # training images the scaling factor is estimated on (LDM uses one batch)


class VAETrainer(Trainer):
    def build(self) -> torch.nn.Module:
        self.vae = self.conditioner = self.labels = None
        return build_vae(self.cfg)

    def records(self) -> dict[str, dict]:
        return {}

    def global_batch(self) -> tuple[Tensor, Tensor]:
        """Images of this step and the N(0, I) draw of their posterior samples."""
        t, v = self.cfg.train, self.cfg.vae
        g = step_generator(t.seed, self.step)
        x = self.data.images[batch_indices(self.step, t.batch_size, len(self.data.images), t.seed)]
        f = self.net.downsampling
        noise = torch.randn(len(x), v.latent_channels, x.shape[2] // f, x.shape[3] // f, generator=g)
        return x, noise

    def rank_batch(self) -> tuple[Tensor, Tensor]:
        return tuple(self.to_rank(t) for t in self.global_batch())

    def loss(self, batch: tuple, mb: slice) -> Tensor:
        x, noise = batch[0][mb], batch[1][mb]
        x_hat, posterior = self.train_net(x, noise=noise)
        return vae_loss(x, x_hat, posterior, self.cfg.vae.beta, self.cfg.vae.loss)["loss"]

    def sample_grid(self) -> None:
        """Held-out images (top half) over their EMA reconstructions (bottom half)."""
        x = held_out_images(self.cfg, 32)
        with torch.no_grad():
            x_hat = self.ema.model(x.to(self.device), sample=False)[0].cpu().clamp(-1, 1)
        save_grid(torch.cat([x, x_hat]), runs.sample_grid_path(self.run, self.step), nrow=8)

    def save(self) -> None:
        """The checkpoint of the last step carries the latent scaling factor, estimated with the EMA
        weights and given to both copies: one checkpoint, published once.

        A finished run resumed without new steps publishes nothing and keeps its factor: re-estimating
        could change its last bits on a GPU, hence the weights hash, and every latent model trained on
        it would be refused."""
        if self.step == self.cfg.train.steps and self.step != self.last_checkpoint:
            images = self.data.images[:SCALING_IMAGES].to(self.device)
            factor = self.ema.model.estimate_scaling_factor(images)
            self.net.scaling_factor.fill_(factor)
        super().save()


def held_out_images(cfg: Config, n: int) -> Tensor:
    """The first ``n`` held-out images of the config's data (a folder has no held-out split: its first images)."""
    if cfg.data.dataset == "shapes":
        return load_shapes_data(cfg.data, "heldout", n=n).images
    return load_data(cfg.data, "heldout" if cfg.data.dataset == "digits" else "train").images[:n]


@torch.no_grad()
def evaluate_vae(run, n: int = 1000, batch_size: int = 250, device: str = "auto") -> dict:
    """PSNR and SSIM (mean over images, posterior mode) of the EMA VAE on ``n`` held-out images;
    written to the run's ``metrics.json``."""
    cfg = runs.read_config(run, need_weights=False)
    vae = load_vae(run, resolve_device(device))
    x = held_out_images(cfg, n)
    dev = vae.scaling_factor.device
    x_hat = torch.cat([vae(x[i:i + batch_size].to(dev), sample=False)[0].cpu().clamp(-1, 1)
                       for i in range(0, len(x), batch_size)])
    metrics = {"n": len(x), "split": "heldout" if cfg.data.dataset != "folder" else "train",
               "psnr_db": psnr(x_hat, x).mean().item(), "scaling_factor": vae.scaling_factor.item()}
    if min(x.shape[-2:]) >= 11:
        metrics["ssim"] = ssim(x_hat, x).mean().item()
    runs.write_metrics(run, metrics)
    return metrics


def train_vae(cfg: Config, resume: bool = False, progress: bool = True, verify: bool = True) -> Path:
    """Train (or resume) the VAE run ``cfg.out``; returns the run folder."""
    return VAETrainer(cfg, resume=resume, progress=progress, verify=verify).fit()
