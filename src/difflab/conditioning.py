"""From dataset rows and user requests to ``Cond``: class labels or cached text embeddings.

Both conditioners turn an int64 "label" per row into a ``Cond``, with one index reserved for
the null condition, so the trainer's label dropout (classifier-free guidance) and its per-step
seeded batches work the same for classes and captions.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .cond import Cond
from .runs import weights_sha256
from .text import TextEmbedding, build_text_encoder


class ClassConditioner:
    """Class labels 0..K-1; the null class is K."""

    def __init__(self, num_classes: int):
        self.num_classes = self.null_index = num_classes

    def cond(self, index: Tensor) -> Cond:
        return Cond(labels=index)

    def null(self) -> Cond:
        return Cond(labels=torch.tensor([self.null_index]))

    def unet_kwargs(self) -> dict:
        return {"num_classes": self.num_classes}


class TextConditioner:
    """A frozen text encoder and a table of the embeddings of every caption of a dataset.

    The table holds the sorted unique captions, then the empty prompt (the null condition), so
    a dataset row's label is its caption's row in the table and the null label is the last row.
    ``encode`` runs the encoder on new prompts at sampling time.
    """

    def __init__(self, encoder, captions: Sequence[str] = (), batch_size: int = 256, progress: bool = True):
        self.encoder = encoder
        self.captions = sorted(set(captions) - {""}) + [""]
        self.index = {c: i for i, c in enumerate(self.captions)}
        self.null_index = len(self.captions) - 1
        self.table = self._encode_all(self.captions, batch_size, progress)

    def _encode_all(self, captions, batch_size, progress):
        chunks = [captions[i:i + batch_size] for i in range(0, len(captions), batch_size)]
        with torch.no_grad():
            return TextEmbedding.cat([self.encoder(c) for c in tqdm(chunks, disable=not progress or len(chunks) < 2,
                                                                     desc="text embeddings")])

    def labels(self, captions: Sequence[str]) -> Tensor:
        """Each caption's row in the table (all must be in it)."""
        return torch.tensor([self.index[c] for c in captions], dtype=torch.int64)

    def cond(self, index: Tensor) -> Cond:
        """The table's rows ``index``, cut to the longest of their captions."""
        return Cond.from_text(self.table[index.cpu()]).trim_padding().to(index.device)

    def null(self) -> Cond:
        return self.cond(torch.tensor([self.null_index]))

    def encode(self, prompts: Sequence[str]) -> Cond:
        """Each distinct prompt runs through the encoder once (an evaluation repeats a few prompts
        hundreds of times); encoders zero their padding, so the rows equal a direct encoding."""
        prompts = list(prompts)
        unique = list(dict.fromkeys(prompts))
        with torch.no_grad():
            embedding = self.encoder(unique)
        row = {p: i for i, p in enumerate(unique)}
        return Cond.from_text(embedding[torch.tensor([row[p] for p in prompts])])

    def encode_concept(self, prompts: Sequence[str]) -> Cond:
        """One condition for a concept named by several prompts: their mean embedding (batch 1).

        Token states are averaged position by position over the prompts that have a real token
        there, pooled vectors plainly. What the prompts share (e.g. "red" in "a red circle", "a
        red square", ...) survives the average; what differs (the shape) largely cancels. Useful
        as a Safe Latent Diffusion concept when the bare word is not a caption the model knows.
        """
        c = self.encode(prompts)
        weight = c.context_mask[..., None].float()
        context = (c.context * weight).sum(0, keepdim=True) / weight.sum(0, keepdim=True).clamp(min=1)
        return Cond(context=context, context_mask=c.context_mask.any(0, keepdim=True),
                    pooled=c.pooled.mean(0, keepdim=True))

    def unet_kwargs(self) -> dict:
        return {"context_dim": self.encoder.dim, "pooled_dim": self.encoder.pooled_dim}

    def identity(self) -> dict:
        """What the model was trained against: encoder name, folder, token limit and a weights hash."""
        if not hasattr(self, "_identity"):
            self._identity = {"name": self.encoder.name, "path": str(getattr(self.encoder, "path", "")),
                              "max_length": self.encoder.max_length,
                              "weights_sha256": weights_sha256(self.encoder.model)}
        return self._identity

    def check_identity(self, recorded: dict, where) -> None:
        """Refuse an encoder other than the one ``recorded`` in a run (same width, other weights)."""
        mine = self.identity()
        if (recorded["name"], recorded["weights_sha256"]) != (mine["name"], mine["weights_sha256"]):
            raise ValueError(f"{where} was trained with the {recorded['name']} text encoder from "
                             f"{recorded['path'] or 'its package'} (weights sha256 "
                             f"{recorded['weights_sha256'][:12]}...), but {mine['name']} from {mine['path']} "
                             f"(sha256 {mine['weights_sha256'][:12]}...) was loaded; point "
                             f"model.text_encoder_path or $DIFFLAB_CLIP_PATH at the original weights")


def text_encoder_from_config(model_cfg):
    """The frozen encoder that ``model.text_encoder`` names (weights from a package or a local folder)."""
    kwargs = {"max_length": model_cfg.text_max_length}
    if model_cfg.text_encoder == "clip":
        kwargs["path"] = model_cfg.text_encoder_path or None
    return build_text_encoder(model_cfg.text_encoder, **kwargs)


def conditioner_for(cfg, data=None, progress: bool = True, num_classes: int | None = None):
    """The conditioner of a config: text (captions of ``data``), classes, or None (unconditional)."""
    if cfg.model.text_encoder and cfg.data.conditional:
        captions = data.captions if data is not None and data.captions is not None else []
        return TextConditioner(text_encoder_from_config(cfg.model), captions, progress=progress)
    num_classes = num_classes if num_classes is not None else (data.num_classes if data is not None else None)
    return ClassConditioner(num_classes) if num_classes else None
