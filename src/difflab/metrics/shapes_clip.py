"""The shapes world's own CLIP (``adapters.image_encoder`` trains it) behind the ``CLIPScorer``
interface: CLIP score, CLIP features for CLIP-FID, zero-shot caption retrieval, and the image
embeddings an IP-Adapter reads. ``image_scorer(path)`` opens either that folder or a local Hugging
Face CLIP folder (real CLIP weights), so everything that takes one takes the other.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import SHAPES_HELDOUT_START
from ..data.shapes import COLOURS, SHAPES, ShapesWorld, single_object_prompts
from ..nn.image_encoder import ImageTextModel
from ..runs import load_weights, weights_sha256
from ..text import MiniLMEncoder, _check_captions
from .clip_score import CLIPScorer

WEIGHTS, CONFIG = "image_encoder.safetensors", "image_encoder_config.json"


def text_identity(text: MiniLMEncoder) -> str:
    return weights_sha256(text.model)


class ShapesCLIPScorer(CLIPScorer):
    """A trained ``ImageTextModel`` folder with its frozen MiniLM. Images (N, 3, H, W) in [-1, 1]
    of another size are resized (antialiased bilinear) to the encoder's; uint8 images (0..255) are
    read as the evaluation's shards hold them."""

    def __init__(self, folder, device="cpu"):
        folder = Path(folder)
        for p in (folder / WEIGHTS, folder / CONFIG):
            if not p.is_file():
                raise FileNotFoundError(f"{p} does not exist; {folder} should be an image encoder written by "
                                        f"`difflab train-image-encoder {folder}`")
        self.path, self.record = folder, json.loads((folder / CONFIG).read_text())
        self.model = ImageTextModel(**self.record["model"])
        load_weights(folder / WEIGHTS, self.model)
        self.model.to(device).eval().requires_grad_(False)
        self.text = MiniLMEncoder(device=device)
        if text_identity(self.text) != self.record["text_encoder"]:
            raise ValueError(f"{folder} was trained against MiniLM weights with sha256 "
                             f"{self.record['text_encoder'][:12]}..., but the installed ones have "
                             f"{text_identity(self.text)[:12]}...")
        self.embed_dim = self.model.config["dim"]

    def pixel_values(self, images: Tensor) -> Tensor:
        images = torch.as_tensor(images)
        images = images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images.float()
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected RGB images (N, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
        size = self.model.config["image_size"]
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return images.to(self.device)

    @torch.no_grad()
    def image_features(self, images: Tensor, normalize: bool = False) -> Tensor:
        f = self.model.image(self.pixel_values(images))
        return F.normalize(f, dim=-1) if normalize else f

    @torch.no_grad()
    def text_features(self, captions: Sequence[str], normalize: bool = False) -> Tensor:
        f = self.model.text(self.text(_check_captions(captions)).pooled.float().to(self.device))
        return F.normalize(f, dim=-1) if normalize else f


def image_scorer(path, device="cpu") -> CLIPScorer:
    """The shapes world's encoder folder (it holds ``image_encoder_config.json``), or a local Hugging
    Face CLIP folder (``CLIPScorer``; None = ``$DIFFLAB_CLIP_PATH``)."""
    if path is not None and (Path(path) / CONFIG).is_file():
        return ShapesCLIPScorer(path, device)
    scorer = CLIPScorer(path, device)
    scorer.embed_dim = scorer.model.config.projection_dim
    return scorer


@torch.no_grad()
def retrieval_accuracy(scorer: CLIPScorer, image_size: int, n: int = 1000) -> float:
    """Zero-shot caption retrieval: for ``n`` held-out single-object renders (never trained on), the
    share whose most similar caption among the 28 "a {colour} {shape}" prompts is their own."""
    prompts = single_object_prompts(len(SHAPES) * len(COLOURS))[0]
    data = ShapesWorld(image_size, 1, 1).load(n, start=SHAPES_HELDOUT_START)
    txt = scorer.text_features(prompts, normalize=True)
    img = torch.cat([scorer.image_features(data.images[i:i + 500], normalize=True) for i in range(0, n, 500)])
    truth = data.shapes[:, 0] * len(COLOURS) + data.colours[:, 0]  # single_object_prompts' order
    return float(((img @ txt.T).argmax(1).cpu() == truth).float().mean())
