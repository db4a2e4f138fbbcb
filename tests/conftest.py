"""Shared fixtures: where a kernel test runs. A `target` is the device the tensors live on and the
hand-written backend that computes them: the CPU kernel, the CUDA kernel (skipped without a
GPU), and the CUDA kernel's own device code run on the CPU by the emulator (backend
"cuda_emulated", csrc/cuda_emulation), so that the GPU code is checked in every CI run."""
from typing import NamedTuple

import pytest
import torch

from gumbel_kernels import _ops

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_emulator = pytest.mark.skipif(
    _ops.emulated_error() is not None,
    reason=f"the CUDA emulator is unavailable: {_ops.emulated_error()}")


class Target(NamedTuple):
    device: str   # where the tensors live
    backend: str  # the gol_loss backend that runs them

    @property
    def cuda_like(self) -> bool:
        """The CUDA backend's semantics (in-place backward scaling, device-side label check)."""
        return self.backend in ("cuda", "cuda_emulated")

    @property
    def ops(self):
        """The op namespace of the backend: torch.ops.gumbel, or the emulator's."""
        return torch.ops.gumbel_emulated if self.backend == "cuda_emulated" else torch.ops.gumbel


TARGETS = [
    pytest.param(Target("cpu", "cpu"), id="cpu"),
    pytest.param(Target("cuda", "cuda"), id="cuda", marks=needs_cuda),
    pytest.param(Target("cpu", "cuda_emulated"), id="cuda_emulated", marks=needs_emulator),
]


@pytest.fixture(params=TARGETS)
def target(request) -> Target:
    return request.param
