"""Classifier guidance (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs", Sec. 4, Alg. 1), in sigma space.

A noise-aware classifier ``p(y | x, sigma)`` is trained on noisy inputs
``x = x0 + sigma n`` at the noise levels the diffusion model trains on. Its
gradient steers any Denoiser: by Tweedie's formula the posterior mean under
``p(x | y)`` is

    E[x0 | x, y] = D(x, sigma) + sigma^2 grad_x log p(y | x, sigma),

since ``grad log p(x | y) = grad log p(x) + grad log p(y | x)``. Scaling the
gradient term by ``s`` samples from ``p(x) p(y | x)^s`` (up to normalisation),
the paper's Eq. 10 / Alg. 1 with the mean shift ``s Sigma grad log p`` written
for x0_hat instead of the DDPM mean.

    clf = train_noisy_classifier(data.images, data.labels, 10, schedule, steps=3000)
    guided = ClassifierGuidance(denoiser, clf, scale=2.0)          # a Denoiser again
    x = sample_heun(guided, x, sigmas, Cond(labels=y))              # y may differ per sample
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from .cond import Cond
from .denoisers import append_dims, batch_sigma
from .files import atomic_write
from .nn.unet import CONV, Downsample, ResBlock, timestep_embedding
from .schedules import NoiseSchedule


# ------------------------------------------------------------------ the network

class NoiseAwareClassifier(nn.Module):
    """``p(y | x, sigma)``: the U-Net's down path with a pooled linear head (ADM's encoder classifier).

    Conv in; per level ``num_res_blocks`` ResBlocks fed the noise embedding and a
    strided-conv downsample between levels; GroupNorm, SiLU, global average pool,
    linear to ``num_classes`` logits (Dhariwal & Nichol 2021, Sec. 4 / App. C).

    Preconditioned as EDM (Karras et al. 2022, Table 1): the network sees
    ``c_in x`` with ``c_in = 1/sqrt(sigma^2 + sigma_data^2)`` (unit variance at
    every noise level) and ``c_noise = ln(sigma)/4``. Both depend on sigma
    alone, so one classifier serves any schedule in sigma space (VP, VE, EDM).

    Args:
        in_channels: data channels.
        num_classes: number of logits.
        channels: width of the first level; level i has ``channels * channel_mult[i]``.
        num_res_blocks: ResBlocks per level.
        sigma_data: data standard deviation assumed by the input scaling.
        groups: GroupNorm groups.
        dims: 1, 2 or 3 spatial dimensions.
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int = 32,
                 channel_mult: Sequence[int] = (1, 2), num_res_blocks: int = 1, sigma_data: float = 0.5,
                 groups: int = 8, dropout: float = 0.0, dims: int = 2):
        super().__init__()
        if dims not in CONV:
            raise ValueError(f"dims must be 1, 2 or 3, got {dims}")
        if num_classes < 2:
            raise ValueError(f"a classifier needs num_classes >= 2, got {num_classes}")
        self.config = {"in_channels": in_channels, "num_classes": num_classes, "channels": channels,
                       "channel_mult": list(channel_mult), "num_res_blocks": num_res_blocks,
                       "sigma_data": sigma_data, "groups": groups, "dropout": dropout, "dims": dims}
        self.in_channels, self.num_classes, self.dims = in_channels, num_classes, dims
        self.channels, self.sigma_data = channels, sigma_data
        emb_dim = 4 * channels
        self.time_mlp = nn.Sequential(nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = CONV[dims](in_channels, channels, 3, padding=1)
        self.blocks = nn.ModuleList()
        c = channels
        widths = [channels * m for m in channel_mult]
        for level, w in enumerate(widths):
            for _ in range(num_res_blocks):
                self.blocks.append(ResBlock(dims, c, w, emb_dim, groups, dropout, scale_shift=True))
                c = w
            if level < len(widths) - 1:
                self.blocks.append(Downsample(dims, c))
        self.norm_out = nn.GroupNorm(groups, c)
        self.head = nn.Linear(c, num_classes)

    def check_input(self, x: Tensor) -> None:
        if x.ndim != self.dims + 2 or x.shape[1] != self.in_channels:
            expected = f"(B, {self.in_channels}, " + ", ".join(["S"] * self.dims) + ")"
            raise ValueError(f"NoiseAwareClassifier expects input of shape {expected}, got {tuple(x.shape)}")

    def forward(self, x: Tensor, sigma) -> Tensor:
        """Logits of ``p(y | x, sigma)`` for a sigma-space input ``x = x0 + sigma n``; sigma scalar or (B,)."""
        self.check_input(x)
        sigma = batch_sigma(x, sigma)
        dtype = self.conv_in.weight.dtype
        c_in = append_dims((sigma**2 + self.sigma_data**2).rsqrt(), x.ndim).to(dtype)
        c_noise = (sigma.log() / 4).to(torch.float32)
        emb = F.silu(self.time_mlp(timestep_embedding(c_noise, self.channels).to(dtype)))
        h = self.conv_in(x.to(dtype) * c_in)
        for block in self.blocks:
            h = block(h, emb)
        h = F.silu(self.norm_out(h)).mean(dim=tuple(range(2, h.ndim)))
        return self.head(h)


# --------------------------------------------------------------------- training

def train_noisy_classifier(images: Tensor, labels: Tensor, num_classes: int, schedule: NoiseSchedule, *,
                           steps: int = 2000, batch_size: int = 128, lr: float = 1e-3, seed: int = 0,
                           weight_decay: float = 0.05, progress: bool = True, **net_kwargs) -> NoiseAwareClassifier:
    """Train a NoiseAwareClassifier on ``x0 + sigma n`` with ``sigma ~ schedule.sample_sigma``.

    Drawing sigma exactly as the diffusion model's trainer does means the
    classifier is accurate where guidance will query it (Dhariwal & Nichol
    2021, Sec. 4: the classifier is trained on the same noising process).
    AdamW with a cosine learning-rate decay. Deterministic from ``seed``:
    initialisation, batches, noise levels and noise all come from it.
    ``net_kwargs`` go to NoiseAwareClassifier (e.g. ``sigma_data``, ``channels``).
    Returns the classifier in eval mode.
    """
    images, labels = _check_training_data(images, labels, num_classes)
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    torch.manual_seed(seed)
    dims = images.ndim - 2
    model = NoiseAwareClassifier(images.shape[1], num_classes, dims=dims, **net_kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    model.train()
    bar = tqdm(range(steps), disable=not progress, desc="classifier", dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(0, len(images), (batch_size,), generator=g)
        sigma = schedule.sample_sigma(batch_size, g)
        noise = torch.randn(images[idx].shape, generator=g)
        x = images[idx] + append_dims(sigma, images.ndim).to(images.dtype) * noise
        loss = F.cross_entropy(model(x, sigma), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return model.eval()


def _check_training_data(images: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    images, labels = torch.as_tensor(images).float(), torch.as_tensor(labels).long()
    if images.ndim not in (3, 4, 5):
        raise ValueError(f"images must be (N, C, *spatial) with 1-3 spatial dims, got {tuple(images.shape)}")
    if labels.shape != (len(images),):
        raise ValueError(f"labels must have shape ({len(images)},) to match the images, got {tuple(labels.shape)}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes - 1}], got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    return images, labels


@torch.no_grad()
def noisy_accuracy(classifier: nn.Module, images: Tensor, labels: Tensor, sigma: float, seed: int = 0) -> float:
    """Accuracy of ``classifier`` on ``images + sigma n`` (a fixed noise draw from ``seed``)."""
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)).to(images.device)
    logits = classifier(images + sigma * noise, torch.full((len(images),), float(sigma), device=images.device))
    return float((logits.argmax(1) == labels).float().mean())


# ------------------------------------------------------------------ save / load

def save_classifier(classifier: NoiseAwareClassifier, path) -> Path:
    """Weights to ``path`` (safetensors) and constructor args to ``path`` with suffix ``.json``, atomically."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in classifier.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp))
    atomic_write(path.with_suffix(".json"),
                 lambda tmp: Path(tmp).write_text(json.dumps(classifier.config, indent=2) + "\n"))
    return path


def load_classifier(path, device="cpu") -> NoiseAwareClassifier:
    """A classifier saved by ``save_classifier``, in eval mode."""
    path = Path(path)
    config_path = path.with_suffix(".json")
    for p in (path, config_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} does not exist; expected the weights ({path.name}) and their "
                                    f"constructor args ({config_path.name}) written by save_classifier")
    model = NoiseAwareClassifier(**json.loads(config_path.read_text()))
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval()


# --------------------------------------------------------------------- guidance

class ClassifierGuidance:
    """x0_hat = D(x, sigma, cond) + scale * sigma^2 * grad_x log p(y | x, sigma)  (Dhariwal & Nichol 2021, Alg. 1).

    At ``scale`` 1 this is the exact posterior mean E[x0 | x, y] (Tweedie, with
    ``grad log p(x|y) = grad log p(x) + grad log p(y|x)``); larger scales sharpen
    ``p(y | x)^scale``, the paper's gradient scale. A Denoiser again, so it nests
    with other wrappers and runs in any sampler.

    Args:
        denoiser: any Denoiser ``D(x, sigma, cond)``; an unconditional one ignores ``cond.labels``.
        classifier: ``classifier(x, sigma) -> logits`` on sigma-space inputs (a NoiseAwareClassifier).
        scale: gradient scale ``s``; 0 is the plain denoiser.
        target: the class y to steer towards: ``None`` reads ``cond.labels`` (so
            each sample of a batch can have its own target, even for an
            unconditional model), or an int, or a (B,) tensor.

    The gradient term is ``self.log_prob(logits, y)``, by default
    ``log_softmax(logits)[y]``; override it to steer by another objective.
    Safety guidance (spec Q37) is the same wrapper: with a safety classifier
    (class 0 = safe, 1 = unsafe) and ``target=0``, the gradient of
    ``log p(safe | x) = log(1 - p(unsafe | x))`` points away from unsafe content
    and vanishes where the classifier is already sure the sample is safe. To
    avoid a *set* of classes A, override ``log_prob`` to return
    ``log(1 - sum_{a in A} p(a | x))``, e.g. ``torch.log1p(-probs[:, A].sum(1))``.
    """

    def __init__(self, denoiser, classifier, scale: float, target: int | Tensor | None = None):
        self.denoiser, self.classifier, self.scale, self.target = denoiser, classifier, float(scale), target

    @property
    def schedule(self) -> NoiseSchedule:
        return self.denoiser.schedule

    def log_prob(self, logits: Tensor, y: Tensor) -> Tensor:
        """Per-sample ``log p(y | x, sigma)`` from the classifier's logits, shape (B,)."""
        return logits.log_softmax(-1).gather(1, y[:, None]).squeeze(1)

    def targets(self, x: Tensor, cond: Cond | None) -> Tensor:
        """The (B,) class targets for this batch."""
        if self.target is None:
            if cond is None or cond.labels is None:
                raise ValueError("ClassifierGuidance needs a target class: pass target= to the wrapper "
                                 "or Cond(labels=...) to the sampler")
            y = cond.labels
        else:
            y = torch.as_tensor(self.target)
        y = y.to(device=x.device, dtype=torch.long)
        if y.ndim == 0:
            y = y.expand(len(x))
        if y.shape != (len(x),):
            raise ValueError(f"classifier guidance target must be an int or have shape ({len(x)},), "
                             f"got shape {tuple(y.shape)}")
        return y

    def grad_log_prob(self, x: Tensor, sigma: Tensor, y: Tensor) -> Tensor:
        """grad_x log p(y | x, sigma), detached. Grad is enabled locally because samplers run under no_grad."""
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            # Summing over the batch gives each sample its own gradient: the classifier
            # treats samples independently (GroupNorm, no batch statistics, eval mode).
            log_p = self.log_prob(self.classifier(x_in, sigma), y).sum()
            (grad,) = torch.autograd.grad(log_p, x_in)
        return grad.detach()

    def __call__(self, x: Tensor, sigma, cond: Cond | None = None) -> Tensor:
        sigma = batch_sigma(x, sigma)
        x0_hat = self.denoiser(x, sigma, cond)
        if self.scale == 0:
            return x0_hat
        grad = self.grad_log_prob(x, sigma, self.targets(x, cond))
        shift = self.scale * append_dims(sigma**2, x.ndim) * grad.double()
        return (x0_hat.double() + shift).to(x0_hat.dtype).detach()
