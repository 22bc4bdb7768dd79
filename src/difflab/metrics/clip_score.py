"""CLIP score and CLIP image features, from a local Hugging Face CLIP folder (never downloads).

CLIP score (Hessel et al., "CLIPScore: A Reference-free Evaluation Metric for Image Captioning",
EMNLP 2021) of an image and its caption is ``w * max(cos(E_img, E_txt), 0)`` on CLIP's projected
embeddings; text-to-image papers use w = 100 as torchmetrics' ``CLIPScore`` does (Hessel et al. use
2.5). torchmetrics clamps the *mean* of ``100 cos`` at 0 instead of each pair; the two agree
whenever no pair has a negative cosine (``clamp="mean"`` gives torchmetrics' number exactly).

Images are preprocessed in torch, batched, exactly as ``CLIPImageProcessor`` does it (resize the
shorter side to ``size`` with antialiased bicubic, centre crop, CLIP mean/std). With
``quantize=True`` (default) the images go through the 8-bit path the processor takes for uint8
input (= saved PNGs, what torchmetrics is normally fed): the [-1, 1] image is rounded to uint8, and
the resize runs horizontally then vertically with rounding and clamping to [0, 255] after each pass
(as PIL and torch's uint8 kernel do). This matches ``CLIPImageProcessor`` on uint8 tensors, and the
PIL processor, to within one 8-bit level on about 1% of the pixels (fixed-point rounding).
``quantize=False`` keeps floats end to end and equals the processor on float input with
``do_rescale=False`` to float precision.

:meth:`CLIPScorer.clip_features` (unnormalised projected image embeddings, as clean-fid's CLIP
extractor) is the extractor for CLIP-FID / FD_CLIP (Kynkäänniemi et al., "The Role of ImageNet
Classes in Fréchet Inception Distance", ICLR 2023): pass it to :func:`~difflab.metrics.gaussian_stats`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..text import _check_captions, _hf_tokenize, _quiet_transformers, find_clip_folder, load_clip_tokenizer
from .inception import _to_uint8

#: PIL resample codes in preprocessor_config.json -> torch interpolation modes we can reproduce
_RESAMPLE = {2: "bilinear", 3: "bicubic"}


def _load_image_processor(folder):
    import transformers  # transformers takes seconds to import: only where a model is loaded
    with _quiet_transformers():
        try:
            return transformers.CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
        except ImportError:  # transformers 5 without torchvision: the PIL backend reads the same file
            return transformers.CLIPImageProcessorPil.from_pretrained(folder, local_files_only=True)


def _pooled(out) -> Tensor:
    # transformers 5 returns a BaseModelOutputWithPooling (projected embeddings in pooler_output)
    # from get_image_features / get_text_features; transformers 4 returned the tensor itself
    return out if torch.is_tensor(out) else out.pooler_output


def _resize_size(h: int, w: int, size) -> tuple[int, int]:
    """Output (H, W) of the processor's resize: shorter side -> ``shortest_edge`` (longer side
    floored, as transformers' ``get_resize_output_image_size``), or a fixed height/width."""
    short_edge = size.get("shortest_edge")
    if short_edge is not None and size.get("longest_edge") is None:
        short, long = min(h, w), max(h, w)
        new_long = int(short_edge * long / short)
        return (short_edge, new_long) if h <= w else (new_long, short_edge)
    if size.get("height") is not None and size.get("width") is not None:
        return size["height"], size["width"]
    raise ValueError(f"unsupported image processor size {dict(size)}; expected shortest_edge or "
                     f"height/width")


def _center_crop(x: Tensor, ch: int, cw: int) -> Tensor:
    """The processor's centre crop, zero-padding first when the crop is larger than the image."""
    h, w = x.shape[-2:]
    if ch > h or cw > w:
        pad_w, pad_h = max(cw - w, 0), max(ch - h, 0)
        x = F.pad(x, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2))
        h, w = x.shape[-2:]
    top, left = int((h - ch) / 2.0), int((w - cw) / 2.0)
    return x[..., top:top + ch, left:left + cw]


class CLIPScorer:
    """CLIPModel + tokenizer + image-processor settings from a local folder (``path`` or
    ``$DIFFLAB_CLIP_PATH``; see :func:`difflab.text.find_clip_folder` for the files it needs).

    Images are (N, 3, H, W) (or (N, 1, H, W), repeated to RGB) floats in [-1, 1], any H, W, or
    uint8 in [0, 255]. ``quantize``: see the module docstring.
    """

    def __init__(self, path=None, device="cpu", quantize: bool = True):
        from transformers import CLIPModel  # transformers takes seconds to import: only where a model is loaded
        self.path = find_clip_folder(path, image_processor=True)
        with _quiet_transformers():
            self.model = CLIPModel.from_pretrained(self.path, local_files_only=True)
        self.model.requires_grad_(False).eval().to(device)
        self.tokenizer = load_clip_tokenizer(self.path)
        self.processor = _load_image_processor(self.path)
        self.quantize = quantize
        self.max_length = self.model.config.text_config.max_position_embeddings
        resample = int(self.processor.resample)
        if resample not in _RESAMPLE:
            raise ValueError(f"{self.path}/preprocessor_config.json: resample={resample} is not "
                             f"supported; expected one of {_RESAMPLE} (PIL codes)")
        self.mode = _RESAMPLE[resample]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _resize(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        if x.shape[-2:] == size:
            return x
        if not self.quantize:
            return F.interpolate(x, size=size, mode=self.mode, antialias=True, align_corners=False)
        # the 8-bit path: separable passes, horizontal first, each rounded and clamped to uint8
        for pass_size in ((x.shape[-2], size[1]), size):
            if x.shape[-2:] != pass_size:
                x = F.interpolate(x, size=pass_size, mode=self.mode, antialias=True, align_corners=False)
                x = x.round().clamp(0, 255)
        return x

    def pixel_values(self, images: Tensor) -> Tensor:
        """The CLIP input (N, 3, S, S) for images, computed like ``CLIPImageProcessor``."""
        u8 = _to_uint8(images)  # validates shape, dtype and the [-1, 1] range
        if self.quantize or images.dtype == torch.uint8:
            x = u8.to(self.device, torch.float32)
        else:
            x = (images.to(self.device, torch.float32).clamp(-1, 1) + 1) * 127.5
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        p = self.processor
        # pixel values stay on the 0..255 scale throughout, so mean and std are scaled by 255 --
        # the processor's own fused rescale-and-normalise
        if p.do_resize:
            x = self._resize(x, _resize_size(*x.shape[-2:], p.size))
        if p.do_center_crop:
            x = _center_crop(x, p.crop_size["height"], p.crop_size["width"])
        if p.do_normalize:
            mean = torch.tensor(p.image_mean, device=x.device).view(1, -1, 1, 1) * 255
            std = torch.tensor(p.image_std, device=x.device).view(1, -1, 1, 1) * 255
            return (x - mean) / std
        return x * p.rescale_factor

    @torch.no_grad()
    def image_features(self, images: Tensor, normalize: bool = False) -> Tensor:
        """Projected CLIP image embeddings (N, E) float32 on the model's device (L2-normalised
        when ``normalize``)."""
        f = _pooled(self.model.get_image_features(pixel_values=self.pixel_values(images)))
        return F.normalize(f, dim=-1) if normalize else f

    @torch.no_grad()
    def text_features(self, captions: Sequence[str], normalize: bool = False) -> Tensor:
        """Projected CLIP text embeddings (N, E); captions longer than the model's context
        (77 tokens for OpenAI CLIP) are truncated with a warning."""
        batch = _hf_tokenize(self.tokenizer, _check_captions(captions), self.max_length,
                             "CLIPScorer").to(self.device)
        f = _pooled(self.model.get_text_features(input_ids=batch["input_ids"],
                                                 attention_mask=batch["attention_mask"]))
        return F.normalize(f, dim=-1) if normalize else f

    def pair_cosines(self, images: Tensor, captions: Sequence[str]) -> Tensor:
        """cos(E_img_i, E_txt_i) per pair, (N,) float32 on the CPU."""
        captions = _check_captions(captions)
        if len(captions) != len(images):
            raise ValueError(f"need one caption per image: {len(images)} images, {len(captions)} captions")
        img = self.image_features(images, normalize=True)
        txt = self.text_features(captions, normalize=True)
        return (img * txt).sum(-1).cpu()

    def pair_scores(self, images: Tensor, captions: Sequence[str]) -> Tensor:
        """CLIP score per pair, ``100 * max(cos, 0)`` (Hessel et al. 2021 with w = 100), (N,)."""
        return 100 * self.pair_cosines(images, captions).clamp(min=0)

    def score(self, images: Tensor, captions: Sequence[str], batch_size: int = 64,
              clamp: str = "pair") -> float:
        """Mean CLIP score over image/caption pairs, in ``batch_size`` chunks.

        ``clamp="pair"``: mean of ``100 max(cos, 0)`` (Hessel et al.); ``clamp="mean"``:
        ``max(mean(100 cos), 0)``, torchmetrics' ``CLIPScore``."""
        if clamp not in ("pair", "mean"):
            raise ValueError(f"clamp must be 'pair' or 'mean', got {clamp!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        captions = _check_captions(captions)
        if len(captions) != len(images):
            raise ValueError(f"need one caption per image: {len(images)} images, {len(captions)} captions")
        cos = torch.cat([self.pair_cosines(images[i:i + batch_size], captions[i:i + batch_size])
                         for i in range(0, len(images), batch_size)]).double()
        if clamp == "pair":
            return float((100 * cos.clamp(min=0)).mean())
        return max(float(100 * cos.mean()), 0.0)

    def clip_features(self, images, batch_size: int = 64) -> Tensor:
        """Unnormalised CLIP image embeddings of a (N, C, H, W) tensor or an iterable of such
        batches, as CPU float64 (N, E) -- the CLIP-FID extractor (use with ``gaussian_stats`` or
        ``StreamingStats``)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        batches = [images] if torch.is_tensor(images) else images
        out = [self.image_features(b[i:i + batch_size]).cpu().double()
               for b in batches for i in range(0, len(b), batch_size)]
        if not out:
            raise ValueError("no images given")
        return torch.cat(out)
