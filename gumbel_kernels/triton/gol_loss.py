"""Triton backend of gumbel::gol_loss: one fused pass computing the GOL loss and its gradient.

Reads top-down: element helpers, the fused kernel, the scale kernel of the backward, then the
launchers `gol_loss_forward` (the fused-forward contract of gumbel_kernels/INTERFACES.md) and
`scale_grad_`. One program per row walks the row's columns in tiles; the DropLoss uniforms come
from `tl.philox` with the SPEC.md counter layout, so the dropped elements are those of the
reference, CPU and CUDA backends. The loss is summed per program (fp32 tiles, fixed order) and
the programs' partials by torch in a fixed order: no atomics, bit-reproducible.

No libdevice calls and no tl.math.log1p/expm1 (neither exists in the interpreter): the stable
forms below are built from tl.exp/tl.log with a small-argument branch. Under TRITON_INTERPRET=1
(set before import) the kernels run on CPU tensors.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

LOSS_CAP = 100.0
BCE_EPS = 1e-12
MAX_BLOCK_C = 1024


@triton.jit
def _one_minus_exp_neg(t):
    """1 - exp(-t) = -expm1(-t) for t >= 0, without cancellation for small t: below t = 1/4 the
    Taylor series to t^11 (exact to float64 rounding there), above it 1 - exp(-t)."""
    x = -t
    series = 1.0 / 39916800.0
    series = series * x + 1.0 / 3628800.0
    series = series * x + 1.0 / 362880.0
    series = series * x + 1.0 / 40320.0
    series = series * x + 1.0 / 5040.0
    series = series * x + 1.0 / 720.0
    series = series * x + 1.0 / 120.0
    series = series * x + 1.0 / 24.0
    series = series * x + 1.0 / 6.0
    series = series * x + 0.5
    series = (series * x + 1.0) * t
    return tl.where(t < 0.25, series, 1.0 - tl.exp(-t))


@triton.jit
def _log1p(x):
    """log(1 + x) for x >= 0: the rounding of u = 1 + x cancels in log(u) * x / (u - 1)."""
    u = 1.0 + x
    d = u - 1.0
    return tl.where(d == 0.0, x, tl.log(u) * x / tl.where(d == 0.0, 1.0, d))


@triton.jit
def _element_loss_grad(q, positive, lo, hi, ACTIVATION_GUMBEL: tl.constexpr,
                       GRAD_EXACT: tl.constexpr):
    """Unweighted loss and d loss / d q of one element (SPEC.md section 2)."""
    poison = q - q  # NaN for non-finite q: the clamp must not hide it
    if ACTIVATION_GUMBEL:
        qc = tl.where(q < lo, lo, q)
        qc = tl.where(qc > hi, hi, qc)
        t = tl.exp(-qc)
        p = tl.exp(-t)
        one_minus_p = _one_minus_exp_neg(t)
        loss = tl.where(positive, t, -tl.log(one_minus_p))
        loss = tl.where(loss > LOSS_CAP, LOSS_CAP, loss)
        pt = p * t
        if GRAD_EXACT:
            grad = tl.where(positive, -t, pt / one_minus_p)
        else:
            # F.binary_cross_entropy's backward: (p - y) / max(p (1 - p), eps) * p t.
            denominator = p * one_minus_p
            denominator = tl.where(denominator < BCE_EPS, BCE_EPS, denominator)
            grad = tl.where(positive, -one_minus_p, p) / denominator * pt
        inside = (q > lo) & (q < hi)
        grad = tl.where(inside, grad, 0.0)
    else:
        e = tl.exp(-tl.abs(q))
        softplus = tl.where(q > 0.0, q, 0.0) + _log1p(e)
        s = tl.where(q < 0.0, e / (1.0 + e), 1.0 / (1.0 + e))
        loss = tl.where(positive, softplus - q, softplus)
        grad = tl.where(positive, s - 1.0, s)
    return loss + poison, grad + poison


@triton.jit
def _gol_loss_kernel(logits_ptr, labels_ptr, drop_ptr, class_weight_ptr, row_weight_ptr,
                     stats_ptr, grad_ptr, loss_ptr, partials_ptr, num_classes, ignore_index,
                     seed, offset_lo, offset_hi, lo, hi,
                     MODE: tl.constexpr, ACTIVATION_GUMBEL: tl.constexpr,
                     GRAD_EXACT: tl.constexpr, MEAN: tl.constexpr, HAS_DROP: tl.constexpr,
                     HAS_CLASS_WEIGHT: tl.constexpr, HAS_ROW_WEIGHT: tl.constexpr,
                     NEED_GRAD: tl.constexpr, STORE_LOSS: tl.constexpr,
                     MATH_DTYPE: tl.constexpr, BLOCK_C: tl.constexpr):
    # MODE: 0 bce, 1 eql, 2 droploss.
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    foreground = valid & (label < num_classes)
    background = valid & (label == num_classes)

    # The call's statistics, counted on the device by the launcher (no host round trip).
    num_valid = tl.load(stats_ptr + 0)
    num_foreground = tl.load(stats_ptr + 1)
    num_foreground_drop = tl.load(stats_ptr + 2)
    # float32 division as SPEC.md says; 0/0 = NaN drops nothing, like GOL.
    ratio = num_foreground_drop.to(tl.float32) / num_foreground.to(tl.float32)
    if MEAN:
        scale = 1.0 / tl.maximum(num_valid, 1).to(MATH_DTYPE)
    else:
        scale = tl.full((), 1.0, MATH_DTYPE)
    row_w = tl.full((), 1.0, MATH_DTYPE)
    if HAS_ROW_WEIGHT:
        row_w = tl.load(row_weight_ptr + row).to(MATH_DTYPE)

    row_start = row * num_classes
    total = tl.zeros((BLOCK_C,), dtype=MATH_DTYPE)
    for col_start in range(0, num_classes, BLOCK_C):
        cols = col_start + tl.arange(0, BLOCK_C)
        in_row = cols < num_classes
        flat = row_start + cols.to(tl.int64)
        q = tl.load(logits_ptr + flat, mask=in_row, other=0.0).to(MATH_DTYPE)
        positive = foreground & (cols == label)
        w = tl.full((BLOCK_C,), 1.0, MATH_DTYPE)
        if HAS_CLASS_WEIGHT:
            w = tl.load(class_weight_ptr + cols, mask=in_row, other=0.0).to(MATH_DTYPE)
        if HAS_DROP:
            if MODE != 0:
                is_drop = tl.load(drop_ptr + cols, mask=in_row, other=0) != 0
                dropped = foreground & is_drop & (cols != label)
                if MODE == 2:
                    # Element e = i*C + j uses word e & 3 of Philox call e >> 2.
                    group = flat >> 2
                    c0 = (group & 0xFFFFFFFF).to(tl.uint32)
                    c1 = (group >> 32).to(tl.uint32)
                    c2 = (group * 0 + offset_lo).to(tl.uint32)
                    c3 = (group * 0 + offset_hi).to(tl.uint32)
                    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3)
                    word = flat & 3
                    bits = tl.where(word == 0, r0, tl.where(word == 1, r1, tl.where(word == 2, r2, r3)))
                    u = (bits >> 8).to(tl.float32) * 5.9604644775390625e-08
                    dropped = dropped | (background & is_drop & (u > ratio))
                w = tl.where(dropped, 0.0, w)
        loss, grad = _element_loss_grad(q, positive, lo, hi, ACTIVATION_GUMBEL, GRAD_EXACT)
        keep = in_row & valid
        weighted = tl.where(keep, w * loss * row_w, 0.0)
        total += weighted
        if NEED_GRAD:
            g = tl.where(keep, w * grad * (row_w * scale), 0.0)
            tl.store(grad_ptr + flat, g.to(grad_ptr.dtype.element_ty), mask=in_row)
        if STORE_LOSS:
            tl.store(loss_ptr + flat, weighted.to(loss_ptr.dtype.element_ty), mask=in_row)
    tl.store(partials_ptr + row, tl.sum(total, axis=0))


@triton.jit
def _scale_grad_kernel(grad_ptr, scale_ptr, numel, BLOCK: tl.constexpr):
    # The backward of the fused loss; for the usual upstream gradient of 1 (checked here, on
    # the device) nothing is read or written.
    s = tl.load(scale_ptr).to(tl.float32)
    if s != 1.0:
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < numel
        g = tl.load(grad_ptr + offsets, mask=mask, other=0.0)
        tl.store(grad_ptr + offsets, (g.to(tl.float32) * s).to(grad_ptr.dtype.element_ty),
                 mask=mask)


_MODES = {"bce": 0, "eql": 1, "droploss": 2}


def _label_statistics(labels: torch.Tensor, num_classes: int, ignore_index: int,
                      drop_classes: Optional[torch.Tensor]) -> torch.Tensor:
    """int64 [#valid rows, #foreground rows, #foreground rows of a drop class], on the device."""
    valid = labels != ignore_index
    foreground = valid & (labels >= 0) & (labels < num_classes)
    if drop_classes is None:
        fg_drop = torch.zeros((), dtype=torch.int64, device=labels.device)
    else:
        safe = torch.where(foreground, labels, torch.zeros_like(labels))
        fg_drop = (foreground & drop_classes[safe]).sum()
    return torch.stack([valid.sum(), foreground.sum(), fg_drop]).to(torch.int64)


def gol_loss_forward(logits: torch.Tensor, labels: torch.Tensor,
                     drop_classes: Optional[torch.Tensor], class_weight: Optional[torch.Tensor],
                     row_weight: Optional[torch.Tensor], seed: torch.Tensor, offset: int,
                     mode: str, activation: str, reduction: str, clamp_min: Optional[float],
                     clamp_max: Optional[float], grad_mode: str, ignore_index: int,
                     need_grad: bool):
    """The fused forward (gumbel_kernels/INTERFACES.md): (loss, d loss / d logits)."""
    n, num_classes = logits.shape
    math_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if reduction == "none":
        loss = torch.empty_like(logits)
    else:
        loss = torch.empty((), dtype=math_dtype, device=logits.device)
    grad = torch.empty_like(logits) if need_grad else logits.new_empty(0)
    if n == 0:
        if reduction != "none":
            loss.zero_()
        return loss, grad
    stats = _label_statistics(labels, num_classes, ignore_index, drop_classes)
    partials = torch.empty(n, dtype=math_dtype, device=logits.device)
    seed_value = int(seed.reshape(-1)[0])
    offset &= (1 << 64) - 1
    block_c = min(triton.next_power_of_2(num_classes), MAX_BLOCK_C)
    dummy = partials  # stands in for absent optional pointers (never read: constexpr flags)
    _gol_loss_kernel[(n,)](
        logits, labels,
        drop_classes if drop_classes is not None else dummy,
        class_weight if class_weight is not None else dummy,
        row_weight if row_weight is not None else dummy,
        stats, grad if need_grad else dummy, loss if reduction == "none" else dummy, partials,
        num_classes, ignore_index, seed_value, offset & 0xFFFFFFFF, offset >> 32,
        float("-inf") if clamp_min is None else float(clamp_min),
        float("inf") if clamp_max is None else float(clamp_max),
        MODE=_MODES[mode], ACTIVATION_GUMBEL=activation == "gumbel",
        GRAD_EXACT=grad_mode == "exact", MEAN=reduction == "mean",
        HAS_DROP=drop_classes is not None, HAS_CLASS_WEIGHT=class_weight is not None,
        HAS_ROW_WEIGHT=row_weight is not None, NEED_GRAD=need_grad,
        STORE_LOSS=reduction == "none",
        MATH_DTYPE=tl.float64 if math_dtype == torch.float64 else tl.float32,
        BLOCK_C=block_c)
    if reduction != "none":
        total = partials.sum(dtype=torch.float64)  # a fixed-order reduction of fixed partials
        if reduction == "mean":
            total = total / stats[0].clamp(min=1).to(torch.float64)
        loss.copy_(total)
    return loss, grad


def scale_grad_(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    """grad *= grad_output in place; a scalar upstream gradient of 1 is skipped on the device."""
    if grad_output.numel() != 1:
        grad.mul_(grad_output)
        return
    numel = grad.numel()
    if numel == 0:
        return
    block = 1024
    scale = grad_output.reshape(1).to(device=grad.device)
    _scale_grad_kernel[(triton.cdiv(numel, block),)](grad, scale, numel, BLOCK=block)
