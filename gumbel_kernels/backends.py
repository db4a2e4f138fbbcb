"""Which backend computes the fused GOL loss, and why a backend cannot run.

Every backend implements the same fused forward (gumbel_kernels/INTERFACES.md). "auto" takes the first
backend of the device's preference list that can run; an explicit request that cannot run
raises with the reason; the GUMBEL_BACKEND environment variable overrides "auto".
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Callable, Optional

import torch

from . import _ops, reference

# "cuda_emulated" (CPU tensors): the CUDA kernels' device code and host logic run on the CPU by
# csrc/cuda_emulation, a test backend for machines without a GPU; never chosen by "auto".
BACKENDS = ("cpu", "cuda", "triton", "reference", "cuda_emulated")
AUTO_PREFERENCE = {
    "cpu": ("cpu", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}
ENV_OVERRIDE = "GUMBEL_BACKEND"


def _compiled_op_reason(dispatch_key: str) -> Optional[str]:
    if not _ops.has_ops():
        return _ops.load_error()
    if not _ops.has_kernel("gol_loss", dispatch_key):
        return f"gumbel_kernels._C was built without {dispatch_key} kernels"
    if dispatch_key == "CUDA":
        return _cuda_image_reason()
    return None


_image_reasons: dict = {}


def _cuda_image_reason() -> Optional[str]:
    """Why the current CUDA device cannot run the built kernels (no cubin for its arch and no
    PTX the driver can compile), or None; asked once per device."""
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    device = torch.cuda.current_device()
    if device not in _image_reasons:
        reason = torch.ops.gumbel.cuda_kernel_image_check(device)
        arch = "sm_%d%d" % torch.cuda.get_device_capability(device)
        _image_reasons[device] = (f"gumbel_kernels._C has no kernel image for this {arch} device "
                                  f"({reason}); rebuild with TORCH_CUDA_ARCH_LIST set for it"
                                  if reason else None)
    return _image_reasons[device]


def _triton_reason(device_type: str) -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton runs CPU tensors only under TRITON_INTERPRET=1 (set before import)"
    if device_type not in ("cpu", "cuda"):
        return f"Triton does not run on {device_type} tensors"
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


def unavailable_reason(name: str, device_type: str) -> Optional[str]:
    """None when backend `name` can run on tensors of `device_type`, else the reason."""
    if name == "reference":
        return None
    if name == "cpu":
        if device_type != "cpu":
            return f"the 'cpu' backend runs on CPU tensors, got {device_type} tensors"
        return _compiled_op_reason("CPU")
    if name == "cuda":
        if device_type != "cuda":
            return f"the 'cuda' backend runs on CUDA tensors, got {device_type} tensors"
        return _compiled_op_reason("CUDA")
    if name == "triton":
        return _triton_reason(device_type)
    if name == "cuda_emulated":
        if device_type != "cpu":
            return f"the 'cuda_emulated' backend runs on CPU tensors, got {device_type} tensors"
        return _ops.emulated_error()
    return f"unknown backend {name!r}; expected one of {', '.join(('auto',) + BACKENDS)}"


_warned_fallback: set = set()


def resolve(requested: str, device_type: str) -> str:
    """The backend name that will run a call: an explicit request or the "auto" choice."""
    if requested == "auto":
        requested = os.environ.get(ENV_OVERRIDE, "auto") or "auto"
    if requested != "auto":
        reason = unavailable_reason(requested, device_type)
        if reason is not None:
            raise RuntimeError(f"gol_loss backend {requested!r} cannot run on {device_type} "
                               f"tensors: {reason}")
        return requested
    preference = AUTO_PREFERENCE.get(device_type, ("reference",))
    reasons = []
    for name in preference:
        reason = unavailable_reason(name, device_type)
        if reason is None:
            if name == "reference" and len(preference) > 1 and device_type not in _warned_fallback:
                _warned_fallback.add(device_type)
                warnings.warn("gol_loss falls back to the slow pure-PyTorch reference on "
                              f"{device_type}: " + "; ".join(reasons), RuntimeWarning, stacklevel=3)
            return name
        reasons.append(f"{name}: {reason}")
    raise RuntimeError("no gol_loss backend can run: " + "; ".join(reasons))  # pragma: no cover


# torch.compile calls resolve() once while tracing and keeps its answer (what
# torch.compiler.assume_constant_result marks; set directly, since importing that decorator
# would import torch._dynamo, seconds, into every `import gumbel_kernels`).
resolve._dynamo_marked_constant = True


def _compiled_forward(*args):
    return torch.ops.gumbel.gol_loss(*args)


def _emulated_forward(*args):
    return torch.ops.gumbel_emulated.gol_loss(*args)


def _triton_forward(*args):
    from .triton.gol_loss import gol_loss_forward
    return gol_loss_forward(*args)


_FORWARDS: dict[str, Callable] = {
    "cpu": _compiled_forward,
    "cuda": _compiled_forward,
    "triton": _triton_forward,
    "reference": reference.gol_loss_forward,
    "cuda_emulated": _emulated_forward,
}


def fused_forward(name: str) -> Callable:
    """The fused loss+gradient forward of backend `name` (signature in gumbel_kernels/INTERFACES.md)."""
    return _FORWARDS[name]


def scale_saved_grad(backend: str, grad: torch.Tensor, grad_output: torch.Tensor):
    """grad * grad_output for the backward of the fused loss: (result, whether grad was mutated).

    A unit scalar upstream gradient (loss.backward()) costs nothing: the saved gradient is the
    result. On the CPU that check is free and other upstream gradients are applied out of
    place, so the saved gradient survives a retained graph. On an accelerator the check would
    cost a host sync, so the device's in-place kernel makes it instead (a no-op for 1.0).
    """
    if grad_output.numel() != 1:
        return grad * grad_output, False
    if backend == "cuda_emulated":  # the CUDA backend's in-place kernel, run by the emulator
        torch.ops.gumbel_emulated.scale_grad_(grad, grad_output)
        return grad, True
    if grad_output.device.type == "cpu":
        if float(grad_output) == 1.0:
            return grad, False
        return grad * grad_output.reshape(()).to(grad.dtype), False
    if _ops.has_kernel("scale_grad_", grad.device.type.upper()):
        torch.ops.gumbel.scale_grad_(grad, grad_output)
    elif backend == "triton":
        from .triton.gol_loss import scale_grad_ as triton_scale_grad_
        triton_scale_grad_(grad, grad_output)
    else:
        grad.mul_(grad_output.reshape(()))
    return grad, True
