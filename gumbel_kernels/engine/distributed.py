"""torchrun / DDP helpers: a process group from torchrun's environment (nccl on GPUs, gloo on
CPUs), rank queries that work without one, and gathering Python objects to rank 0."""
from __future__ import annotations

import os
from typing import Any, List

import torch
import torch.distributed as dist


def init_distributed(device: str) -> bool:
    """Joins the process group when launched by torchrun (WORLD_SIZE > 1); True if it did."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather_objects(obj: Any) -> List[Any]:
    """Every rank's `obj`, in rank order, on rank 0 (an empty list elsewhere)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out if is_main() else []


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
