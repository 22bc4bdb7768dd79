"""What a training process holds, without running it: the config's network (random init, any device,
meta included), random batches and conditions shaped like the real ones, and the bytes of weights,
EMA, optimizer states, batch, VAE and host-side extras counted from shapes and dtypes."""
from __future__ import annotations

import copy
import json
import struct
from pathlib import Path

import torch
from torch import Tensor

from .. import runs
from ..cond import Cond
from ..config import Config
from ..data import IMAGE_SUFFIXES
from ..latents import build_vae
from ..text import find_clip_folder, minilm_path
from ..train.build import build_unet, data_shape
from .tracking import module_tensors, storage_bytes


class PlanError(ValueError):
    """A planning input is wrong (the message says what was expected)."""


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
        return minilm_path()
    if name == "clip":
        return find_clip_folder(cfg.model.text_encoder_path or None)
    raise PlanError(f"expected model.text_encoder minilm or clip, got {name!r}")


def _text_width(cfg: Config) -> int:
    name, folder = cfg.model.text_encoder, _text_folder(cfg)
    config = json.loads((Path(folder) / "config.json").read_text())
    config = config.get("text_config", config)  # a full CLIPModel folder nests the text tower's config
    if "hidden_size" not in config:
        raise PlanError(f"expected hidden_size in {folder}/config.json (the {name} text encoder's width)")
    return int(config["hidden_size"])


def _folder_classes(path: str) -> int:
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


def random_vae(cfg: Config, device="cpu"):
    """A frozen VAE of ``model.vae``'s architecture built on ``device`` (meta and fake tensors too)
    with random weights and scaling factor 1, for planning and measuring (None for a pixel model)."""
    if not cfg.model.vae:
        return None
    with torch.device(device):
        vae = build_vae(runs.read_config(cfg.model.vae, need_weights=False)).eval().requires_grad_(False)
    vae.scaling_factor.fill_(1.0)
    return vae


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


def vae_bytes(cfg: Config) -> int:
    """A latent model's VAE weights and buffers (0 for a pixel model)."""
    return storage_bytes(module_tensors(random_vae(cfg, "meta")))


def host_extras(cfg: Config) -> dict[str, int]:
    """Host memory a training process holds besides the step (not in the plan's peak, which follows
    the U-Net's device): about the training images (float32 pixels) and the frozen text encoder's
    weights (exact, from its safetensors header). The cached text-embedding table is not known
    before the captions are."""
    d, out = cfg.data, {}
    count = {"digits": round(1797 * (1 - d.holdout)), "shapes": d.scenes}.get(d.dataset)
    if count is None and Path(d.path).is_dir():
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
    path = Path(_text_folder(cfg)) / "model.safetensors"
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    keep = (lambda k: k.startswith("text_model.")) if cfg.model.text_encoder == "clip" else (lambda k: True)
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
               if k != "__metadata__" and keep(k))
