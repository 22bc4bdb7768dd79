"""Training a noise-aware classifier for classifier guidance (Dhariwal & Nichol 2021, Sec. 4, Alg. 1).

    clf = train_noisy_classifier(data.images, data.labels, 10, schedule, steps=3000)
    save_classifier(clf, "runs/digits-classifier.safetensors")
    guided = ClassifierGuidance(denoiser, load_classifier("runs/digits-classifier.safetensors"), scale=2.0)
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..files import write_json
from ..nn.classifier import NoiseAwareClassifier
from ..runs import load_weights, save_weights
from ..schedules import NoiseSchedule
from ..tensors import append_dims


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


def save_classifier(classifier: NoiseAwareClassifier, path) -> Path:
    """Weights to ``path`` (safetensors) and constructor args to ``path`` with suffix ``.json``, atomically."""
    path = Path(path)
    save_weights(path, classifier)
    write_json(path.with_suffix(".json"), classifier.config)
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
    load_weights(path, model)
    return model.to(device).eval()
