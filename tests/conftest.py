"""Shared fixtures: the devices a test runs on (CUDA ones skipped with a reason without a GPU)."""
import pytest
import torch

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=needs_cuda)]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def compiled_backend(device: str) -> str:
    """The hand-written kernel's backend name for a device ("cpu" or "cuda")."""
    return device
