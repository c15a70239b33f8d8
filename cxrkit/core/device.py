"""Devices and processes: torchrun/DDP set-up, --device parsing, the AMP dtype. One place, used by
training, evaluation, inference and export."""
from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

from .errors import UsageError

log = logging.getLogger("cxrkit")


def setup_distributed():
    """(rank, world, local_rank); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return rank, world, local


def pick_device(name: str | None, local_rank: int = 0, auto: str = "cuda") -> torch.device:
    """--device auto|cpu|cuda|cuda:N. `auto` means CUDA when available (auto="cuda") or always the
    CPU (auto="cpu": export traces on the CPU unless told otherwise)."""
    if name in (None, "", "auto"):
        name = "cuda" if auto == "cuda" and torch.cuda.is_available() else "cpu"
    try:
        torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            log.warning("--device %s requested but CUDA is unavailable: using CPU", name)
            return torch.device("cpu")
        if name == "cuda":
            name = f"cuda:{local_rank}"
        torch.cuda.set_device(torch.device(name))
    return torch.device(name)


def amp_dtype_for(device: torch.device, amp: str):
    """--amp auto|on|off. On CUDA: bf16 when supported (no loss scaling needed), else fp16.
    On CPU autocast is off unless forced: bf16 matmuls are slow on CPUs without AVX-512 BF16."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


def barrier(world: int) -> None:
    """All ranks wait here (a no-op in a single process)."""
    if world > 1:
        dist.barrier()
