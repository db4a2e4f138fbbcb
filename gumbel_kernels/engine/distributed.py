"""torchrun / DDP helpers: a process group from torchrun's environment (nccl on GPUs, gloo on
CPUs), rank queries that work without one, and work that rank 0 does before the others
(downloads)."""
from __future__ import annotations

import os
from typing import Any, Callable

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


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def run_on_main_first(fn: Callable[[], Any], what: str) -> Any:
    """fn() on rank 0 first, then, once it has succeeded, on every other rank: for work whose
    result rank 0 leaves where the others can read it (a download into the shared torch hub
    cache, which the other ranks then only read). If rank 0 fails, every rank raises at once
    instead of waiting at a barrier forever."""
    if not dist.is_initialized() or world_size() == 1:
        return fn()
    result, failure, status = None, None, [None]
    if is_main():
        try:
            result = fn()
        except Exception as error:  # reported to every rank, re-raised here below
            failure = error
            status = [f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(status, src=0)
    if failure is not None:
        raise failure
    if status[0] is not None:
        raise RuntimeError(f"{what} failed on rank 0: {status[0]}")
    return result if is_main() else fn()
