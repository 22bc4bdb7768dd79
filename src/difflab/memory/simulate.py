"""The training step's forward/backward, a sampling forward and a VAE decode, run on fake tensors
(``FakeTensorMode``: shapes, dtypes and devices, no data) under a :class:`StorageTracker`."""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import (DataDependentOutputException, FakeTensorMode,
                                           UnsupportedOperatorException, unset_fake_temporarily)

from ..config import Config
from ..devices import DistInfo
from ..guidance import ClassifierFreeGuidance
from ..latents import decode_latents
from ..train.build import build_denoiser, data_shape, diffusion_loss
from ..train.step import TrainingParts, accumulate_gradients
from .inputs import PlanError, _cond_tensors, make_net, random_batch, random_cond, random_vae
from .tracking import StorageTracker, module_tensors


def _fake_mode():
    # real constants (schedule tables) may meet fake tensors: they are turned fake, not refused
    return FakeTensorMode(allow_non_fake_inputs=True)


class _ShapeOnlySchedule:
    """A schedule whose ``c_noise`` gives the right shape and dtype but no values: discrete schedules
    interpolate their time on the host (numpy), which fake tensors cannot do, and a simulation needs
    no values. Its (B,) float64 output is a few bytes either way."""

    def __init__(self, schedule):
        self.schedule = schedule

    def c_noise(self, sigma: Tensor) -> Tensor:
        return torch.zeros_like(sigma, dtype=torch.float64)

    def __getattr__(self, name):
        return getattr(self.schedule, name)


def _simulation_denoiser(cfg: Config, net):
    """``build_denoiser`` built with real tensors (a schedule checks its tables' values when built,
    which fake tensors do not have), with a shape-only ``c_noise``."""
    with unset_fake_temporarily():
        denoiser = build_denoiser(cfg, net)
    denoiser.schedule = _ShapeOnlySchedule(denoiser.schedule)
    return denoiser


def simulate_training(cfg: Config, micro: int, precision: str, checkpointing: bool, device: str = "cpu") -> dict:
    """The training step's forward + backward (``train.step.accumulate_gradients``, the trainer's own)
    of ``min(grad_accum, 2)`` micro-batches on fake tensors.

    Two micro-batches show the accumulation case: the second forward runs while the first one's
    gradients are live. Returns bytes: ``peak`` (everything forward/backward allocated at once,
    gradients included), ``gradients_at_peak``, and the ops seen.
    """
    with _simulating("the training step"), _fake_mode():
        with torch.device(device):
            net = make_net(cfg, checkpointing).train()
        denoiser = _simulation_denoiser(cfg, net)
        tracker = StorageTracker(ignore=list(net.parameters()) + list(net.buffers()))
        batches = [random_batch(cfg, micro, device) for _ in range(min(cfg.train.grad_accum, 2))]
        tracker.ignore([t for x0, sigma, noise, cond in batches for t in (x0, sigma, noise, *_cond_tensors(cond))])
        # forward/backward touch only the network, the (disabled) gradient scaler and the device
        parts = TrainingParts(net, net, None, torch.amp.GradScaler("cuda", enabled=False), None,
                              torch.device(device), DistInfo())
        accumulate_gradients(parts, lambda j: diffusion_loss(cfg, denoiser, *batches[j]), len(batches), precision,
                             phase=lambda name: tracker if name == "forward_backward" else nullcontext())
        grads = tracker.serials(p.grad for p in net.parameters() if p.grad is not None)
        return {"peak": tracker.peak, "gradients_at_peak": tracker.bytes_at_peak(grads), "ops": tracker.ops}


def sampling_denoiser(cfg: Config, denoiser, device="cpu"):
    """What a sampler calls: the denoiser, wrapped in classifier-free guidance at ``eval.guidance``
    when the model is conditional (as ``difflab.generate`` does), and the null condition."""
    null = random_cond(cfg, 1, device)
    if null is None:
        return denoiser, None
    return ClassifierFreeGuidance(denoiser, cfg.eval.guidance, null, rescale=cfg.eval.guidance_rescale), null


def simulate_inference(cfg: Config, samples: int, device: str = "cpu") -> dict:
    """One guided no_grad denoiser call for ``samples`` rows on fake tensors: the most it holds at once
    (with guidance the doubled batch, the concatenated inputs and the combination included)."""
    with _simulating("the sampling forward"), _fake_mode():
        with torch.device(device):
            net = make_net(cfg, False).eval().requires_grad_(False)
        model, null = sampling_denoiser(cfg, _simulation_denoiser(cfg, net), device)
        x, sigma, _, cond = random_batch(cfg, samples, device)
        tracker = StorageTracker(ignore=[*module_tensors(net), x, sigma, *_cond_tensors(cond), *_cond_tensors(null)])
        with tracker, torch.no_grad():
            out = model(x, sigma, cond)
            del out
        return {"peak": tracker.peak, "ops": tracker.ops}


def simulate_decode(cfg: Config, samples: int, device: str = "cpu") -> dict:
    """``decode_latents`` of ``samples`` latent rows in one slice (the pipeline decodes in the batches
    it sampled) by a VAE of ``model.vae``'s architecture, no_grad, on fake tensors: the most it holds
    on ``device`` at once, the decoded images included."""
    with _simulating("the VAE decode"), _fake_mode():
        vae, z = random_vae(cfg, device), torch.zeros(samples, *data_shape(cfg), device=device)
        vae._checked_scaling = lambda: vae.scaling_factor  # from_latent's finiteness check needs a value
        tracker = StorageTracker(ignore=[*module_tensors(vae), z], device=device)
        with tracker:
            images = decode_latents(vae, z, samples)
            del images
        return {"peak": tracker.peak, "ops": tracker.ops}


@contextmanager
def _simulating(what: str):
    """Turn a fake-tensor failure (an op fake tensors cannot run, a value the model needs) into a PlanError."""
    try:
        yield
    except (DataDependentOutputException, UnsupportedOperatorException, NotImplementedError) as err:
        raise PlanError(f"could not simulate {what} on fake tensors ({type(err).__name__}: {err}); expected "
                        "every op to have a meta kernel and no data-dependent Python control flow; "
                        "measure_training_peak / measure_inference_peak run it for real instead") from err


def _missing_meta_kernels(ops: set[str]) -> list[str]:
    """Ops without a Meta kernel: FakeTensorMode ran them through a fallback (real kernel on zeros)."""
    missing = []
    for name in sorted(ops):
        try:
            # "computed": a Meta kernel of its own or one of the composite kernels that serve Meta
            has = torch._C._dispatch_has_computed_kernel_for_dispatch_key(name, "Meta")
        except RuntimeError:
            has = True  # not a registered aten op name: nothing to say
        if not has:
            missing.append(name)
    return missing
