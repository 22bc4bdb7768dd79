"""LoRA (Hu et al. 2022, "LoRA: Low-Rank Adaptation of Large Language Models") on a difflab U-Net,
through peft, the library diffusers uses: W x + (alpha / r) B A x with B zero-initialised, so a
fresh adapter leaves the model unchanged.

Targets are the attention projections (``q``, ``kv``, ``out`` of every self- and cross-attention,
``qkv``/``out`` of plain self-attention) and, with ``convs``, the ResBlocks' 3x3 convolutions. A
LoRA file is one safetensors file: the low-rank weights, and in its metadata the rank, alpha,
targets and the base run with the SHA-256 of the weights it was trained on (refused on another).

    add_lora(unet, rank=4)                 # inject (peft), only the LoRA weights train
    save_lora(unet, "star.safetensors", base_record)
    load_lora(unet, "star.safetensors", scale=0.8)   # on a fresh base; set_lora_scale, merge_lora later
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..files import atomic_write
from ..runs import RunFileError, weights_metadata, weights_sha256

ATTENTION_TARGETS = r".*\.(q|kv|qkv|out)$"
CONV_TARGETS = r".*\.res\.conv[12]$"
FORMAT = "difflab-lora-1"


def lora_targets(convs: bool) -> str:
    return f"({ATTENTION_TARGETS})|({CONV_TARGETS})" if convs else ATTENTION_TARGETS


def add_lora(unet: nn.Module, rank: int = 4, alpha: float | None = None, convs: bool = False) -> nn.Module:
    """Inject LoRA layers of ``rank`` (scale ``alpha / rank``, alpha defaults to the rank) into ``unet``
    in place; every other parameter is frozen. Returns ``unet``."""
    from peft import LoraConfig, inject_adapter_in_model  # slow import, only for LoRA

    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    config = LoraConfig(r=rank, lora_alpha=float(alpha or rank), target_modules=lora_targets(convs))
    unet.requires_grad_(False)
    inject_adapter_in_model(config, unet)
    unet.lora_config = {"rank": rank, "alpha": float(alpha or rank), "convs": bool(convs)}
    return unet


def lora_layers(unet: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer  # slow import, only for LoRA

    return [m for m in unet.modules() if isinstance(m, LoraLayer)]


def lora_state(unet: nn.Module) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict  # slow import, only for LoRA

    return {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def set_lora_scale(unet: nn.Module, scale: float) -> None:
    """Scale every LoRA update by ``scale`` (0 = the base model; unmerged layers only)."""
    layers = lora_layers(unet)
    if not layers:
        raise ValueError("this U-Net has no LoRA layers")
    if any(layer.merged for layer in layers):
        raise ValueError("unmerge the LoRA (unmerge_lora) before changing its scale")
    for layer in layers:
        layer.set_scale("default", float(scale))


def merge_lora(unet: nn.Module) -> None:
    """Fold each B A into its base weight (sampling then costs what the base costs)."""
    for layer in lora_layers(unet):
        layer.merge()


def unmerge_lora(unet: nn.Module) -> None:
    """Subtract each merged B A again: the base weights up to float rounding."""
    for layer in lora_layers(unet):
        layer.unmerge()


def save_lora(unet: nn.Module, path, base: dict, extra: dict | None = None) -> Path:
    """The LoRA weights of ``unet`` to ``path`` (atomically), with the config and ``base`` (the base
    run's record: path and weights SHA-256) in the metadata."""
    meta = {"format": FORMAT, "lora": json.dumps(unet.lora_config), "base": json.dumps(base),
            **{k: json.dumps(v) for k, v in (extra or {}).items()}}
    path, state = Path(path), {k: v.cpu() for k, v in lora_state(unet).items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))
    return path


def read_lora(path) -> tuple[dict[str, torch.Tensor], dict]:
    """(weights, metadata with the JSON values parsed) of a LoRA file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist (write one with `difflab finetune RUN --lora ...`)")
    try:
        meta, state = weights_metadata(path), load_file(str(path))
    except (SafetensorError, OSError, RunFileError) as err:
        raise ValueError(f"{path}: not a readable LoRA file ({err})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a difflab LoRA file (metadata format {meta.get('format')!r}, expected {FORMAT})")
    return state, {k: json.loads(v) for k, v in meta.items() if k != "format"}


def load_lora(unet: nn.Module, path, scale: float = 1.0, where=None) -> dict:
    """Inject the LoRA of ``path`` into ``unet`` (a base with no LoRA yet) at ``scale``, after checking
    that ``unet`` holds the weights the LoRA was trained on. Returns the file's metadata."""
    from peft import set_peft_model_state_dict  # slow import, only for LoRA

    state, meta = read_lora(path)
    if lora_layers(unet):
        raise ValueError("this U-Net already has a LoRA; load another one on a fresh copy of the base")
    recorded, mine = meta["base"]["weights_sha256"], weights_sha256(unet)
    if recorded != mine:
        raise ValueError(f"{path} is a LoRA for the model trained in {meta['base']['path']} (weights sha256 "
                         f"{recorded[:12]}...), but {where or 'this model'} has sha256 {mine[:12]}...")
    c = meta["lora"]
    add_lora(unet, c["rank"], c["alpha"], c["convs"])
    result = set_peft_model_state_dict(unet, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"{path}: its weights do not fit this U-Net (missing {missing[:3]}, unexpected "
                         f"{list(result.unexpected_keys)[:3]})")
    set_lora_scale(unet, scale)
    return meta
