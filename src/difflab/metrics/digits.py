"""Evaluation of the digits job with an independent classifier trained on the training split only.

Reports the class accuracy of conditional samples and a Fréchet distance in
the classifier's penultimate features against held-out real digits, beside a
floor (real train vs real held-out) and a trivial baseline (independent per-pixel
Gaussians per class).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import ImageData, load_digits
from .frechet import frechet_distance, gaussian_stats


class DigitsClassifier(nn.Module):
    """A small CNN for 8x8 digits; ``features`` is its 64-d penultimate layer."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, 32, 3, padding=1), nn.SiLU(),
            nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 4, 64), nn.SiLU())
        self.head = nn.Linear(64, 10)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


def train_classifier(data: ImageData, epochs: int = 30, seed: int = 0) -> DigitsClassifier:
    """Adam on the given images with +-1 pixel shifts as augmentation; deterministic from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitsClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    x, y = data.images, data.labels
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for idx in perm.split(64):
            shift = torch.randint(-1, 2, (2,), generator=g).tolist()
            xb = torch.roll(x[idx], shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def pixel_gaussian_baseline(data: ImageData, labels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Samples from an independent Gaussian per pixel and class, fitted to ``data``."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(len(labels), *data.images.shape[1:])
    for c in range(data.num_classes):
        xs = data.images[data.labels == c]
        rows = labels == c
        z = torch.randn((int(rows.sum()), *xs.shape[1:]), generator=g)
        out[rows] = xs.mean(0) + xs.std(0) * z
    return out.clamp(-1, 1)


class DigitsEvaluator:
    """Holds the classifier and the real-data statistics; ``score(samples, labels)`` -> metrics."""

    def __init__(self, holdout: float = 0.2, seed: int = 0):
        self.train_data = load_digits("train", holdout, seed)
        self.heldout = load_digits("heldout", holdout, seed)
        self.classifier = train_classifier(self.train_data, seed=seed)
        self.heldout_stats = gaussian_stats(self.features(self.heldout.images))
        self.classifier_accuracy = self.accuracy(self.heldout.images, self.heldout.labels)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> np.ndarray:
        return torch.cat([self.classifier.features(b) for b in images.float().split(1000)]).numpy()

    @torch.no_grad()
    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        pred = torch.cat([self.classifier(b).argmax(1) for b in images.float().split(1000)])
        return float((pred == labels).float().mean())

    def frechet(self, images: torch.Tensor) -> float:
        return frechet_distance(*gaussian_stats(self.features(images)), *self.heldout_stats)

    def references(self, n: int, seed: int = 0) -> dict:
        labels = torch.arange(n) % 10
        return {"frechet_floor": self.frechet(self.train_data.images),
                "frechet_baseline": self.frechet(pixel_gaussian_baseline(self.train_data, labels, seed)),
                "baseline_class_accuracy": self.accuracy(pixel_gaussian_baseline(self.train_data, labels, seed), labels),
                "classifier_heldout_accuracy": self.classifier_accuracy}

    def score(self, samples: torch.Tensor, labels: torch.Tensor) -> dict:
        samples = samples.clamp(-1, 1)
        return {"class_accuracy": self.accuracy(samples, labels), "frechet_samples": self.frechet(samples)}
