"""Guidance: wrappers that take a Denoiser and return a Denoiser, so they nest and fit any sampler.

Classifier-free guidance (with guidance rescale), Safe Latent Diffusion, classifier guidance (a
noise-aware classifier's gradient, ``difflab.nn.classifier``; trained by
``difflab.train.classifier``), a guidance interval and self-attention guidance.
"""
from __future__ import annotations

import math
from dataclasses import replace


import torch
import torch.nn.functional as F
from torch import Tensor

from .cond import Cond
from .denoisers import DenoiserWrapper
from .nn import AttentionHook, UNet, UNetWrapper, attention_hooks
from .tensors import append_dims, batch_sigma, gaussian_blur


def rescale_guidance(x0_guided: Tensor, x0_cond: Tensor, phi: float) -> Tensor:
    """Guidance rescale (Lin et al. 2024, "Common Diffusion Noise Schedules ...", Eq. 15-16).

    Match each sample's std to the conditional prediction's, then mix with weight ``phi``.
    Applied to x0 predictions (our denoiser output); the paper applies it to a v-prediction
    network's output and diffusers to eps or v, which differ from this by a per-sigma affine map.
    """
    dims = tuple(range(1, x0_guided.ndim))
    rescaled = x0_guided * (x0_cond.std(dims, keepdim=True) / x0_guided.std(dims, keepdim=True))
    return phi * rescaled + (1 - phi) * x0_guided


class ClassifierFreeGuidance(DenoiserWrapper):
    """D = D(x | null) + scale * (D(x | cond) - D(x | null))  (Ho & Salimans 2022, Eq. 6).

    scale 0 is the unconditional model, 1 the conditional one; other scales batch
    the two calls into one forward pass. ``null_cond`` is the unconditional input (the null
    class, the empty prompt) or a negative prompt: batch 1 (expanded) or one row per sample.
    ``rescale`` is the guidance-rescale weight phi (0 = off).
    """

    def __init__(self, denoiser, scale: float, null_cond: Cond, rescale: float = 0.0):
        super().__init__(denoiser)
        self.scale, self.null_cond, self.rescale = float(scale), null_cond, float(rescale)

    def __call__(self, x: Tensor, sigma: Tensor, cond: Cond | None = None) -> Tensor:
        null = self.null_cond.expand(len(x)).to(x.device)
        if cond is None or self.scale == 0:
            return self.denoiser(x, sigma, null)
        if self.scale == 1:
            return self.denoiser(x, sigma, cond)
        sigma = batch_sigma(x, sigma)
        x0_cond, x0_null = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), cond.cat(null)).chunk(2)
        x0 = x0_null + self.scale * (x0_cond - x0_null)
        return rescale_guidance(x0, x0_cond, self.rescale) if self.rescale else x0


class ImagePromptGuidance(DenoiserWrapper):
    """Separate guidance scales for the text and the image prompt of an IP-Adapter model:

        D = D(x | 0, 0) + text_scale (D(x | T, 0) - D(x | 0, 0)) + image_scale (D(x | T, I) - D(x | T, 0))

    InstructPix2Pix's guidance for two conditions (Brooks et al. 2023, Eq. 3), with the text taken
    first; 0 stands for the empty prompt and the zero image embedding (``null_cond``, the null
    condition of classifier-free guidance). With both scales equal it is classifier-free guidance
    of text and image together. The three calls run as one batch."""

    def __init__(self, denoiser, text_scale: float, image_scale: float, null_cond: Cond):
        super().__init__(denoiser)
        self.text_scale, self.image_scale, self.null_cond = float(text_scale), float(image_scale), null_cond

    def __call__(self, x: Tensor, sigma: Tensor, cond: Cond | None = None) -> Tensor:
        if cond is None or cond.image_prompt is None:
            raise ValueError("image guidance needs an image prompt (cond.image_prompt); without one use guidance alone")
        null = self.null_cond.expand(len(x)).to(x.device)
        text_only = replace(cond, image_prompt=torch.zeros_like(cond.image_prompt))
        sigma = batch_sigma(x, sigma)
        full, text, none = self.denoiser(torch.cat([x, x, x]), torch.cat([sigma, sigma, sigma]),
                                         cond.cat(text_only).cat(null)).chunk(3)
        return none + self.text_scale * (text - none) + self.image_scale * (full - text)


class SafeGuidance(DenoiserWrapper):
    """Safe Latent Diffusion concept guidance (Schramowski et al. 2023, Eq. 3-8), in sigma space.

    Classifier-free guidance at ``scale`` whose direction eps_p - eps_u is reduced, element by
    element, by gamma = mu * (eps_S - eps_u) + ``momentum`` * nu wherever the prompt's prediction is
    already close to the unsafe concept's (eps_p - eps_S < ``threshold``), with mu =
    min(``safety_scale`` |eps_p - eps_S|, 1) as in the reference code and diffusers'
    StableDiffusionPipelineSafe, and nu <- ``beta`` nu + (1 - beta) gamma. The safety term starts
    after ``warmup`` noise levels (momentum accumulates from the first). Noise predictions are
    eps = (x - D) / sigma. Defaults are the paper's "medium" setting. Three conditions (prompt,
    null, concept) go through the model in one batched call; no retraining.

    State: a noise level is each new, lower sigma the wrapper is called at; momentum advances once
    per level, so samplers that call the model several times per step (Heun's corrector, churn's
    raised sigma) reuse the level's momentum. ``reset()`` starts a new trajectory (``generate`` calls
    it per batch; call it yourself between trajectories when driving a sampler directly).
    """

    def __init__(self, denoiser, scale: float, null_cond: Cond, concept: Cond, *, safety_scale: float = 1000.0,
                 threshold: float = 0.01, warmup: int = 10, momentum: float = 0.3, beta: float = 0.4):
        super().__init__(denoiser)
        self.scale, self.null_cond, self.concept = float(scale), null_cond, concept
        self.safety_scale, self.threshold, self.warmup = safety_scale, threshold, warmup
        self.momentum, self.beta = momentum, beta
        self.reset()

    def reset(self) -> None:
        self._nu, self._level_sigma, self._levels = None, float("inf"), 0

    def __call__(self, x: Tensor, sigma: Tensor, cond: Cond | None = None) -> Tensor:
        if cond is None:
            raise ValueError("SafeGuidance needs the prompt's Cond")
        n = len(x)
        sigma = batch_sigma(x, sigma)
        if self._nu is None or self._nu.shape != x.shape:
            self.reset()
            self._nu = torch.zeros_like(x)
        new_level = float(sigma.max()) < self._level_sigma
        if new_level:
            self._level_sigma, self._levels, self._nu_before = float(sigma.max()), self._levels + 1, self._nu
        conds = cond.cat(self.null_cond.expand(n).to(x.device)).cat(self.concept.expand(n).to(x.device))
        x0 = self.denoiser(torch.cat([x] * 3), torch.cat([sigma] * 3), conds)
        s = append_dims(sigma, x.ndim).to(x.dtype)
        eps_p, eps_u, eps_s = ((x - d) / s for d in x0.chunk(3))
        mu = (self.safety_scale * (eps_p - eps_s).abs()).clamp(max=1.0)
        mu = torch.where(eps_p - eps_s >= self.threshold, torch.zeros_like(mu), mu)
        gamma = mu * (eps_s - eps_u) + self.momentum * self._nu_before
        if new_level:
            self._nu = self.beta * self._nu_before + (1 - self.beta) * gamma
        direction = eps_p - eps_u - (gamma if self._levels > self.warmup else 0)
        return x - s * (eps_u + self.scale * direction)


class GuidanceInterval(DenoiserWrapper):
    """Use ``guided`` for noise levels in [sigma_lo, sigma_hi] and ``plain`` elsewhere.

    Guidance helps in some band of noise levels and can hurt outside it (Kynkäänniemi et al. 2024,
    "Applying Guidance in a Limited Interval Improves Sample and Distribution Quality"); which
    band is a matter of measurement for each model and kind of guidance. Both are Denoisers over
    the same model.
    """

    def __init__(self, guided, plain, sigma_lo: float = 0.0, sigma_hi: float = float("inf")):
        if not 0 <= sigma_lo < sigma_hi:
            raise ValueError(f"need 0 <= sigma_lo < sigma_hi, got {sigma_lo}, {sigma_hi}")
        super().__init__(plain)  # the schedule is the plain denoiser's
        self.guided, self.plain, self.sigma_lo, self.sigma_hi = guided, plain, sigma_lo, sigma_hi

    def __call__(self, x: Tensor, sigma: Tensor, cond: Cond | None = None) -> Tensor:
        s = float(torch.as_tensor(sigma).max())
        inside = self.sigma_lo <= s <= self.sigma_hi
        return (self.guided if inside else self.plain)(x, sigma, cond)


class ClassifierGuidance(DenoiserWrapper):
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
        super().__init__(denoiser)
        self.classifier, self.scale, self.target = classifier, float(scale), target

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


class _AttentionCapture(AttentionHook):
    """Keeps the attention probabilities of the layer it is installed on."""

    probs_seen: Tensor | None = None

    def probs(self, name: str, probs: Tensor) -> Tensor:
        self.probs_seen = probs
        return probs


def unet_of(denoiser, purpose: str = "self-attention guidance") -> UNet:
    """The U-Net inside a denoiser and the wrappers around it (for attention hooks); under an
    adapter's network (``nn.UNetWrapper``: ControlNet, IP-Adapter) the base U-Net."""
    d = denoiser
    while not isinstance(getattr(d, "net", None), (UNet, UNetWrapper)):
        if not hasattr(d, "denoiser"):
            raise ValueError(f"{purpose} needs a denoiser over a difflab UNet (its attention maps)")
        d = d.denoiser
    net = d.net
    while isinstance(net, UNetWrapper):
        net = net.unet
    return net


class SelfAttentionGuidance(DenoiserWrapper):
    """Self-attention guidance (Hong et al. 2023, "Improving Sample Quality of Diffusion Models Using
    Self-Attention Guidance", ICCV; diffusers' ``StableDiffusionSAGPipeline``).

    The self-attention map of the U-Net's middle block says which pixels the model attends to
    most: the mask is where the head-averaged attention a position receives, summed over the
    queries, exceeds ``threshold`` (1 = the uniform share), upsampled to the input. Inside it the
    estimate x0_hat is Gaussian-blurred (sigma ``blur_sigma``, kernel 9), re-noised with the
    model's own noise estimate, ``x_deg = x0_blur + sigma eps_hat``, and denoised again; the
    guided prediction is ``eps + scale (eps - eps_deg)``, written here in x0 form. Scale 0 is the
    plain denoiser, call for call. Under classifier-free guidance (it wraps the denoiser that
    guidance wraps) both branches are guided; diffusers guides through the unconditional one.
    """

    def __init__(self, denoiser, scale: float = 0.75, layer: str | None = None, blur_sigma: float = 1.0,
                 threshold: float = 1.0):
        super().__init__(denoiser)
        if not math.isfinite(scale):
            raise ValueError(f"SAG scale must be a finite number, got {scale}")
        self.scale, self.blur_sigma, self.threshold = scale, blur_sigma, threshold
        self.unet = unet_of(denoiser)
        layers = [n for n in self.unet.attention_layers() if n.startswith("mid.") and n.endswith(".self")]
        if layer is None and not layers:
            raise ValueError("self-attention guidance needs the U-Net's middle self-attention (model.mid_attn=true)")
        self.layer = layer or layers[0]
        self.coverage: list[float] = []  # the mask's share of the image at each call, for diagnosis

    def mask(self, probs: Tensor, shape) -> Tensor:
        """(B, 1, *S) mask of the positions that receive more than ``threshold`` of attention."""
        received = probs.mean(1).sum(1)  # (B, N): over heads, then over queries
        f = self.unet.downsampling
        grid = [s // f for s in shape[2:]]
        if received.shape[1] != math.prod(grid):
            raise ValueError(f"the attention layer {self.layer} sees {received.shape[1]} positions, not the "
                             f"{'x'.join(map(str, grid))} of the middle block")
        mask = (received > self.threshold).to(probs.dtype).reshape(len(probs), 1, *grid)
        return F.interpolate(mask, size=tuple(shape[2:]), mode="nearest")

    def __call__(self, x: Tensor, sigma: Tensor, cond: Cond | None = None) -> Tensor:
        if self.scale == 0:
            return self.denoiser(x, sigma, cond)
        capture = _AttentionCapture()
        with attention_hooks(self.unet, capture, [self.layer]):
            x0_hat = self.denoiser(x, sigma, cond)
        mask = self.mask(capture.probs_seen, x.shape).to(x0_hat)
        self.coverage.append(float(mask.mean()))
        blurred = gaussian_blur(x0_hat, self.blur_sigma, 9)
        x_degraded = mask * blurred + (1 - mask) * x0_hat + (x - x0_hat)  # x - x0_hat = sigma eps_hat
        x0_degraded = self.denoiser(x_degraded, sigma, cond)
        return x0_hat + self.scale * ((x0_hat - x0_degraded) - (x - x_degraded))
