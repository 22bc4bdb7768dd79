"""Devices and torchrun/DDP plumbing (imports nothing from difflab): gloo on CPU, NCCL on CUDA; a
no-op in a single process. ``setup`` is the one place a job picks its device and joins its group."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` is CUDA when there is one, else the CPU; any other name as torch reads it."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {str(name)!r}; expected auto, cpu, cuda, cuda:<index> or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(name)!r} asked for, but torch sees no CUDA GPU here; use cpu or auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {str(name)!r} asked for, but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(name)!r} asked for, but torch sees no MPS device here; use cpu or auto")
    return device


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group that torchrun describes in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def setup(name: str | torch.device = "auto") -> tuple[torch.device, DistInfo]:
    """The device of this process and its place in the torchrun group: under torchrun on CUDA each
    rank takes the GPU of its local rank."""
    device = resolve_device(name)
    info = init_distributed(device)
    if device.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    return device, info


def group_is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def mean_across_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        value = value.clone()
        dist.all_reduce(value)
        value /= info.world_size
    return value


def any_across_ranks(flag: bool, info: DistInfo) -> bool:
    """Whether ``flag`` holds on any rank (every rank must call this at the same point)."""
    if not info.enabled:
        return flag
    value = torch.tensor([float(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def destroy_group() -> None:
    dist.destroy_process_group()


def current_rank() -> int:
    """This process's rank in the initialised group (0 without one)."""
    return dist.get_rank() if group_is_initialized() else 0
