"""The memory plan of a config: analytic static bytes plus the simulated peaks, as a table."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import Config
from ..devices import resolve_device
from ..tables import format_table
from .inputs import (PlanError, _cond_tensors, batch_bytes, conditioning_kwargs, ema_bytes, host_extras, make_net,
                     optimizer_bytes, parameter_bytes, random_batch, random_cond, vae_bytes)
from .simulate import _missing_meta_kernels, simulate_decode, simulate_inference, simulate_training
from ..train.build import data_shape
from .tracking import storage_bytes


MiB = 2 ** 20


SAMPLER_STATE_COPIES = 4  # x, the denoised estimate and up to two earlier ones (multistep samplers)


@dataclass
class TrainingEstimate:
    """Bytes of one training configuration; ``peak`` = static + max(forward/backward, optimizer step)."""
    precision: str
    checkpointing: bool
    weights: int
    ema: int
    gradients: int
    optimizer: int
    batch: int
    activations: int     # at the forward/backward peak: saved activations + temporaries, not the gradients
    fwd_bwd_peak: int    # the most that forward + backward have allocated at once (gradients included)
    configured: bool = False  # the config's own precision and checkpointing
    vae: int = 0         # a latent model's frozen VAE, on the device for the sample grids

    @property
    def static(self) -> int:
        """What is live before the forward starts (the previous step's gradients are already freed)."""
        return self.weights + self.vae + self.ema + self.optimizer + self.batch

    @property
    def peak(self) -> int:
        return self.static + max(self.fwd_bwd_peak, self.gradients)


@dataclass
class InferenceEstimate:
    """Bytes of sampling ``samples`` rows at a time; ``batch`` rows per network forward (doubled by
    classifier-free guidance). A latent model then decodes them: sampling and decoding take turns."""
    samples: int
    batch: int
    weights: int
    inputs: int       # the condition and null condition, and the sampler's state (copies of x)
    activations: int  # the most one guided no_grad denoiser call holds at once
    vae: int = 0      # a latent model's VAE weights
    decode: int = 0   # the most decoding the samples' latents holds at once (the images included)

    @property
    def peak(self) -> int:
        return self.weights + self.vae + self.inputs + max(self.activations, self.decode)


@dataclass
class MemoryPlan:
    """Predicted memory of a config: several training variants and one inference setting."""
    shape: tuple[int, int, int]
    batch_size: int
    micro_batch: int
    parameters: int
    device: str
    training: list[TrainingEstimate]
    inference: InferenceEstimate
    notes: list[str] = field(default_factory=list)

    def configured(self) -> TrainingEstimate:
        """The estimate for the config's own precision and checkpointing."""
        return next(t for t in self.training if t.configured)

    def rows(self) -> list[dict]:
        """One dict per training variant and one for inference, sizes in MiB."""
        rows = [{"phase": "train" + (" *" if t.configured else ""), "precision": t.precision,
                 "checkpointing": "on" if t.checkpointing else "off", "batch": self.batch_size,
                 "weights": t.weights, "vae": t.vae, "ema": t.ema, "gradients": t.gradients,
                 "optimizer": t.optimizer, "data": t.batch, "activations": t.activations, "decode": 0,
                 "peak": t.peak} for t in self.training]
        i = self.inference
        doubled = f" x{i.batch // i.samples}" if i.batch != i.samples else ""  # guidance's cond + null rows
        rows.append({"phase": "sample", "precision": "fp32", "checkpointing": "-", "batch": f"{i.samples}{doubled}",
                     "weights": i.weights, "vae": i.vae, "ema": 0, "gradients": 0, "optimizer": 0,
                     "data": i.inputs, "activations": i.activations, "decode": i.decode, "peak": i.peak})
        return rows


BYTE_COLUMNS = ("weights", "vae", "ema", "gradients", "optimizer", "data", "activations", "decode", "peak")


def format_plan(plan: MemoryPlan) -> str:
    """The plan as a text table (MiB), with a header line and the notes."""
    rows = plan.rows()
    columns = ["phase", "precision", "checkpointing", "batch",
               *(c for c in BYTE_COLUMNS if c not in ("vae", "decode") or any(r[c] for r in rows))]
    cells = [[f"{r[c] / MiB:.1f}" if c in BYTE_COLUMNS else str(r[c]) for c in columns] for r in rows]
    head = (f"memory plan on {plan.device}: {plan.parameters:,} parameters, input {plan.shape}, "
            f"train batch {plan.batch_size} (micro-batch {plan.micro_batch}); MiB; * = the config's own setting")
    return "\n".join([head, format_table([columns, *cells], align="right"), *(f"note: {n}" for n in plan.notes)])


def _check_batch(cfg: Config, batch_size: int | None) -> tuple[int, int]:
    batch = cfg.train.batch_size if batch_size is None else batch_size
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise PlanError(f"expected a batch size >= 1, got {batch!r}")
    if batch % cfg.train.grad_accum:
        raise PlanError(f"expected a batch size divisible by train.grad_accum={cfg.train.grad_accum}, got {batch}")
    return batch, batch // cfg.train.grad_accum


def _resolve_device(cfg: Config, device: str | None) -> str:
    asked = str(device or cfg.train.device)
    if asked.startswith("cuda") and not torch.cuda.is_available():
        raise PlanError(f"expected a CUDA device for device={asked} (its kernels are chosen by the GPU), got none; "
                        "plan with device=cpu")
    try:
        name = resolve_device(asked).type
    except ValueError as err:
        raise PlanError(str(err)) from None
    if name not in ("cpu", "cuda"):
        raise PlanError(f"expected device cpu or cuda, got {name!r}")
    return name


def _precisions(cfg: Config, device: str) -> list[str]:
    """fp32 and bf16 always, the config's own if it is another (fp16: CUDA only)."""
    own = cfg.train.precision
    if own == "fp16" and device != "cuda":
        raise PlanError("expected train.precision fp32 or bf16 on the CPU, got fp16 (it needs CUDA)")
    return ["fp32", "bf16"] + ([own] if own not in ("fp32", "bf16") else [])


def estimate_training(cfg: Config, batch: int, micro: int, precision: str, checkpointing: bool,
                      device: str = "cpu") -> tuple[TrainingEstimate, set[str]]:
    """One training variant: analytic static bytes plus the simulated forward/backward."""
    with torch.device("meta"):
        net = make_net(cfg, checkpointing)
    sim = simulate_training(cfg, micro, precision, checkpointing, device)
    est = TrainingEstimate(
        precision=precision, checkpointing=checkpointing, weights=parameter_bytes(net), ema=ema_bytes(net),
        gradients=parameter_bytes(net), optimizer=optimizer_bytes(net), batch=batch_bytes(cfg, batch, micro),
        activations=sim["peak"] - sim["gradients_at_peak"], fwd_bwd_peak=sim["peak"],
        configured=(precision, checkpointing) == (cfg.train.precision, cfg.model.checkpointing), vae=vae_bytes(cfg))
    return est, sim["ops"]


def inference_batch(cfg: Config) -> int:
    """Rows per network forward: eval.batch_size, doubled when classifier-free guidance batches the
    conditional and the null rows together (a conditional model at a guidance other than 0 or 1)."""
    guided = bool(conditioning_kwargs(cfg)) and cfg.eval.guidance not in (0.0, 1.0)
    return cfg.eval.batch_size * (2 if guided else 1)


def estimate_inference(cfg: Config, device: str = "cpu") -> tuple[InferenceEstimate, set[str]]:
    """Sampling ``eval.batch_size`` rows: EMA weights, inputs, and one simulated guided call."""
    samples = cfg.eval.batch_size
    if samples < 1:
        raise PlanError(f"expected eval.batch_size >= 1, got {samples}")
    with torch.device("meta"):
        net = make_net(cfg, False)
        x, _, _, cond = random_batch(cfg, samples, "meta")
        null = random_cond(cfg, 1, "meta")
    sim = simulate_inference(cfg, samples, device)
    decode = simulate_decode(cfg, samples, device) if cfg.model.vae else {"peak": 0, "ops": set()}
    inputs = SAMPLER_STATE_COPIES * storage_bytes([x]) + storage_bytes([*_cond_tensors(cond), *_cond_tensors(null)])
    est = InferenceEstimate(samples=samples, batch=inference_batch(cfg), weights=ema_bytes(net), inputs=inputs,
                            activations=sim["peak"], vae=vae_bytes(cfg), decode=decode["peak"])
    return est, sim["ops"] | decode["ops"]


def plan(cfg: Config, batch_size: int | None = None, device: str | None = None) -> MemoryPlan:
    """Predicted training and sampling memory of ``cfg`` without running it on real memory.

    Training at ``batch_size`` (default ``train.batch_size``; the global batch, split into
    ``train.grad_accum`` micro-batches) for fp32 and bf16 autocast (and the config's own precision),
    each with gradient checkpointing off and on; sampling at ``eval.batch_size``. ``device``:
    cpu or cuda (default: ``train.device``); kernels, and so temporaries, differ between them.
    """
    batch, micro = _check_batch(cfg, batch_size)
    device = _resolve_device(cfg, device)
    training, ops = [], set()
    for precision in _precisions(cfg, device):
        for checkpointing in (False, True):
            est, seen = estimate_training(cfg, batch, micro, precision, checkpointing, device)
            training.append(est)
            ops |= seen
    inference, seen = estimate_inference(cfg, device)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in make_net(cfg).parameters())
    notes = ["activations = what forward/backward hold at their peak besides the gradients; kernel workspaces "
             "(oneDNN reorders, flash-attention buffers, cuDNN/cuBLAS) and allocator overhead are not seen",
             "one process: under DDP each rank plans batch / world_size, plus DDP's gradient buckets"]
    extras = [f"{name} {nbytes / MiB:.1f} MiB" for name, nbytes in host_extras(cfg).items()]
    if cfg.model.text_encoder and cfg.data.conditional:
        extras.append("the text-embedding table")
    if extras:
        notes.append(f"also in host memory, not in the peaks: {', '.join(extras)}")
    if cfg.model.vae:
        notes.append("a latent model samples a batch, then decodes it: the sample row's peak counts the larger "
                     "of its activations and its decode")
    missing = _missing_meta_kernels(ops | seen)
    if missing:
        notes.append(f"no meta kernel for {', '.join(missing)}: simulated through FakeTensorMode's fallback "
                     "(the real kernel on zeros), so their outputs are counted but their workspaces not")
    return MemoryPlan(shape=data_shape(cfg), batch_size=batch, micro_batch=micro, parameters=n_params,
                      device=device, training=training, inference=inference, notes=notes)
