"""Memory planner: a training step's and a sampling forward's peak memory, predicted before running.

What a training process holds (as ``difflab.train.Trainer`` does, one process, no DDP):

* for the whole run: the weights (fp32, also under bf16/fp16 autocast, which casts per op), the EMA
  copy (``train/ema.py``), AdamW's ``exp_avg`` and ``exp_avg_sq`` (fp32, like the weights) and a
  4-byte ``step`` tensor per parameter tensor. With the gradients that is 4 + 4 + 4 + 8 = 20 bytes
  per parameter: Rajbhandari et al. 2020 (ZeRO, Sec. 3.1) count 16 for mixed-precision Adam with
  fp16 weights and gradients plus fp32 master weights; here the weights are the fp32 master and
  autocast's low-precision copies are transient, so the 4 bytes of fp16 copies become an EMA copy.
* the gradients, from backward until the next step's ``zero_grad(set_to_none=True)``;
* per step: the batch (x0, noise, sigma, the condition), and everything forward and backward
  allocate: the activations autograd saves for backward, the temporaries of each op, autocast's
  low-precision weight copies (cached until the forward ends), and the gradients as they appear.
  With gradient checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost")
  only each U-Net block's inputs are saved and its activations are recomputed block by block in
  backward;
* nothing more in the optimizer step: the fused AdamW (``train.build.adamw``) updates in place.

The weights, EMA, optimizer states, gradients and batch are counted from shapes and dtypes. The
forward/backward is *simulated*: the real network and loss run on fake tensors
(``torch._subclasses.FakeTensorMode``: shapes, dtypes and devices, no data, no memory), under a
``TorchDispatchMode`` that adds up the bytes of every storage an op creates and subtracts them when
the storage is freed (a weakref finalizer on the storage, whose Python object torch keeps exactly as
long as the storage lives). Fake CPU tensors take the same code paths as real ones (autocast, the
SDPA kernel choice, checkpointing's recomputation), so the live-bytes curve is the real one, minus
what kernels allocate internally and never return (oneDNN scratchpads, the CPU flash-attention
kernel's per-thread buffers, cuDNN/cuBLAS workspaces) and minus allocator rounding and caching.

Inference (sampling) holds one set of weights (the EMA model) and, under ``no_grad``, only the
activations alive at once in one denoiser forward at ``eval.batch_size`` rows, doubled under
classifier-free guidance (``ClassifierFreeGuidance`` concatenates the conditional and the null
batch into one forward). The sampler's own state (x, a few earlier predictions) is counted as four
copies of x.

Measurements (to validate the prediction) run real training steps: on CPU the profiler's memory
events (``profile_memory=True``) give the live-bytes curve, on CUDA ``torch.cuda.max_memory_allocated``.
"""
from __future__ import annotations

import copy
import math
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .cond import Cond
from .config import Config
from .train.build import adamw, autocast, build_denoiser, build_unet, data_shape, diffusion_loss

MiB = 2 ** 20
SAMPLER_STATE_COPIES = 4  # x, the denoised estimate and up to two earlier ones (multistep samplers)


class PlanError(ValueError):
    """A planning input is wrong (the message says what was expected)."""


# ------------------------------------------------------------------------------------------ plan types

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
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    head = (f"memory plan on {plan.device}: {plan.parameters:,} parameters, input {plan.shape}, "
            f"train batch {plan.batch_size} (micro-batch {plan.micro_batch}); MiB; * = the config's own setting")
    lines = [head, "  ".join(c.rjust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ live-bytes tracking

class StorageTracker(TorchDispatchMode):
    """Live bytes of the storages that ops create while it is active.

    Each storage is counted once however many views share it, from the op that created it until
    its Python object dies (torch keeps a storage's Python object alive exactly as long as the
    storage); with ``device``, only storages on that device type count (a CUDA plan leaves out
    host copies). Pass what exists before to ``ignore`` (weights, the batch): an in-place op on a weight
    returns the weight, which is not a new allocation, and ignored storages are never counted. The
    tracker holds the ignored tensors, so their storages, keyed by address, are never freed and
    their addresses never reused by an allocation that should count.
    ``history`` records (serial, +/- bytes) so the bytes of chosen storages at the peak can be
    recovered afterwards (the gradients, known only once backward is done).
    """

    def __init__(self, ignore=(), device: str | None = None):
        super().__init__()
        self.device = None if device is None else torch.device(device).type  # None: every device
        self.ignored: set[int] = set()
        self._held: list[Tensor] = []
        self.ignore(ignore)
        self.live: dict[int, tuple[int, int]] = {}  # storage key -> (serial, bytes)
        self.history: list[tuple[int, int]] = []
        self.current = self.peak = self.peak_index = 0
        self.ops: set[str] = set()
        self._serial = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(func.name())
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                self._add(t)
        return out

    def _add(self, t: Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.live or key in self.ignored or (self.device and t.device.type != self.device):
            return
        nbytes = storage.nbytes()
        self._serial += 1
        self.live[key] = (self._serial, nbytes)
        self._move(self._serial, nbytes)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        serial, nbytes = self.live.pop(key)
        self._move(serial, -nbytes)

    def _move(self, serial: int, delta: int) -> None:
        self.history.append((serial, delta))
        self.current += delta
        if self.current > self.peak:
            self.peak, self.peak_index = self.current, len(self.history)

    def ignore(self, tensors) -> None:
        tensors = list(tensors)
        self._held += tensors
        self.ignored |= {_key(t) for t in tensors}

    def serials(self, tensors) -> set[int]:
        """Serials of the tracked storages of ``tensors`` (e.g. the gradients after backward)."""
        return {self.live[_key(t)][0] for t in tensors if _key(t) in self.live}

    def bytes_at_peak(self, serials: set[int]) -> int:
        """Bytes of the storages ``serials`` that were live at the peak."""
        return sum(delta for serial, delta in self.history[:self.peak_index] if serial in serials)


def _key(t: Tensor) -> int:
    return t.untyped_storage()._cdata


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages of ``tensors`` (views and shared storages counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, Tensor):
            seen.setdefault(_key(t), t.untyped_storage().nbytes())
    return sum(seen.values())


# ------------------------------------------------------------------------------------ the network's inputs

class _PlanningConditioner:
    """Stands in for a conditioner in ``build_unet``: the U-Net's kwargs without loading an encoder."""

    def __init__(self, kwargs: dict):
        self.kwargs = kwargs

    def unet_kwargs(self) -> dict:
        return dict(self.kwargs)


def conditioning_kwargs(cfg: Config) -> dict:
    """What the config's conditioner would give the U-Net: text widths, a class count or nothing.

    Text widths are read from the encoder's config.json (no weights are loaded); class counts from
    the dataset's definition (digits: 10; an image folder: its class sub-folders).
    """
    if not cfg.data.conditional:
        return {}
    if cfg.model.text_encoder:
        dim = _text_width(cfg)
        return {"context_dim": dim, "pooled_dim": dim}  # both encoders: tokens and pooled are hidden_size wide
    if cfg.data.dataset == "digits":
        return {"num_classes": 10}
    if cfg.data.dataset == "folder":
        n = _folder_classes(cfg.data.path)
        return {"num_classes": n} if n else {}
    return {}


def _text_folder(cfg: Config) -> Path:
    """The local folder of the config's text encoder (nothing is downloaded or loaded)."""
    name = cfg.model.text_encoder
    if name == "minilm":
        from .text import minilm_path
        return minilm_path()
    if name == "clip":
        from .text import find_clip_folder
        return find_clip_folder(cfg.model.text_encoder_path or None)
    raise PlanError(f"expected model.text_encoder minilm or clip, got {name!r}")


def _text_width(cfg: Config) -> int:
    import json

    name, folder = cfg.model.text_encoder, _text_folder(cfg)
    config = json.loads((Path(folder) / "config.json").read_text())
    config = config.get("text_config", config)  # a full CLIPModel folder nests the text tower's config
    if "hidden_size" not in config:
        raise PlanError(f"expected hidden_size in {folder}/config.json (the {name} text encoder's width)")
    return int(config["hidden_size"])


def _folder_classes(path: str) -> int:
    from .data import IMAGE_SUFFIXES

    root = Path(path)
    if not root.is_dir():
        raise PlanError(f"expected data.path to be an image folder, got {path!r} (not a directory)")
    parents = {p.parent for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES}
    return len(parents - {root})


def _with_checkpointing(cfg: Config, checkpointing: bool) -> Config:
    cfg = copy.deepcopy(cfg)
    cfg.model.checkpointing = checkpointing
    return cfg


def make_net(cfg: Config, checkpointing: bool | None = None):
    """The config's U-Net (random init) with the conditioner's kwargs, on the current default device."""
    if checkpointing is not None:
        cfg = _with_checkpointing(cfg, checkpointing)
    return build_unet(cfg, _PlanningConditioner(conditioning_kwargs(cfg)))


def random_inputs(cfg: Config, batch: int, device="cpu") -> tuple[Tensor, Tensor, Tensor]:
    """(x0, sigma, noise) as the trainer builds them (float32, float64, float32), random values."""
    c, h, w = data_shape(cfg)
    x0 = torch.randn(batch, c, h, w, device=device)
    sigma = torch.empty(batch, dtype=torch.float64, device=device).uniform_(0.01, 10.0)
    noise = torch.randn(batch, c, h, w, device=device)
    return x0, sigma, noise


def random_batch(cfg: Config, batch: int, device="cpu") -> tuple[Tensor, Tensor, Tensor, Cond | None]:
    """(x0, sigma, noise, cond): ``random_inputs`` and a random condition of ``batch`` rows."""
    return (*random_inputs(cfg, batch, device), random_cond(cfg, batch, device))


def random_cond(cfg: Config, batch: int, device="cpu") -> Cond | None:
    """A condition of ``batch`` rows shaped like the conditioner's: labels or text (tokens, mask, pooled)."""
    kwargs = conditioning_kwargs(cfg)
    if "context_dim" in kwargs:
        length = cfg.model.text_max_length
        return Cond(context=torch.randn(batch, length, kwargs["context_dim"], device=device),
                    context_mask=torch.ones(batch, length, dtype=torch.bool, device=device),
                    pooled=torch.randn(batch, kwargs["pooled_dim"], device=device))
    if "num_classes" in kwargs:
        return Cond(labels=torch.randint(0, kwargs["num_classes"] + 1, (batch,), device=device))
    return None


def _cond_tensors(cond: Cond | None) -> list[Tensor]:
    if cond is None:
        return []
    return [t for t in (cond.labels, cond.context, cond.context_mask, cond.pooled) if t is not None]


def _loss(cfg: Config, denoiser, x0, sigma, noise, cond) -> Tensor:
    return diffusion_loss(cfg, denoiser, x0, sigma, noise, cond) / cfg.train.grad_accum


# --------------------------------------------------------------------------------------------- analytic

def parameter_bytes(net) -> int:
    return sum(p.numel() * p.element_size() for p in net.parameters())


def ema_bytes(net) -> int:
    """The EMA model is a deep copy: every parameter and buffer once more."""
    return parameter_bytes(net) + sum(b.numel() * b.element_size() for b in net.buffers())


def optimizer_bytes(net) -> int:
    """AdamW: exp_avg and exp_avg_sq like each parameter, and a float32 ``step`` scalar per tensor."""
    params = list(net.parameters())
    return 2 * parameter_bytes(net) + 4 * len(params)


def batch_bytes(cfg: Config, batch: int, micro: int) -> int:
    """x0 and noise (float32), sigma (float64) of the global batch, and one micro-batch's condition."""
    c, h, w = data_shape(cfg)
    cond = storage_bytes(_cond_tensors(random_cond(cfg, micro, "meta")))
    return 2 * batch * c * h * w * 4 + batch * 8 + cond


def host_extras(cfg: Config) -> dict[str, int]:
    """Host memory a training process holds besides the step (not in the plan's peak, which follows
    the U-Net's device): about the training images (float32 pixels) and the frozen text encoder's
    weights (exact, from its safetensors header). The cached text-embedding table is not known
    before the captions are."""
    d, out = cfg.data, {}
    count = {"digits": round(1797 * (1 - d.holdout)), "shapes": d.scenes}.get(d.dataset)
    if count is None and Path(d.path).is_dir():
        from .data import IMAGE_SUFFIXES
        count = sum(1 for f in Path(d.path).rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
    if count:
        out["training images"] = count * d.channels * d.image_size ** 2 * 4
    if cfg.model.text_encoder and d.conditional:
        nbytes = _text_encoder_bytes(cfg)
        if nbytes:
            out["text encoder"] = nbytes
    return out


def _text_encoder_bytes(cfg: Config) -> int | None:
    """Sum of the text tower's tensors in ``model.safetensors`` (CLIP: ``text_model.*`` only, which is
    all ``CLIPTextModel`` loads); None without a safetensors file."""
    import json
    import struct

    path = Path(_text_folder(cfg)) / "model.safetensors"
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    keep = (lambda k: k.startswith("text_model.")) if cfg.model.text_encoder == "clip" else (lambda k: True)
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
               if k != "__metadata__" and keep(k))


# ------------------------------------------------------------------------------------------- simulation

def _fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

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
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        denoiser = build_denoiser(cfg, net)
    denoiser.schedule = _ShapeOnlySchedule(denoiser.schedule)
    return denoiser


def simulate_training(cfg: Config, micro: int, precision: str, checkpointing: bool, device: str = "cpu") -> dict:
    """Forward + backward of ``min(grad_accum, 2)`` micro-batches on fake tensors.

    Two micro-batches show the accumulation case: the second forward runs while the first one's
    gradients are live. Returns bytes: ``peak`` (everything forward/backward allocated at once,
    gradients included), ``gradients_at_peak``, and the ops seen.
    """
    with _simulating("the training step"), _fake_mode():
        with torch.device(device):
            net = make_net(cfg, checkpointing).train()
        denoiser = _simulation_denoiser(cfg, net)
        tracker = StorageTracker(ignore=list(net.parameters()) + list(net.buffers()))
        for j in range(min(cfg.train.grad_accum, 2)):
            x0, sigma, noise, cond = random_batch(cfg, micro, device)
            tracker.ignore([x0, sigma, noise, *_cond_tensors(cond)])
            with tracker:
                with autocast(device, precision):
                    loss = _loss(cfg, denoiser, x0, sigma, noise, cond)
                loss.backward()
                del loss
        grads = tracker.serials(p.grad for p in net.parameters() if p.grad is not None)
        return {"peak": tracker.peak, "gradients_at_peak": tracker.bytes_at_peak(grads), "ops": tracker.ops}


def sampling_denoiser(cfg: Config, denoiser, device="cpu"):
    """What a sampler calls: the denoiser, wrapped in classifier-free guidance at ``eval.guidance``
    when the model is conditional (as ``difflab.generate`` does), and the null condition."""
    from .guidance import ClassifierFreeGuidance

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
    from .latents import decode_latents

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
    from torch._subclasses.fake_tensor import DataDependentOutputException, UnsupportedOperatorException

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


# ------------------------------------------------------------------------------------------------- plan

def _check_batch(cfg: Config, batch_size: int | None) -> tuple[int, int]:
    batch = cfg.train.batch_size if batch_size is None else batch_size
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise PlanError(f"expected a batch size >= 1, got {batch!r}")
    if batch % cfg.train.grad_accum:
        raise PlanError(f"expected a batch size divisible by train.grad_accum={cfg.train.grad_accum}, got {batch}")
    return batch, batch // cfg.train.grad_accum


def _resolve_device(cfg: Config, device: str | None) -> str:
    name = device or cfg.train.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.device(name).type
    if name not in ("cpu", "cuda"):
        raise PlanError(f"expected device cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise PlanError("expected a CUDA device for device=cuda (its kernels are chosen by the GPU), got none; "
                        "plan with device=cpu")
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


def random_vae(cfg: Config, device="cpu"):
    """A frozen VAE of ``model.vae``'s architecture built on ``device`` (meta and fake tensors too)
    with random weights and scaling factor 1, for planning and measuring (None for a pixel model)."""
    from .latents import build_vae
    from .train.build import vae_config

    if not cfg.model.vae:
        return None
    with torch.device(device):
        vae = build_vae(vae_config(cfg.model.vae)).eval().requires_grad_(False)
    vae.scaling_factor.fill_(1.0)
    return vae


def module_tensors(module) -> list[Tensor]:
    """A module's parameters and buffers ([] for None)."""
    return [] if module is None else [*module.parameters(), *module.buffers()]


def vae_bytes(cfg: Config) -> int:
    """A latent model's VAE weights and buffers (0 for a pixel model)."""
    return storage_bytes(module_tensors(random_vae(cfg, "meta")))


# ---------------------------------------------------------------------------------------------- measuring

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
    torch.manual_seed(seed)
    state = _TrainState(cfg, batch, micro, precision, checkpointing, device)
    state.step()  # warm-up: AdamW's states appear in the first step
    measure = _measure_cuda if device == "cuda" else _measure_cpu
    results = [measure(state) for _ in range(steps)]
    return max(results, key=lambda r: r["peak"])


class _TrainState:
    """The trainer's pieces for one training step on random data (one process, no DDP)."""

    def __init__(self, cfg, batch, micro, precision, checkpointing, device):
        from .train.ema import EMA

        self.cfg, self.batch, self.micro, self.precision, self.device = cfg, batch, micro, precision, device
        self.vae = random_vae(cfg, device)  # a latent model's trainer holds its VAE on the device
        self.net = make_net(cfg, checkpointing).to(device).train()
        self.ema = EMA(self.net)
        self.denoiser = build_denoiser(cfg, self.net)
        self.opt = adamw(self.net, 1e-4)

    def live_tensors(self) -> list[Tensor]:
        """What a step starts with: weights, EMA, optimizer states, the last step's gradients."""
        opt_states = [v for s in self.opt.state.values() for v in s.values() if isinstance(v, Tensor)]
        grads = [p.grad for p in self.net.parameters() if p.grad is not None]
        return [*module_tensors(self.net), *module_tensors(self.ema.model), *opt_states, *grads,
                *module_tensors(self.vae)]

    def step(self, marker=lambda name: nullcontext()) -> None:
        t = self.cfg.train
        with marker("batch"):
            x0, sigma, noise = random_inputs(self.cfg, self.batch, self.device)
            self.opt.zero_grad(set_to_none=True)
        for j in range(t.grad_accum):
            mb = slice(j * self.micro, (j + 1) * self.micro)
            cond = random_cond(self.cfg, self.micro, self.device)
            with marker("forward_backward"):
                with autocast(self.device, self.precision):
                    loss = _loss(self.cfg, self.denoiser, x0[mb], sigma[mb], noise[mb], cond)
                loss.backward()
                del loss
        with marker("optimizer"):
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), t.grad_clip if t.grad_clip > 0 else math.inf)
            self.opt.step()
            self.ema.update(self.net, 0.999)


def _measure_cpu(state: _TrainState) -> dict:
    from torch.profiler import ProfilerActivity, profile, record_function

    # the profiler does not report frees of blocks allocated before it started (it warns "Memory block
    # of unknown size"), so the last step's gradients are freed here rather than in the profiled step
    state.opt.zero_grad(set_to_none=True)
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
    from .generate import generate
    from .latents import decode_latents

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

    def run():
        z = generate(denoiser, data_shape(cfg), samples, cond=cond, null_cond=null, sampler=e.sampler, steps=steps,
                     guidance=e.guidance, guidance_rescale=e.guidance_rescale, seed=seed, batch_size=samples,
                     device=device, progress=False)
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
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            run()
        held = max(b for _, b in _memory_curve(prof)[0])
    return {"peak": start + held, "generate": held, "samples": samples, "batch": inference_batch(cfg)}
