"""A small CLIP-style image-text model (Radford et al. 2021, "Learning Transferable Visual Models From
Natural Language Supervision"): a convolutional image tower and a linear projection of a frozen
sentence encoder's pooled vector into one embedding space, compared by cosine similarity at a
learnt temperature.

    model = ImageTextModel(image_size=32, text_dim=384)
    logits = model.logits(images, text_pooled)      # (B_images, B_texts), scaled cosines
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _stage(c_in: int, c_out: int, groups: int) -> nn.Sequential:
    """conv-GN-SiLU twice, the second with stride 2: half the resolution."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(groups, c_out), nn.SiLU(),
                         nn.Conv2d(c_out, c_out, 3, stride=2, padding=1), nn.GroupNorm(groups, c_out), nn.SiLU())


class ImageTower(nn.Module):
    """Images in [-1, 1] (B, 3, S, S) -> (B, dim): stages that halve the resolution down to 4x4,
    then a linear layer over the flattened map (position matters: captions say left and right)."""

    def __init__(self, image_size: int = 32, dim: int = 128, width: int = 32, groups: int = 8):
        super().__init__()
        if image_size < 8 or image_size & (image_size - 1):
            raise ValueError(f"the image tower takes power-of-2 sizes >= 8, got {image_size}")
        stages, c, size = [], 3, image_size
        while size > 4:
            stages.append(_stage(c, width, groups) if c == 3 else _stage(c, min(2 * c, 4 * width), groups))
            c, size = stages[-1][3].out_channels, size // 2
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(c * 16, dim)
        self.image_size = image_size

    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1:] != (3, self.image_size, self.image_size):
            raise ValueError(f"the image encoder takes (B, 3, {self.image_size}, {self.image_size}) images in "
                             f"[-1, 1], got shape {tuple(images.shape)}")
        return self.head(self.stages(images).flatten(1))


class ImageTextModel(nn.Module):
    """The image tower, a trained linear projection of the text encoder's pooled vectors
    (``text_dim`` wide) and the temperature (log scale, CLIP's initial 1 / 0.07)."""

    def __init__(self, image_size: int = 32, text_dim: int = 384, dim: int = 128, width: int = 32):
        super().__init__()
        self.image = ImageTower(image_size, dim, width)
        self.text = nn.Linear(text_dim, dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.config = {"image_size": image_size, "text_dim": text_dim, "dim": dim, "width": width}

    def image_embeddings(self, images: Tensor) -> Tensor:
        """Unit-norm image embeddings (B, dim)."""
        return F.normalize(self.image(images), dim=-1)

    def text_embeddings(self, pooled: Tensor) -> Tensor:
        """Unit-norm embeddings (B, dim) of the text encoder's pooled vectors."""
        return F.normalize(self.text(pooled), dim=-1)

    def logits(self, images: Tensor, pooled: Tensor) -> Tensor:
        scale = self.log_scale.clamp(max=math.log(100)).exp()  # CLIP clips the scale at 100
        return scale * self.image_embeddings(images) @ self.text_embeddings(pooled).T


def contrastive_loss(logits: Tensor, text_ids: Tensor) -> Tensor:
    """The symmetric InfoNCE loss of CLIP, with every text of the same caption a positive (a batch
    of shapes scenes repeats captions such as "a red circle"): cross-entropy against the uniform
    distribution over positives, images to texts and texts to images."""
    positives = (text_ids[:, None] == text_ids[None, :]).float()
    targets = positives / positives.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
