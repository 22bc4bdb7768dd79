"""The editing methods on a loaded model (``difflab.load(run)``), pixel or latent.

For a latent model the image is encoded by the run's VAE, the mask min-pooled to the latent grid,
and after decoding the known pixels are put back exactly (``feather`` blends the seam outwards).
"""
from __future__ import annotations

from dataclasses import fields, replace

import torch
from torch import Tensor

from ..cond import Cond
from ..generate import NonFiniteSample, generate, guided, model_device
from ..guidance import unet_of
from ..seeds import derive_seed
from .img2img import FromState, Img2Img
from .inpaint import Inpaint
from .inversion import NullTextReconstruction, StepNullGuidance, invert, null_text_invert
from .masks import check_image, check_mask, composite, feathered, inpainting_input, latent_mask
from .outpaint import OUTPAINT_METHODS, WindowedDenoiser, windows
from .prompt2prompt import PromptEdit, PromptToPrompt, token_map


def _batch(pipe, image: Tensor, n: int | None) -> tuple[Tensor, int]:
    image = check_image(image, pipe.shape)
    n = len(image) if n is None else n
    if len(image) not in (1, n):
        raise ValueError(f"expected 1 image or one per sample ({n}), got {len(image)}")
    return image.expand(n, *image.shape[1:]), n


METHODS = ("replace", "repaint", "model")


def inpaint(pipe, image: Tensor, mask: Tensor, prompt=None, *, n: int | None = None, labels=None,
            method: str = "replace", jump_length: int = 10, resamplings: int = 10, feather: int = 0,
            progress: bool = True, **sampling) -> Tensor:
    """``n`` completions of ``image`` (1 or n images, (C, H, W) or (N, C, H, W) in [-1, 1]) where
    ``mask`` (1 = keep) is 0. Sampling settings, labels and prompts as for ``pipe(...)``. Known
    pixels are returned exactly.

    ``method``: ``replace`` or ``repaint`` (any model), or ``model``: an inpainting model
    (``model.inpainting``) conditioned on the masked image alone. An inpainting model is given the
    masked image and the mask with ``replace`` and ``repaint`` too."""
    if method not in METHODS:
        raise ValueError(f"unknown inpainting method {method!r}; expected one of {', '.join(METHODS)}")
    if method == "model" and not pipe.cfg.model.inpainting:
        raise ValueError("method 'model' needs an inpainting model (trained with model.inpainting=true)")
    image, n = _batch(pipe, image, n)
    mask = check_mask(mask, image)
    known = pipe.encode(image)
    known_mask = mask if pipe.vae is None else latent_mask(mask, known.shape[2:])
    model, cond, null, s = pipe.sampling_parts(prompt, n, labels, **sampling)
    if pipe.cfg.model.inpainting:  # both branches of guidance see the known image
        given = inpainting_input(known, known_mask)
        cond = replace(cond or Cond(), image=given)
        null = None if null is None else replace(null.expand(n), image=given)
    edit = None if method == "model" else Inpaint(known, known_mask, method, jump_length, resamplings)
    x = generate(model, pipe.latent_shape, n, s, cond=cond, null_cond=null, progress=progress, edit=edit)
    out = pipe.decode(x, s.batch_size).clamp(-1, 1)
    return composite(image, out, feathered(mask, feather))


def outpaint(pipe, image: Tensor, prompt=None, *, size: tuple[int, int], offset: tuple[int, int] = (0, 0),
             method: str = "fused", stride: int | None = None, n: int | None = None, labels=None,
             inpaint_method: str = "replace", progress: bool = True, **sampling) -> Tensor:
    """``image`` (the model's size) at ``offset`` (top, left) of a canvas of ``size`` (H, W), the rest
    generated over windows of the model's size every ``stride`` pixels (half a window by default):
    ``fused`` (MultiDiffusion) or ``iterative`` (window after window); see ``editing.outpaint``.
    The known pixels are returned exactly."""
    if method not in OUTPAINT_METHODS:
        raise ValueError(f"unknown outpainting method {method!r}; expected one of {', '.join(OUTPAINT_METHODS)}")
    image, n = _batch(pipe, image, n)
    canvas, mask = _canvas(image, size, offset)
    window = tuple(pipe.shape[1:])
    stride = window[0] // 2 if stride is None else stride
    spans = windows(tuple(size), window, (stride, stride))  # checks the canvas and the stride
    s = pipe.settings(sampling.pop("settings", None), **sampling)
    if method == "iterative":
        for i, (r, c) in enumerate(spans):
            if mask[..., r, c].all():
                continue
            done = inpaint(pipe, canvas[..., r, c], mask[:1, :, r, c], prompt, n=n, labels=labels, method=inpaint_method,
                           settings=replace(s, seed=derive_seed(s.seed, i)), progress=progress)
            canvas[..., r, c], mask[..., r, c] = done, 1
        return canvas
    known = pipe.encode(canvas)
    f = canvas.shape[-1] // known.shape[-1]
    known_mask = mask if pipe.vae is None else latent_mask(mask, known.shape[2:])
    model, cond, null, s = pipe.sampling_parts(prompt, n, labels, s)
    windowed = WindowedDenoiser(model, pipe.latent_shape[1:], (stride // f, stride // f))
    edit = Inpaint(known, known_mask, inpaint_method)
    x = generate(windowed, known.shape[1:], n, s, cond=cond, null_cond=null, progress=progress, edit=edit)
    return composite(canvas, pipe.decode(x, s.batch_size).clamp(-1, 1), mask)


def _canvas(image: Tensor, size, offset) -> tuple[Tensor, Tensor]:
    """The canvas (unknown pixels at -1) and its mask (1 where the image lies)."""
    (h, w), (top, left) = size, offset
    ih, iw = image.shape[2:]
    if not (0 <= top and 0 <= left and top + ih <= h and left + iw <= w):
        raise ValueError(f"an {ih}x{iw} image at offset ({top}, {left}) does not fit a {h}x{w} canvas")
    canvas = -torch.ones(len(image), image.shape[1], h, w)
    mask = torch.zeros(len(image), 1, h, w)
    canvas[..., top:top + ih, left:left + iw], mask[..., top:top + ih, left:left + iw] = image, 1
    return canvas, mask


def img2img(pipe, image: Tensor, prompt=None, *, strength: float = 0.6, n: int | None = None, labels=None,
            progress: bool = True, **sampling) -> Tensor:
    """SDEdit: ``image`` noised to the ``strength`` point of the sampler's grid and sampled down with
    the condition; strength 0 returns the image itself, 1 ignores it."""
    image, n = _batch(pipe, image, n)
    if strength == 0:
        Img2Img(image, strength)  # the range check
        return image.clone()
    return pipe(prompt, n, labels, edit=Img2Img(pipe.encode(image), strength), progress=progress, **sampling)


def _inversion_parts(pipe, image: Tensor, prompt, labels, sampling: dict):
    """(x0 on the model's device, cond, null, settings, sigmas, unguided denoiser) for inverting ``image``."""
    image, n = _batch(pipe, image, None)
    model, cond, null, s = pipe.sampling_parts(prompt, n, labels, **sampling)
    if s.options.get("eta", 0) != 0:
        raise ValueError(f"inversion is deterministic: it takes no eta (got eta={s.options['eta']})")
    device = model_device(pipe.denoiser)
    cond = None if cond is None else cond.to(device)
    null = None if null is None else null.to(device)
    sigmas = pipe.denoiser.schedule.sigmas(s.steps, s.spacing)
    return pipe.encode(image).to(device), cond, null, s, sigmas, model


def _checked(x: Tensor) -> Tensor:
    if not torch.isfinite(x).all():
        raise NonFiniteSample("inversion produced NaN or infinite values: the weights or settings are not sound")
    return x.float().cpu()


def invert_image(pipe, image: Tensor, prompt=None, *, labels=None, progress: bool = True, **sampling) -> Tensor:
    """The noise at sigma_max that the settings' deterministic sampler (``ddim``, ``euler``, ``heun``
    or ``dpmpp_2m``) maps back to ``image``: DDIM inversion with the same condition and guidance as
    the reconstruction."""
    x0, cond, null, s, sigmas, model = _inversion_parts(pipe, image, prompt, labels, sampling)
    model = guided(model, s, null)  # as the reconstruction samples: the same guidance, SAG included
    return _checked(invert(model, x0, sigmas, cond, solver=s.sampler, progress=progress))


def invert_null_text(pipe, image: Tensor, prompt: str, *, inner_steps: int = 10, lr: float = 1e-2,
                     progress: bool = True, **sampling) -> tuple[Tensor, list[Cond]]:
    """Null-text inversion (``editing.inversion.null_text_invert``) of ``image`` under ``prompt`` at
    the settings' guidance: the noise at sigma_max and one null condition per step, with which
    ``reconstruct(..., nulls=...)`` (same settings) gives back about ``image``."""
    if not pipe.is_text:
        raise ValueError("null-text inversion optimises the null text embedding: it needs a text-conditional model")
    x0, cond, null, s, sigmas, model = _inversion_parts(pipe, image, prompt, None, sampling)
    noise, nulls = null_text_invert(guided(model, s, None), x0, sigmas, cond, null, s.guidance, s.sampler,
                                    rescale=s.guidance_rescale or 0.0, inner_steps=inner_steps, lr=lr,
                                    progress=progress)
    return _checked(noise), [null.to("cpu") for null in nulls]


def reconstruct(pipe, noise: Tensor, prompt=None, *, labels=None, nulls: list[Cond] | None = None,
                progress: bool = True, **sampling) -> Tensor:
    """Images sampled down from given states at sigma_max (an ``invert_image`` result, or with
    ``nulls`` an ``invert_null_text`` one, guided with its per-step null conditions)."""
    if nulls is None:
        return pipe(prompt, len(noise), labels, edit=FromState(noise), progress=progress, **sampling)
    model, cond, _, s = pipe.sampling_parts(prompt, len(noise), labels, **sampling)
    edit = NullTextReconstruction(noise, nulls, s.guidance, s.guidance_rescale or 0.0)
    x = generate(model, pipe.latent_shape, len(noise), _unguided(s), cond=cond, progress=progress, edit=edit)
    return pipe.decode(x, s.batch_size).clamp(-1, 1)


def _unguided(s):
    """``s`` for a denoiser whose guidance the edit builds itself."""
    return replace(s, guidance=None, guidance_rescale=None)


PROMPT_EDIT_OPTIONS = tuple(f.name for f in fields(PromptEdit) if f.name not in ("source", "target"))


def edit_prompt(pipe, source: str, target: str, *, n: int | None = None, image: Tensor | None = None,
                null_text: bool = True, progress: bool = True, **options) -> tuple[Tensor, Tensor]:
    """Prompt-to-prompt (``editing.prompt2prompt``): (source images, edited images), each (n, C, H, W).

    From noise, sample k of the source is what ``pipe(source, seed=...)`` gives for sample k. With
    ``image`` (1 or n images) the start is its inversion under ``source``: null-text inversion
    when guided (guidance > 1) and ``null_text``, else DDIM inversion. ``options``: the
    ``PromptEdit`` fields (``mode``, ``cross_steps``, ``self_steps``, ``reweight``, ``blend``, ...)
    and the sampling settings; the batch size is rounded down to an even number (pairs)."""
    if not pipe.is_text:
        raise ValueError("prompt-to-prompt edits the prompt: it needs a text-conditional model")
    edit = PromptEdit(source, target, **{k: options.pop(k) for k in PROMPT_EDIT_OPTIONS if k in options})
    s = pipe.settings(options.pop("settings", None), **options)
    start, nulls = None, None
    if image is not None:
        if null_text and (s.guidance or 1.0) > 1:
            start, nulls = invert_null_text(pipe, image, source, settings=s, progress=progress)
        else:
            start = invert_image(pipe, image, source, settings=s, progress=progress)
        n = len(start)
    n = 1 if n is None else n
    s = replace(s, batch_size=max(2, s.batch_size - s.batch_size % 2))
    model, cond, null, s = pipe.sampling_parts([source, target] * n, 2 * n, None, s)
    tokens = token_map(edit, *_words_and_lengths(pipe, cond, source, target))
    guide = None
    if nulls is not None:
        guide = _pair_nulls(nulls, s, pipe.denoiser.schedule.sigmas(s.steps, s.spacing))
        null, s = None, _unguided(s)
    p2p = PromptToPrompt(unet_of(pipe.denoiser, "prompt-to-prompt"), edit, tokens, start, guide)
    x = generate(model, pipe.latent_shape, 2 * n, s, cond=cond, null_cond=null, progress=progress, edit=p2p)
    images = pipe.decode(x, s.batch_size).clamp(-1, 1)
    return images[0::2], images[1::2]


def _words_and_lengths(pipe, cond: Cond, source: str, target: str):
    """Each prompt's (word, token positions) and token count, for ``token_map``."""
    encoder = pipe.conditioner.encoder
    if not hasattr(encoder, "word_positions"):
        raise ValueError(f"prompt-to-prompt needs the text encoder's word positions; {type(encoder).__name__} "
                         "has no word_positions")
    lengths = cond.context_mask[:2].sum(1).tolist()
    return encoder.word_positions(source), encoder.word_positions(target), int(lengths[0]), int(lengths[1])


def _pair_nulls(nulls: list[Cond], s, sigmas: Tensor):
    """rows -> guidance with null-text inversion's per-step nulls, each pair's row for both its rows."""
    def guide(model, rows):
        pairs = torch.arange(rows.start // 2, (rows.stop + 1) // 2).repeat_interleave(2)
        return StepNullGuidance(model, s.guidance, [null[pairs] for null in nulls], sigmas, s.guidance_rescale or 0.0)
    return guide


__all__ = ["METHODS", "PROMPT_EDIT_OPTIONS", "edit_prompt", "img2img", "inpaint", "invert_image", "invert_null_text",
           "outpaint", "reconstruct"]
