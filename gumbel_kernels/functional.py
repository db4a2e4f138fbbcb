"""The public functions of gumbel-kernels: the fused GOL loss and the Gumbel activation.

`gol_loss` checks its arguments (cheap metadata checks only; label ranges are checked by the
backend, in its pre-pass over the labels), picks a backend and runs it through one
autograd.Function whose forward is the backend's fused loss+gradient pass and whose backward only
scales the gradient saved by that pass.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.fx

from . import _ops, backends, reference
from ._ops import refuse_double_backward  # (shared with the ops' autograd; public here too)

MODES = ("bce", "eql", "droploss")
ACTIVATIONS = ("gumbel", "sigmoid")
REDUCTIONS = ("mean", "sum", "none")
GRAD_MODES = ("reference", "exact")
LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
DEFAULT_CLAMP = (-4.0, 10.0)
DEFAULT_LAMBDA = 0.0011  # GOL's drop threshold on LVIS v1 image frequencies

_INT64_MAX = 2 ** 63 - 1


def _check_choice(value, argument: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"gol_loss: {argument} must be one of {', '.join(map(repr, choices))}, "
                         f"got {value!r}")


def _check_tensor(value, argument: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"gol_loss: {argument} must be a torch.Tensor, got {type(value).__name__}")


def _check_vector(value: Optional[torch.Tensor], argument: str, length: int, length_name: str,
                  logits: torch.Tensor, floating: bool) -> None:
    if value is None:
        return
    _check_tensor(value, argument)
    if floating and not value.is_floating_point():
        raise TypeError(f"gol_loss: {argument} must be a floating tensor, got {value.dtype}")
    if not floating and value.dtype != torch.bool:
        raise TypeError(f"gol_loss: {argument} must be a bool tensor, got {value.dtype}")
    if value.dim() != 1 or value.shape[0] != length:
        raise ValueError(f"gol_loss: {argument} must have shape ({length_name},) = ({length},) to "
                         f"match logits {tuple(logits.shape)}, got {tuple(value.shape)}")
    if value.device != logits.device:
        raise ValueError(f"gol_loss: {argument} is on {value.device} but logits are on "
                         f"{logits.device}")


def _check_arguments(logits, labels, drop_classes, class_weight, row_weight, mode, activation,
                     reduction, grad_mode, ignore_index, offset, backend) -> None:
    _check_tensor(logits, "logits")
    _check_tensor(labels, "labels")
    if logits.dim() != 2:
        raise ValueError(f"gol_loss: logits must have shape (N, C), got {tuple(logits.shape)}")
    if logits.dtype not in LOGIT_DTYPES:
        raise TypeError("gol_loss: logits must be float32, float16, bfloat16 or float64, got "
                        f"{logits.dtype}")
    n, num_classes = logits.shape
    if num_classes < 1:
        raise ValueError(f"gol_loss: logits must have at least one class column, got shape "
                         f"{tuple(logits.shape)}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"gol_loss: labels must have shape (N,) = ({n},) to match logits "
                         f"{tuple(logits.shape)}, got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"gol_loss: labels must be int64 (or int32), got {labels.dtype}")
    if labels.device != logits.device:
        raise ValueError(f"gol_loss: labels are on {labels.device} but logits are on "
                         f"{logits.device}")
    _check_vector(drop_classes, "drop_classes", num_classes, "C", logits, floating=False)
    _check_vector(class_weight, "class_weight", num_classes, "C", logits, floating=True)
    _check_vector(row_weight, "row_weight", n, "N", logits, floating=True)
    _check_choice(mode, "mode", MODES)
    _check_choice(activation, "activation", ACTIVATIONS)
    _check_choice(reduction, "reduction", REDUCTIONS)
    _check_choice(grad_mode, "grad_mode", GRAD_MODES)
    _check_choice(backend, "backend", ("auto",) + backends.BACKENDS)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"gol_loss: ignore_index must be an int, got {ignore_index!r}")
    if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset <= _INT64_MAX:
        raise ValueError(f"gol_loss: offset must be an int in [0, 2**63), got {offset!r}")


def _check_differentiation(class_weight, row_weight) -> None:
    """What the fused pass cannot differentiate is an error, never a silently missing gradient."""
    if torch._C._are_functorch_transforms_active():
        raise RuntimeError("gol_loss does not support torch.func transforms (grad, vmap, jacrev, "
                           "...): its forward computes the gradient of the loss with respect to "
                           "the logits only; use loss.backward() or torch.autograd.grad")
    if torch.is_grad_enabled():
        for name, weight in (("class_weight", class_weight), ("row_weight", row_weight)):
            if weight is not None and weight.requires_grad:
                raise ValueError(f"gol_loss: {name} requires grad, but gol_loss differentiates "
                                 f"only the logits; pass {name}.detach() (or compute the loss "
                                 f"with the reference formulas in gumbel_kernels.reference)")


def _clamp_bounds(clamp) -> Tuple[Optional[float], Optional[float]]:
    if clamp is None:
        return None, None
    try:
        lo, hi = clamp
    except (TypeError, ValueError):
        raise ValueError(f"gol_loss: clamp must be None or a (min, max) pair, got {clamp!r}") from None
    lo = None if lo is None else float(lo)
    hi = None if hi is None else float(hi)
    if lo is not None and hi is not None and not lo < hi:
        raise ValueError(f"gol_loss: clamp must satisfy min < max, got {clamp!r}")
    return lo, hi


@torch.library.custom_op("gumbel::draw_seed", mutates_args=())
def _draw_seed() -> torch.Tensor:
    """A 63-bit seed from torch's default CPU generator (so torch.manual_seed reproduces a run).
    An op, opaque to torch.compile, so that compiled code draws from the same generator as eager
    code (traced, torch.randint would become inductor's own random numbers)."""
    return torch.randint(0, _INT64_MAX, (1,), dtype=torch.int64)


@_draw_seed.register_fake
def _draw_seed_fake() -> torch.Tensor:
    return torch.empty(1, dtype=torch.int64)


torch.fx.node.has_side_effect(torch.ops.gumbel.draw_seed.default)  # never merged or dropped


def _seed_tensor(seed, logits: torch.Tensor) -> torch.Tensor:
    """The 64-bit Philox key as a one-element int64 tensor (SPEC.md section 4): on the CPU, or
    on the logits' CUDA device while a CUDA graph is captured with seed=None."""
    if seed is None:
        if (logits.is_cuda and not torch.compiler.is_compiling()
                and torch.cuda.is_current_stream_capturing()):
            # Drawn by a kernel of the captured stream from torch's CUDA generator, whose
            # graph-safe state (the mechanism of torch's own dropout) advances on every replay:
            # each replay drops fresh elements. The kernels read the seed on the device.
            return torch.randint(0, _INT64_MAX, (1,), dtype=torch.int64, device=logits.device)
        return torch.ops.gumbel.draw_seed()
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.is_floating_point() or seed.dtype == torch.bool:
            raise ValueError(f"gol_loss: seed must be an int or a one-element integer tensor, got "
                             f"{seed.dtype} {tuple(seed.shape)}")
        return seed.reshape(1).to(device="cpu", dtype=torch.int64)
    if not isinstance(seed, int) or isinstance(seed, bool) or not -2 ** 63 <= seed < 2 ** 64:
        raise ValueError(f"gol_loss: seed must be None or an int in [-2**63, 2**64), got {seed!r}")
    if seed > _INT64_MAX:  # the same 64 key bits, stored as int64
        seed -= 2 ** 64
    return torch.tensor([seed], dtype=torch.int64)


def _prepare_python_backend_inputs(logits, labels, class_weight, row_weight):
    """The normalised inputs the Python backends expect (the C++ ops normalise their own; the
    reference and the Triton kernels check the labels themselves)."""
    math_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    labels = labels.to(torch.int64).contiguous()
    class_weight = None if class_weight is None else class_weight.to(math_dtype).contiguous()
    row_weight = None if row_weight is None else row_weight.to(math_dtype).contiguous()
    return logits.contiguous(), labels, class_weight, row_weight


class _GOLLossFunction(torch.autograd.Function):
    """Forward: the backend's fused loss+gradient pass. Backward: scale the saved gradient."""

    @staticmethod
    def forward(ctx, logits, labels, drop_classes, class_weight, row_weight, seed, offset, mode,
                activation, reduction, clamp_min, clamp_max, grad_mode, ignore_index,
                backend_name, need_grad):
        loss, grad = backends.fused_forward(backend_name)(
            logits, labels, drop_classes, class_weight, row_weight, seed, offset, mode,
            activation, reduction, clamp_min, clamp_max, grad_mode, ignore_index, need_grad)
        ctx.backend_name = backend_name
        ctx.mutated = False
        # The second output (the gradient) is never differentiated: without this, autograd
        # would build an N x C tensor of zeros for it in every backward.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(grad)
        return loss, grad

    @staticmethod
    def backward(ctx, grad_loss, _unused):
        (grad,) = ctx.saved_tensors
        if grad_loss is None:  # the loss itself was not used
            return (None,) * 16
        if grad.dim() != 2:  # need_grad was False: the forward saved an empty (0,) tensor
            raise RuntimeError("gol_loss: no gradient was saved (the forward ran with autograd "
                               "disabled or logits.requires_grad=False)")
        if torch.compiler.is_compiling():
            return (grad * grad_loss,) + (None,) * 15
        refuse_double_backward("gol_loss")
        if ctx.mutated:
            raise RuntimeError(
                "gol_loss: backward ran twice through the same loss; the first backward scaled "
                "the saved gradient in place on the device. Recompute the loss for a second "
                "backward, or call torch.ops.gumbel.gol_loss directly (out-of-place backward)")
        # For loss.backward() the forward's gradient buffer becomes the logits' gradient as is:
        # no N x C pass and no allocation.
        result, ctx.mutated = backends.scale_saved_grad(ctx.backend_name, grad, grad_loss)
        return (result,) + (None,) * 15


def gol_loss(logits: torch.Tensor, labels: torch.Tensor, drop_classes: Optional[torch.Tensor] = None,
             *, mode: str = "droploss", activation: str = "gumbel", reduction: str = "mean",
             clamp: Optional[Tuple[Optional[float], Optional[float]]] = DEFAULT_CLAMP,
             grad_mode: str = "reference", class_weight: Optional[torch.Tensor] = None,
             row_weight: Optional[torch.Tensor] = None, ignore_index: int = -100,
             seed: Union[int, torch.Tensor, None] = None, offset: int = 0,
             backend: str = "auto") -> torch.Tensor:
    """The Gumbel Optimized Loss (GOL, ECCV 2022) over (N, C) RoI logits, fused in one pass.

    Args:
        logits: (N, C) float32/float16/bfloat16 (float64 for gradcheck) classification logits.
        labels: (N,) int64/int32; a class in [0, C), C for a background row (every column
            negative), or `ignore_index` (no loss, no gradient, not counted).
        drop_classes: (C,) bool, True for the rare classes whose negatives DropLoss drops
            (see `drop_classes_from_frequency`); None drops nothing.
        mode: "droploss" (default), "eql" (only foreground rows drop negatives) or "bce".
        activation: "gumbel" (p = exp(-exp(-q)), default) or "sigmoid" (the baselines).
        reduction: "mean" (sum / #non-ignored rows), "sum" or "none" ((N, C) weighted losses).
        clamp: (min, max) logit clamp of the Gumbel activation (either side may be None), or
            None for no clamp; the gradient is zero outside the open interval.
        grad_mode: "reference" (what GOL's BCE backward computes, dead zone included) or
            "exact" (the analytic gradient).
        class_weight, row_weight: optional (C,) / (N,) float multipliers of every element.
        seed, offset: the Philox stream of the DropLoss background drop. seed=None draws a seed
            from torch's default CPU generator; a given (seed, offset) drops the same elements on
            every backend.
        backend: "auto", "cpu", "cuda", "triton", "reference", or "cuda_emulated" (the CUDA
            kernels' device code run on the CPU, a test backend; see gumbel_kernels.backends).

    Returns:
        The loss: a 0-dim float32 tensor (float64 for float64 logits) for "mean"/"sum", or an
        (N, C) tensor in the logits' dtype for "none".
    """
    _check_arguments(logits, labels, drop_classes, class_weight, row_weight, mode, activation,
                     reduction, grad_mode, ignore_index, offset, backend)
    _check_differentiation(class_weight, row_weight)
    clamp_min, clamp_max = _clamp_bounds(clamp)
    seed_tensor = _seed_tensor(seed, logits)
    backend_name = backends.resolve(backend, logits.device.type)
    if backend_name in ("reference", "triton"):
        logits, labels, class_weight, row_weight = _prepare_python_backend_inputs(
            logits, labels, class_weight, row_weight)
    if drop_classes is not None:
        drop_classes = drop_classes.contiguous()
    need_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, _ = _GOLLossFunction.apply(logits, labels, drop_classes, class_weight, row_weight,
                                     seed_tensor, offset, mode, activation, reduction, clamp_min,
                                     clamp_max, grad_mode, ignore_index, backend_name, need_grad)
    return loss


def gumbel_activation(logits: torch.Tensor) -> torch.Tensor:
    """Gumbel scores eta(q) = exp(-exp(-q)) on the raw logits (no clamp), differentiable."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"gumbel_activation: logits must be a torch.Tensor, got "
                        f"{type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"gumbel_activation: logits must be a floating tensor, got {logits.dtype}")
    if _ops.has_kernel("gumbel_activation", logits.device.type.upper()):
        return torch.ops.gumbel.gumbel_activation(logits)
    return reference.gumbel_activation(logits)


def drop_classes_from_frequency(image_counts, num_images: int,
                                lambda_: float = DEFAULT_LAMBDA) -> torch.Tensor:
    """DropLoss's rare-class mask: f_j = image_counts[j] / num_images < lambda_ (strict).

    Args:
        image_counts: (C,) number of training images containing each class (LVIS's
            `image_count`), as a sequence or tensor.
        num_images: the number of training images.
        lambda_: the frequency threshold (GOL on LVIS v1: 0.0011).
    """
    counts = torch.as_tensor(image_counts)
    if counts.dim() != 1:
        raise ValueError(f"drop_classes_from_frequency: image_counts must have shape (C,), got "
                         f"{tuple(counts.shape)}")
    if counts.is_complex() or counts.dtype == torch.bool:
        raise TypeError(f"drop_classes_from_frequency: image_counts must be numeric, got "
                        f"{counts.dtype}")
    if bool((counts < 0).any()):
        raise ValueError("drop_classes_from_frequency: image_counts must be >= 0")
    if not isinstance(num_images, int) or isinstance(num_images, bool) or num_images <= 0:
        raise ValueError(f"drop_classes_from_frequency: num_images must be a positive int, got "
                         f"{num_images!r}")
    if not lambda_ > 0:
        raise ValueError(f"drop_classes_from_frequency: lambda_ must be > 0, got {lambda_!r}")
    frequency = counts.to(torch.float64) / num_images
    return frequency < lambda_
