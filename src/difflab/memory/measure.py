"""Real peaks to check a plan against: training steps through the trainer's own step
(``train.step.training_step``) and sampling through ``difflab.generate``. CPU: the profiler's memory
events; CUDA: ``torch.cuda.max_memory_allocated``."""
from __future__ import annotations

import copy

import torch
from torch import Tensor
from torch.profiler import ProfilerActivity, profile, record_function

from ..config import Config
from ..generate import SamplingSettings, generate
from ..latents import decode_latents
from ..devices import DistInfo
from ..train.build import build_denoiser, data_shape, diffusion_loss
from ..train.step import TrainingParts, no_phase, training_step
from .inputs import PlanError, _cond_tensors, make_net, random_cond, random_inputs, random_vae
from .plan import _check_batch, _resolve_device, inference_batch
from .tracking import module_tensors, storage_bytes


def measure_training_peak(cfg: Config, batch_size: int | None = None, steps: int = 2, *,
                          precision: str | None = None, checkpointing: bool | None = None,
                          device: str | None = None, seed: int = 0) -> dict:
    """Peak bytes of real training steps, as the trainer runs them (AdamW, EMA, autocast, clipping,
    and for a latent model a VAE of ``model.vae``'s architecture held on the device).

    One warm-up step creates the optimizer states and gradients, then ``steps`` steps are measured.
    Returns bytes: ``peak`` (the most live at once, counting everything the step holds: weights,
    EMA, optimizer states, gradients, batch, activations), ``before_forward`` (live when the forward
    starts), ``activations`` (the forward/backward peak minus ``before_forward``: saved activations,
    temporaries and the gradients that exist by then) and ``start`` (live when a step starts).
    CPU: the profiler's allocation events; CUDA: ``torch.cuda.max_memory_allocated``.
    """
    batch, micro = _check_batch(cfg, batch_size)
    if steps < 1:
        raise PlanError(f"expected steps >= 1, got {steps}")
    device = _resolve_device(cfg, device)
    precision = precision or cfg.train.precision
    checkpointing = cfg.model.checkpointing if checkpointing is None else checkpointing
    cfg = copy.deepcopy(cfg)
    cfg.train.precision, cfg.model.checkpointing = precision, checkpointing
    torch.manual_seed(seed)
    state = _TrainState(cfg, batch, micro, device)
    state.step()  # warm-up: AdamW's states appear in the first step
    measure = _measure_cuda if device == "cuda" else _measure_cpu
    results = [measure(state) for _ in range(steps)]
    return max(results, key=lambda r: r["peak"])


class _TrainState:
    """The trainer's parts and its own step (``train.step.training_step``) on random data (one
    process, no DDP); ``cfg`` already carries the precision and checkpointing to measure."""

    def __init__(self, cfg: Config, batch: int, micro: int, device: str):
        self.cfg, self.batch, self.micro, self.device = cfg, batch, micro, device
        self.vae = random_vae(cfg, device)  # a latent model's trainer holds its VAE on the device
        net = make_net(cfg).to(device).train()
        t = cfg.train
        self.parts = TrainingParts.build(net, device, DistInfo(), lr=t.lr, weight_decay=t.weight_decay,
                                         precision=t.precision)
        self.denoiser = build_denoiser(cfg, net)
        self.steps = 0

    def live_tensors(self) -> list[Tensor]:
        """What a step starts with: weights, EMA, optimizer states, the last step's gradients."""
        p = self.parts
        opt_states = [v for s in p.opt.state.values() for v in s.values() if isinstance(v, Tensor)]
        grads = [w.grad for w in p.net.parameters() if w.grad is not None]
        return [*module_tensors(p.net), *module_tensors(p.ema.model), *opt_states, *grads,
                *module_tensors(self.vae)]

    def step(self, marker=no_phase) -> None:
        with marker("batch"):
            x0, sigma, noise = random_inputs(self.cfg, self.batch, self.device)
            conds = [random_cond(self.cfg, self.micro, self.device) for _ in range(self.cfg.train.grad_accum)]

        def loss_of(j: int) -> Tensor:
            mb = slice(j * self.micro, (j + 1) * self.micro)
            return diffusion_loss(self.cfg, self.denoiser, x0[mb], sigma[mb], noise[mb], conds[j])

        training_step(self.parts, loss_of, self.cfg, self.steps, phase=marker)
        self.steps += 1


def _measure_cpu(state: _TrainState) -> dict:
    # the profiler does not report frees of blocks allocated before it started (it warns "Memory block
    # of unknown size"), so the last step's gradients are freed here rather than in the profiled step
    state.parts.opt.zero_grad(set_to_none=True)
    start = storage_bytes(state.live_tensors())
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        state.step(marker=lambda name: record_function(f"difflab::{name}"))
    curve, spans = _memory_curve(prof)
    fb_start, fb_end = spans["difflab::forward_backward"]
    before = _live_at(curve, fb_start)
    fb_peak = max([b for t, b in curve if fb_start <= t <= fb_end] + [before])
    return {"start": start, "peak": start + max([0] + [b for _, b in curve]), "before_forward": start + before,
            "activations": fb_peak - before}


def _memory_curve(prof) -> tuple[list[tuple[int, int]], dict[str, tuple[int, int]]]:
    """(time ns, bytes allocated since the profile started) after each CPU allocation or free, and the
    (first start, last end) of each ``difflab::`` marker."""
    events = prof.profiler.kineto_results.events()
    curve, total, spans = [], 0, {}
    for e in sorted(events, key=lambda e: e.start_ns()):
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU:
            total += e.nbytes()
            curve.append((e.start_ns(), total))
        elif e.name().startswith("difflab::"):
            lo, hi = spans.get(e.name(), (e.start_ns(), e.end_ns()))
            spans[e.name()] = (min(lo, e.start_ns()), max(hi, e.end_ns()))
    if not curve:
        raise RuntimeError("the profiler recorded no CPU memory events; expected profile_memory=True to report them")
    return curve, spans


def _live_at(curve: list[tuple[int, int]], time_ns: int) -> int:
    """Bytes allocated since the start, just before ``time_ns``."""
    before = [b for t, b in curve if t < time_ns]
    return before[-1] if before else 0


def _measure_cuda(state: _TrainState) -> dict:
    """``max_memory_allocated`` of the whole step and of its forward/backward."""
    peaks = {}
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()

    class _Marker:
        def __init__(self, name):
            self.name = name

        def __enter__(self):
            torch.cuda.synchronize()
            if self.name == "forward_backward" and "before_forward" not in peaks:
                peaks["before_forward"] = torch.cuda.memory_allocated()
                peaks["step_so_far"] = torch.cuda.max_memory_allocated()
                torch.cuda.reset_peak_memory_stats()

        def __exit__(self, *exc):
            torch.cuda.synchronize()
            if self.name == "forward_backward":
                peaks["forward_backward"] = torch.cuda.max_memory_allocated()

    state.step(marker=_Marker)
    torch.cuda.synchronize()
    peak = max(peaks["step_so_far"], torch.cuda.max_memory_allocated())
    return {"start": start, "peak": peak, "before_forward": peaks["before_forward"],
            "activations": peaks["forward_backward"] - peaks["before_forward"]}


def measure_inference_peak(cfg: Config, steps: int = 3, device: str | None = None, seed: int = 0) -> dict:
    """Peak bytes of really sampling ``eval.batch_size`` rows for ``steps`` steps of ``eval.sampler``
    through ``difflab.generate`` (classifier-free guidance at ``eval.guidance`` when conditional),
    then, for a latent model, decoding them with a VAE of ``model.vae``'s architecture (random weights).

    Returns ``peak`` (weights, the conditions, and the most ``generate`` and the decode held at
    once) and ``generate`` (that last part: sampler state, the network's activations, the decode).
    """
    if steps < 1:
        raise PlanError(f"expected steps >= 1, got {steps}")
    device = _resolve_device(cfg, device)
    torch.manual_seed(seed)
    samples, e = cfg.eval.batch_size, cfg.eval
    net = make_net(cfg, False).to(device).eval().requires_grad_(False)
    denoiser = build_denoiser(cfg, net)
    cond, null = random_cond(cfg, samples, device), random_cond(cfg, 1, device)
    vae = random_vae(cfg, device)
    start = storage_bytes([*module_tensors(net), *_cond_tensors(cond), *_cond_tensors(null), *module_tensors(vae)])

    guided = {} if null is None else {"guidance": e.guidance, "guidance_rescale": e.guidance_rescale}
    settings = SamplingSettings(sampler=e.sampler, steps=steps, seed=seed, batch_size=samples, **guided)

    def run():
        z = generate(denoiser, data_shape(cfg), samples, settings, cond=cond, null_cond=null, device=device,
                     progress=False)
        if vae is not None:
            decode_latents(vae, z, samples)

    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        held = torch.cuda.max_memory_allocated() - base
    else:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            run()
        held = max(b for _, b in _memory_curve(prof)[0])
    return {"peak": start + held, "generate": held, "samples": samples, "batch": inference_batch(cfg)}
