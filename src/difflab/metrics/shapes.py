"""Evaluation of text-to-image samples of the shapes world with an attribute classifier.

An offline stand-in for CLIP score: a small CNN trained on real renders (never on samples) says
which colours, shapes and colour-shape pairs an image contains, how many objects it holds and
where (the coarse position and size of the object of each colour). ``ShapesEvaluator`` reports
how often samples show what their prompt asked for, and a Fréchet distance in the classifier's
penultimate features against held-out real renders beside a real-vs-real floor.

Seeds: the classifier trains on worlds ``seed`` (1-3 objects) and ``SINGLES_WORLD + seed`` (one
object); reference statistics, the floor and the classifier's own accuracy use worlds
``REFERENCE_WORLD``, ``FLOOR_WORLD`` and ``CHECK_WORLD`` (+ seed): streams of scenes independent of
the training ones (for seeds below 10,000).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..data.shapes import COLOURS, MAX_OBJECTS, POSITIONS, RENDERER_VERSION, SHAPES, SIZES, ShapesData, ShapesWorld
from ..files import atomic_write
from .frechet import frechet_distance, gaussian_stats

#: bump when the classifier or its training changes, so cached weights are rebuilt
CLASSIFIER_VERSION = 1
REFERENCE_WORLD, FLOOR_WORLD, CHECK_WORLD, SINGLES_WORLD = 10_000, 20_000, 30_000, 40_000
FEATURES = 128
#: logits of each head; multi-label heads (sigmoid) except ``count`` (softmax over 1..MAX_OBJECTS).
#: ``pair`` is colour-major (colour * len(SHAPES) + shape); ``size`` and ``place`` say, for each
#: colour, the size / coarse position of the object of that colour (colours are distinct in a scene).
HEADS = {"colour": len(COLOURS), "shape": len(SHAPES), "pair": len(COLOURS) * len(SHAPES),
         "size": len(COLOURS) * len(SIZES), "place": len(COLOURS) * len(POSITIONS), "count": MAX_OBJECTS}


@dataclass(frozen=True)
class ShapesTraining:
    """How the attribute classifier is trained (all of it is part of the cache key).

    Every batch is ``batch_size`` fresh scenes (unlimited data, so no epochs). A curriculum: the
    first ``singles_steps`` batches hold single objects only (shape is learnt there within a few
    hundred steps; from 1-3 object scenes alone shape accuracy stalls near chance far longer), later
    ones a fraction ``single_fraction`` of single objects (what prompts ask for) and 1-3 objects
    otherwise. Adam with a cosine-decayed learning rate. Augmentation, so that imperfect samples
    are still read as what they show: half the images blurred by a Gaussian of std drawn from
    [0, ``blur``] px, then Gaussian pixel noise of a per-image std drawn from [0, ``noise``].
    """

    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    noise: float = 0.2
    blur: float = 1.0
    singles_steps: int = 300
    single_fraction: float = 0.3
    width: int = 32


def _conv(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> list[nn.Module]:
    # batch norm: without it shape accuracy plateaus near chance far longer (measured)
    return [nn.Conv2d(cin, cout, kernel, stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.SiLU()]


class ShapesClassifier(nn.Module):
    """A small CNN for square inputs >= 8 px; ``features`` is its 128-d penultimate layer.

    Inputs of 32 px and more first pass learned stride-2 convolutions down to 16..31 px, so every
    size sees shapes at about the same scale in pixels (and trains at about the 16 px cost).
    """

    def __init__(self, image_size: int = 32, width: int = 32):
        super().__init__()
        c, stem, cin = width, [], 3
        while image_size >= 32:
            stem += _conv(cin, c // 2, kernel=4, stride=2)
            cin, image_size = c // 2, image_size // 2
        self.body = nn.Sequential(
            *stem, *_conv(cin, c // 2), *_conv(c // 2, c), nn.MaxPool2d(2), *_conv(c, 2 * c), nn.MaxPool2d(2),
            *_conv(2 * c, 2 * c), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(2 * c * 16, FEATURES), nn.SiLU())
        self.head = nn.Linear(FEATURES, sum(HEADS.values()))

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return dict(zip(HEADS, self.head(self.body(x)).split(list(HEADS.values()), dim=1)))


def targets(data: ShapesData) -> dict[str, Tensor]:
    """Multi-hot targets of every multi-label head and the count class (objects - 1)."""
    n, valid = len(data), data.colours >= 0
    rows = torch.arange(n)[:, None].expand_as(data.colours)[valid]
    c, s = data.colours[valid], data.shapes[valid]
    index = {"colour": c, "shape": s, "pair": c * len(SHAPES) + s,
             "size": c * len(SIZES) + data.sizes[valid], "place": c * len(POSITIONS) + data.places[valid]}
    out = {}
    for head, idx in index.items():
        out[head] = torch.zeros(n, HEADS[head])
        out[head][rows, idx] = 1.0
    out["count"] = data.counts - 1
    return out


def classifier_loss(logits: dict[str, Tensor], target: dict[str, Tensor]) -> Tensor:
    """Cross-entropy of the count plus binary cross-entropy summed over every multi-label logit
    (summed, not averaged, so a rare positive among 28 pairs is not drowned out); batch mean."""
    loss = F.cross_entropy(logits["count"], target["count"])
    for head in HEADS:
        if head != "count":
            loss = loss + F.binary_cross_entropy_with_logits(logits[head], target[head], reduction="sum") / len(
                logits[head])
    return loss


def _training_chunk(image_size: int, seed: int, start: int, n: int, single_fraction: float,
                    g: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
    """Training scenes ``start .. start + n - 1``: singles from world ``seed + SINGLES_WORLD``
    and 1-3 objects from world ``seed``, shuffled together; images and targets."""
    n_single = round(single_fraction * n)
    parts = [ShapesWorld(image_size, 1, 1, seed=SINGLES_WORLD + seed).load(n_single, start=start)
             if n_single else None,
             ShapesWorld(image_size, 1, MAX_OBJECTS, seed=seed).load(n - n_single, start=start)
             if n > n_single else None]
    parts = [p for p in parts if p is not None]
    images = torch.cat([p.images for p in parts])
    per_part = [targets(p) for p in parts]
    target = {k: torch.cat([t[k] for t in per_part]) for k in HEADS}
    perm = torch.randperm(n, generator=g)
    return images[perm], {k: v[perm] for k, v in target.items()}


def gaussian_blur(x: Tensor, sigma: Tensor, radius: int = 2) -> Tensor:
    """Blur each image of ``x`` (N, C, H, W) by a separable Gaussian of its own std ``sigma`` (N,) px
    (edges replicated; std 0 leaves the image unchanged)."""
    n, c, h, w = x.shape
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-taps**2 / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (N*C, taps): one kernel per channel
    y = F.pad(x.reshape(1, n * c, h, w), (radius,) * 4, mode="replicate")
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)
    return F.conv2d(y, k[:, None, None, :], groups=n * c).reshape(n, c, h, w)


def _augment(x: Tensor, training: ShapesTraining, g: torch.Generator) -> Tensor:
    n = len(x)
    if training.blur > 0:
        sigma = training.blur * torch.rand(n, generator=g) * (torch.rand(n, generator=g) < 0.5)
        x = gaussian_blur(x, sigma)
    std = training.noise * torch.rand(n, 1, 1, 1, generator=g)
    return x + std * torch.randn(x.shape, generator=g)


def train_classifier(image_size: int, seed: int = 0, training: ShapesTraining = ShapesTraining(),
                     chunk: int = 32) -> ShapesClassifier:
    """Adam on fresh renders (see ``ShapesTraining``); deterministic from ``seed``.

    Scenes are rendered ``chunk`` batches at a time, so memory stays small for long runs.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG alone
        torch.manual_seed(seed)
        model = ShapesClassifier(image_size, training.width)
    opt = torch.optim.Adam(model.parameters(), lr=training.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / training.steps)))
    bs = training.batch_size
    model.train()
    start = 0
    while start < training.steps:
        singles = start < training.singles_steps
        n_batches = min(chunk, training.steps - start, training.singles_steps - start if singles else chunk)
        images, target = _training_chunk(image_size, seed, start * bs, n_batches * bs,
                                         1.0 if singles else training.single_fraction, g)
        for b in range(n_batches):
            rows = slice(b * bs, (b + 1) * bs)
            x = _augment(images[rows], training, g)
            loss = classifier_loss(model(x), {k: v[rows] for k, v in target.items()})
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        start += n_batches
    return model.eval()


# ----------------------------------------------------------------------------- cache
def cache_dir() -> Path:
    """``$DIFFLAB_CACHE``, default ``~/.cache/difflab``."""
    return Path(os.environ.get("DIFFLAB_CACHE", "~/.cache/difflab")).expanduser()


def cache_path(image_size: int, seed: int, training: ShapesTraining) -> Path:
    """Weights file keyed by a hash of everything that determines them."""
    key = json.dumps({"image_size": image_size, "seed": seed, "training": asdict(training),
                      "renderer": RENDERER_VERSION, "classifier": CLASSIFIER_VERSION}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "shapes" / f"classifier-{image_size}px-{digest}.safetensors"


def load_or_train_classifier(image_size: int, seed: int = 0, training: ShapesTraining = ShapesTraining()
                             ) -> tuple[ShapesClassifier, bool]:
    """The cached classifier if there is one (and whether it was), else a freshly trained one, cached."""
    path = cache_path(image_size, seed, training)
    if path.exists():
        model = ShapesClassifier(image_size, training.width)
        try:
            model.load_state_dict(load_file(path))
            return model.eval(), True
        except (OSError, RuntimeError, SafetensorError) as err:  # unreadable or foreign: rebuild, don't fail
            warnings.warn(f"could not load cached shapes classifier {path} ({err}); retraining", RuntimeWarning)
    model = train_classifier(image_size, seed, training)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"training": json.dumps(asdict(training))}))
    return model, False


# ----------------------------------------------------------------------------- evaluator
def _indices(values, vocab: tuple[str, ...], n: int, what: str) -> Tensor:
    """Names (one for all, or one per image) or integer indices into ``vocab``, as an (n,) tensor."""
    if isinstance(values, str):
        values = [values] * n
    if isinstance(values, np.ndarray) and values.dtype.kind in "iu":
        values = torch.from_numpy(values)
    if isinstance(values, Tensor):
        idx = values.long().reshape(-1)
    else:
        values = list(values)
        bad = [v for v in values if not isinstance(v, (int, np.integer)) and v not in vocab]
        if bad:
            raise ValueError(f"{what}s must be names from {vocab} or indices, got {bad[0]!r}")
        idx = torch.tensor([v if isinstance(v, (int, np.integer)) else vocab.index(v) for v in values])
    if len(idx) != n:
        raise ValueError(f"need one {what} per image ({n}), got {len(idx)}")
    if len(idx) and (idx.min() < 0 or idx.max() >= len(vocab)):
        raise ValueError(f"{what} indices must lie in [0, {len(vocab)}), got {idx.min()}..{idx.max()}")
    return idx


class ShapesEvaluator:
    """The attribute classifier for ``image_size`` renders and held-out real statistics.

    ``n_reference`` held-out renders of ``min_objects..max_objects`` objects give the Fréchet
    reference; match them to what the evaluated model was trained on, and score as many samples as
    ``n_reference`` so they compare with ``references()["frechet_floor"]`` (the estimate's bias
    depends on the number of images).
    """

    def __init__(self, image_size: int = 32, seed: int = 0, training: ShapesTraining = ShapesTraining(),
                 n_reference: int = 2000, min_objects: int = 1, max_objects: int = MAX_OBJECTS):
        if n_reference < 2:
            raise ValueError(f"n_reference must be >= 2 for a covariance, got {n_reference}")
        ShapesWorld(image_size, min_objects, max_objects, seed)  # bad arguments fail before training
        self.image_size, self.seed, self.training, self.n_reference = image_size, seed, training, n_reference
        self.objects = (min_objects, max_objects)
        self.classifier, self.loaded_from_cache = load_or_train_classifier(image_size, seed, training)
        self.reference = self._world(REFERENCE_WORLD).load(n_reference)
        self.reference_stats = gaussian_stats(self.features(self.reference.images))

    def _world(self, offset: int, single: bool = False) -> ShapesWorld:
        lo, hi = (1, 1) if single else self.objects
        return ShapesWorld(self.image_size, lo, hi, seed=offset + self.seed)

    def _check(self, images: Tensor) -> Tensor:
        s = self.image_size
        if not isinstance(images, Tensor) or images.ndim != 4 or tuple(images.shape[1:]) != (3, s, s):
            got = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
            raise ValueError(f"images must be a (N, 3, {s}, {s}) tensor in [-1, 1], got {got}")
        return images.detach().float().cpu().clamp(-1, 1)

    @torch.no_grad()
    def features(self, images: Tensor) -> np.ndarray:
        """(N, 128) penultimate-layer features."""
        return torch.cat([self.classifier.features(b) for b in self._check(images).split(1000)]).numpy()

    @torch.no_grad()
    def logits(self, images: Tensor) -> dict[str, Tensor]:
        outs = [self.classifier(b) for b in self._check(images).split(1000)]
        return {h: torch.cat([o[h] for o in outs]) for h in HEADS}

    def presence(self, images: Tensor) -> dict[str, Tensor]:
        """Probabilities: ``colour`` (N, C), ``shape`` (N, S), ``pair`` (N, C, S) present; ``count`` (N, 3)."""
        z = self.logits(images)
        return {"colour": z["colour"].sigmoid(), "shape": z["shape"].sigmoid(),
                "pair": z["pair"].sigmoid().reshape(-1, len(COLOURS), len(SHAPES)), "count": z["count"].softmax(1)}

    def contains_colour(self, images: Tensor, colour: str) -> Tensor:
        """(N,) bool: the classifier gives ``colour`` a presence probability above 0.5."""
        return self.presence(images)["colour"][:, _indices([colour], COLOURS, 1, "colour")[0]] > 0.5

    def contains_shape(self, images: Tensor, shape: str) -> Tensor:
        return self.presence(images)["shape"][:, _indices([shape], SHAPES, 1, "shape")[0]] > 0.5

    def alignment(self, images: Tensor, colours, shapes) -> dict:
        """How often single-object samples show the prompted colour and shape.

        ``colour_accuracy``/``shape_accuracy``: the most probable colour/shape is the requested one;
        ``both_accuracy``: both at once; ``pair_accuracy``: the most probable colour-shape pair is
        the requested pair; ``single_object_rate``: the count head's answer is one object.
        """
        z = self.logits(images)
        c = _indices(colours, COLOURS, len(images), "colour")
        s = _indices(shapes, SHAPES, len(images), "shape")
        colour_ok, shape_ok = z["colour"].argmax(1) == c, z["shape"].argmax(1) == s
        pair_ok = z["pair"].argmax(1) == c * len(SHAPES) + s
        mean = (lambda t: float(t.float().mean()))
        return {"colour_accuracy": mean(colour_ok), "shape_accuracy": mean(shape_ok),
                "both_accuracy": mean(colour_ok & shape_ok), "pair_accuracy": mean(pair_ok),
                "single_object_rate": mean(z["count"].argmax(1) == 0)}

    def frechet(self, images: Tensor) -> float:
        """Fréchet distance of the images' features to the held-out reference renders'."""
        return frechet_distance(*gaussian_stats(self.features(images)), *self.reference_stats)

    def classifier_accuracy(self, n: int | None = None) -> dict:
        """``alignment`` of held-out real single-object renders with their true attributes."""
        data = self._world(CHECK_WORLD, single=True).load(n or self.n_reference)
        return self.alignment(data.images, data.colours[:, 0], data.shapes[:, 0])

    def references(self) -> dict:
        """Floors: Fréchet of other held-out real renders (same count) and the classifier's accuracy
        on real single-object renders; and uniform noise's Fréchet as a scale."""
        floor = self._world(FLOOR_WORLD).load(self.n_reference).images
        noise = torch.rand(self.n_reference, 3, self.image_size, self.image_size,
                           generator=torch.Generator().manual_seed(self.seed)) * 2 - 1
        acc = self.classifier_accuracy()
        return {"frechet_floor": self.frechet(floor), "frechet_noise": self.frechet(noise),
                **{f"classifier_{k}": v for k, v in acc.items()}}

    def score(self, images: Tensor, colours, shapes) -> dict:
        """``alignment`` plus ``frechet`` (against the held-out reference renders)."""
        return {**self.alignment(images, colours, shapes), "frechet": self.frechet(images)}
