"""Adapters on a frozen model: ControlNet hints (``control``), LoRA through peft (``lora``) and the
shapes world's image encoder for IP-Adapter (``image_encoder``). The trainers live in
``adapters.training``, which the CLI imports: loading a model never imports a trainer."""
from . import control, lora
from .control import CONTROL_KINDS, edge_map, hints

__all__ = ["CONTROL_KINDS", "control", "edge_map", "hints", "lora"]
