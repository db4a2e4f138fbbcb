"""Loads the compiled gumbel_kernels._C (and the CUDA emulator's library) and registers, side by
side, the fake kernels and the autograd formulas of the ops whose schemas csrc/gol_schemas.h
defines.

Importing this module never fails: when the extension is missing, `has_ops()` is False and
`load_error()` says why, so the pure-PyTorch and Triton backends still work.
"""
from __future__ import annotations

import glob
import os
from typing import Optional

import torch

_LOAD_ERROR: Optional[str] = None
try:
    from . import _C  # noqa: F401  (loading it runs the TORCH_LIBRARY registrations)
except ImportError as error:  # pragma: no cover - depends on the build
    _LOAD_ERROR = f"gumbel_kernels._C could not be imported ({error}); build it with `make build`"

# The CUDA emulator's library (namespace gumbel_emulated, backend "cuda_emulated"): the built
# gumbel_kernels/_cuda_emulated*.so, or the file GUMBEL_CUDA_EMULATED_LIBRARY names (a
# sanitizer build of it, see tests/test_sanitizers.py).
EMULATED_LIBRARY_ENV = "GUMBEL_CUDA_EMULATED_LIBRARY"
_EMULATED_ERROR: Optional[str] = None


def _load_emulated_library() -> Optional[str]:
    path = os.environ.get(EMULATED_LIBRARY_ENV)
    if not path:
        built = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "_cuda_emulated*.so")))
        if not built:
            return "the CUDA emulator library was not built (gumbel_kernels/_cuda_emulated*.so); " \
                   "build it with `make build`"
        path = built[0]
    try:
        torch.ops.load_library(path)
    except OSError as error:
        return f"the CUDA emulator library {path} could not be loaded ({error})"
    return None


_EMULATED_ERROR = _load_emulated_library()


def has_ops() -> bool:
    """True when the compiled operator library is loaded."""
    return _LOAD_ERROR is None


def load_error() -> Optional[str]:
    """Why the compiled operator library is unavailable, or None."""
    return _LOAD_ERROR


def emulated_error() -> Optional[str]:
    """Why the CUDA emulator's ops (torch.ops.gumbel_emulated) are unavailable, or None."""
    return _EMULATED_ERROR


def has_kernel(op_name: str, dispatch_key: str) -> bool:
    """True when gumbel::<op_name> has a kernel for the dispatch key ("CPU", "CUDA")."""
    if not has_ops():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"gumbel::{op_name}", dispatch_key)


def scalar_loss_dtype(logits: torch.Tensor) -> torch.dtype:
    """Mean/sum losses are float32, or float64 for float64 logits."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def refuse_double_backward(name: str) -> None:
    """The saved gradient is a constant of the graph: a backward with create_graph=True would
    return a first derivative whose own derivative is silently zero. (Compiled backward graphs
    are traced with grad enabled; they are not double backward.)"""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(f"{name}: double backward (create_graph=True) is not supported: the "
                           "fused pass saves the gradient, not a differentiable graph of it")


# The autograd of the fused ops gumbel::gol_loss (loss, grad), gol_loss_class_stats (loss, grad,
# pos_sums, neg_sums) and gumbel_triton::gol_loss (loss, grad, counts): 15 inputs each, only the
# loss differentiated, through the saved gradient.
def gol_loss_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(*output[1:])


def gol_loss_backward(op_name: str):
    """The backward of the fused op `op_name` (its name in the errors)."""

    def backward(ctx, grad_loss, *_unused_grads_of_other_outputs):
        (grad,) = ctx.saved_tensors
        if grad.dim() != 2:  # need_grad=False saved an empty (0,) tensor
            raise RuntimeError(f"{op_name} was called with need_grad=False, so it saved no "
                               "gradient; call it with need_grad=True to differentiate it")
        refuse_double_backward(op_name)
        # Out of place: a graph run twice (retain_graph) must see the unscaled gradient again.
        return (grad * grad_loss).to(grad.dtype), *([None] * 14)

    return backward


def register_python_parts(namespace: str) -> None:
    """Fake kernels and autograd formulas of the four ops of `namespace` (the schemas of
    csrc/gol_schemas.h): "gumbel", and "gumbel_emulated" for the CUDA emulator's library."""

    @torch.library.register_fake(f"{namespace}::gol_loss")
    def _gol_loss_fake(logits, labels, drop_classes, class_weight, row_weight, seed, offset=0,
                       mode="droploss", activation="gumbel", reduction="mean", clamp_min=-4.0,
                       clamp_max=10.0, grad_mode="reference", ignore_index=-100, need_grad=True):
        torch._check(logits.dim() == 2, lambda: f"logits must be 2-D, got {logits.dim()}-D")
        torch._check(labels.dim() == 1 and labels.shape[0] == logits.shape[0],
                     lambda: "labels must have shape (N,)")
        if reduction == "none":
            loss = torch.empty_like(logits, memory_format=torch.contiguous_format)
        else:
            loss = logits.new_empty((), dtype=scalar_loss_dtype(logits))
        if need_grad:
            grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        else:
            grad = logits.new_empty((0,))
        return loss, grad

    _gol_loss_backward = gol_loss_backward(f"{namespace}::gol_loss")
    torch.library.register_autograd(f"{namespace}::gol_loss", _gol_loss_backward,
                                    setup_context=gol_loss_setup_context)

    @torch.library.register_fake(f"{namespace}::gol_loss_class_stats")
    def _gol_loss_class_stats_fake(logits, labels, drop_classes, class_weight, pos_weight,
                                   row_weight, seed, offset=0, mode="droploss",
                                   activation="gumbel", reduction="mean", clamp_min=-4.0,
                                   clamp_max=10.0, grad_mode="reference", ignore_index=-100):
        torch._check(logits.dim() == 2, lambda: f"logits must be 2-D, got {logits.dim()}-D")
        torch._check(reduction != "none", lambda: "reduction must be 'mean' or 'sum'")
        loss = logits.new_empty((), dtype=scalar_loss_dtype(logits))
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        stats = [logits.new_empty((logits.shape[1],), dtype=torch.float64) for _ in range(2)]
        return loss, grad, *stats

    torch.library.register_autograd(f"{namespace}::gol_loss_class_stats", _gol_loss_backward,
                                    setup_context=gol_loss_setup_context)

    @torch.library.register_fake(f"{namespace}::gumbel_activation")
    def _gumbel_activation_fake(logits):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    def _gumbel_activation_setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], output)

    def _gumbel_activation_backward(ctx, grad_scores):
        logits, scores = ctx.saved_tensors
        # d/dq exp(-exp(-q)) = p * exp(-q)
        return grad_scores * scores * torch.exp(-logits)

    torch.library.register_autograd(f"{namespace}::gumbel_activation",
                                    _gumbel_activation_backward,
                                    setup_context=_gumbel_activation_setup_context)

    @torch.library.register_fake(f"{namespace}::scale_grad_")
    def _scale_grad_fake(grad, grad_output):
        return None


if has_ops():
    register_python_parts("gumbel")
if _EMULATED_ERROR is None:
    register_python_parts("gumbel_emulated")
