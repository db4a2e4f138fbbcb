"""Triton backend of gumbel::gol_loss: one fused pass computing the GOL loss and its gradient.

Reads top-down (Liger-Kernel's file shape): element math, the fused kernels, then the launchers
`gol_loss_forward` (the fused-forward contract of gumbel_kernels/INTERFACES.md, the same
semantics as gumbel_kernels.reference.gol_loss_forward) and `scale_grad_` (the backward).

A call is three small launches and no host synchronisation:
1. `_row_statistics_kernel` (one program) counts the non-ignored rows, the foreground rows and
   the foreground rows of a drop class, and divides the DropLoss ratio with IEEE rounding
   (`/` compiles to an approximate division on NVIDIA GPUs; the drop mask must be bit-identical
   to the reference's, so the ratio may not be off by an ulp).
2. `_gol_loss_kernel`, one program per row, walks the row in tiles aligned to groups of four
   flat elements, so that one `tl.philox` call serves the four elements e = 4g .. 4g+3 it
   belongs to (SPEC.md section 4), and only background rows draw at all. It writes the
   gradient, the "none" losses, and one loss partial per row.
3. `_finalize_kernel` (one program) sums the partials in a fixed order in float64 and divides
   by the row count for "mean": no atomics, so a call is bit-reproducible.

Numerics: float32 math for half/float32 logits, float64 for float64. No libdevice calls, no
tl.math.log1p/expm1 (the interpreter has neither), and in float32 no log at all: the Gumbel
negatives use the series forms of csrc/gol_math.h (`gumbel_negative_series`), which stay
accurate where a log near 1 would not (compiled tl.exp/tl.log are the fast approximations).
Under TRITON_INTERPRET=1 (set before this module is imported) the kernels run on CPU tensors.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

# torch.nn.functional.binary_cross_entropy, which GOL trains with, caps -log at 100 and divides
# its backward by max(p (1 - p), 1e-12); the contract keeps both. (Globals a @triton.jit
# function reads must be tl.constexpr: the interpreter does not check this, the compiler does.)
LOSS_CAP = tl.constexpr(100.0)
BCE_EPS = tl.constexpr(1e-12)
INV_BCE_EPS = tl.constexpr(1e12)
# Groups of four flat elements per tile of the fused kernel: 128 groups (512 elements) let a
# 1203-class row take three tiles with little masked waste.
MAX_BLOCK_GROUPS = 128
STATS_BLOCK = 1024
FINALIZE_BLOCK = 1024
SCALE_BLOCK = 1024

_DROP_MODES = {"bce": 0, "eql": 1, "droploss": 2}
_MASK64 = (1 << 64) - 1


# ------------------------------------------------------------------------------------------
# Element math.

@triton.jit
def _horner4(x, c0, c1, c2, c3):
    return ((c0 * x + c1) * x + c2) * x + c3


@triton.jit
def _two_atanh(s):
    """2 atanh(s) for 0 <= s <= 1/3, float32: the odd series to s^13 (relative error < 2e-8)."""
    s2 = s * s
    inner = _horner4(s2, 1.0 / 13.0, 1.0 / 11.0, 1.0 / 9.0, 1.0 / 7.0)
    return 2.0 * s * _horner4(s2, inner, 1.0 / 5.0, 1.0 / 3.0, 1.0)


@triton.jit
def _one_minus_exp_neg(t):
    """-expm1(-t) for t >= 0 without cancellation: below t = 1/4 the Taylor series to t^11
    (exact to float64 rounding there), above it 1 - exp(-t), which loses nothing."""
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
def _log1p_closed(x):
    """log(1 + x) for x >= 0 (float64 path): the rounding of u = 1 + x cancels in
    log(u) * x / (u - 1)."""
    u = 1.0 + x
    d = u - 1.0
    return tl.where(d == 0.0, x, tl.log(u) * x / tl.where(d == 0.0, 1.0, d))


@triton.jit
def _cap(loss):
    # min(loss, 100) that keeps a NaN (tl.minimum may drop it).
    return tl.where(loss > LOSS_CAP, LOSS_CAP, loss)


@triton.jit
def _gumbel_float32(q, positive, lo, hi, GRAD_EXACT: tl.constexpr):
    """Unweighted Gumbel loss and d loss / d q (SPEC.md section 2), float32 series forms.

    With qc = clamp(q), t = exp(-qc), p = exp(-t), u = t / 2 (csrc/gol_math.h):
      t < 0.7:  -log(1 - p) = qc + u - log(sinh(u) / u), the last a series in u^2, and
                p t / (1 - p) = t / (e^t - 1), the Bernoulli series in t;
      t >= 0.7: p <= 1/2 and -log(1 - p) = 2 atanh(s), s = p / (2 - p) <= 1/3, a series.
    """
    qc = tl.where(q < lo, lo, q)
    qc = tl.where(qc > hi, hi, qc)
    t = tl.exp(-qc)
    p = tl.exp(-t)
    u = t * 0.5
    u2 = u * u
    loss_low = qc + u - _horner4(u2, -1.0 / 37800.0, 1.0 / 2835.0, -1.0 / 180.0, 1.0 / 6.0) * u2
    t2 = t * t
    grad_low = _horner4(t2, -1.0 / 1209600.0, 1.0 / 30240.0, -1.0 / 720.0, 1.0 / 12.0) * t2 \
        + (1.0 - u)
    a = 1.0 - p  # >= 1/2 where it is used, no cancellation
    b = 2.0 - p
    r = 1.0 / (a * b)
    loss_high = _two_atanh(p * a * r)  # s = p / (2 - p)
    grad_high = p * t * b * r          # p t / (1 - p)
    low = t < 0.7
    loss_negative = tl.where(low, loss_low, loss_high)
    grad_negative = tl.where(low, grad_low, grad_high)
    grad_positive = -t
    if not GRAD_EXACT:
        # BCE's eps: p (1 - p) < 1e-12 when p is tiny (q < -3.32) or when 1 - p ~ t is
        # (q > 27.6); below it BCE multiplies by 1 / eps (the positives' dead zone).
        grad_negative = tl.where(p < BCE_EPS, p * p * t * INV_BCE_EPS, grad_negative)
        grad_negative = tl.where(t < BCE_EPS, t * INV_BCE_EPS, grad_negative)
        one_minus_p = _one_minus_exp_neg(t)
        grad_positive = tl.where(p * one_minus_p < BCE_EPS,
                                 grad_positive * p * one_minus_p * INV_BCE_EPS, grad_positive)
    loss = _cap(tl.where(positive, t, loss_negative))
    grad = tl.where(positive, grad_positive, grad_negative)
    inside = (q > lo) & (q < hi)
    return loss, tl.where(inside, grad, 0.0)


@triton.jit
def _gumbel_closed(q, positive, lo, hi, GRAD_EXACT: tl.constexpr):
    """The same in closed form (float64 path), as gumbel_kernels.reference writes it."""
    qc = tl.where(q < lo, lo, q)
    qc = tl.where(qc > hi, hi, qc)
    t = tl.exp(-qc)
    p = tl.exp(-t)
    one_minus_p = _one_minus_exp_neg(t)
    loss = _cap(tl.where(positive, t, -tl.log(one_minus_p)))
    pt = p * t
    if GRAD_EXACT:
        grad = tl.where(positive, -t, pt / one_minus_p)
    else:
        # F.binary_cross_entropy's backward: (p - y) / max(p (1 - p), eps) * p t.
        denominator = p * one_minus_p
        denominator = tl.where(denominator < BCE_EPS, BCE_EPS, denominator)
        grad = tl.where(positive, -one_minus_p, p) / denominator * pt
    inside = (q > lo) & (q < hi)
    return loss, tl.where(inside, grad, 0.0)


@triton.jit
def _sigmoid_bce(q, positive, FLOAT64: tl.constexpr):
    """softplus(q) - y q and sigmoid(q) - y, from e = exp(-|q|) so that nothing overflows.

    A positive's terms are taken as softplus(-q) and -sigmoid(-q): the same values without the
    cancellation of softplus(q) - q and sigmoid(q) - 1 for large q.
    """
    e = tl.exp(-tl.abs(q))
    if FLOAT64:
        log1p_e = _log1p_closed(e)
    else:
        log1p_e = _two_atanh(e / (2.0 + e))  # log(1 + e) = 2 atanh(e / (2 + e)), e <= 1
    r = 1.0 / (1.0 + e)
    sigmoid_q = tl.where(q < 0.0, e * r, r)
    sigmoid_minus_q = tl.where(q < 0.0, r, e * r)
    softplus_q = tl.where(q > 0.0, q, 0.0) + log1p_e
    softplus_minus_q = tl.where(q < 0.0, -q, 0.0) + log1p_e
    loss = tl.where(positive, softplus_minus_q, softplus_q)
    return loss, tl.where(positive, -sigmoid_minus_q, sigmoid_q)


@triton.jit
def _philox_uniforms(seed, first_group, offset_lo, offset_hi, BLOCK_GROUPS: tl.constexpr):
    """u of the 4 * BLOCK_GROUPS flat elements 4 * first_group + [0, 4 * BLOCK_GROUPS).

    SPEC.md section 4: element e takes word (e & 3) of the Philox4x32-10 call with counter
    (lo32(e >> 2), hi32(e >> 2), lo32(offset), hi32(offset)) and key (lo32(seed), hi32(seed))
    (tl.philox splits a 64-bit seed into that key). One call per group of four, its words
    interleaved back into flat order; u = (x >> 8) * 2^-24 is exact in float32.
    """
    group = first_group + tl.arange(0, BLOCK_GROUPS).to(tl.int64)
    zero = tl.zeros([BLOCK_GROUPS], dtype=tl.int64)
    c0 = (group & 0xFFFFFFFF).to(tl.uint32)
    c1 = (group >> 32).to(tl.uint32)
    c2 = (zero + offset_lo).to(tl.uint32)
    c3 = (zero + offset_hi).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3)
    # [g, a, b] = word 2a + b of group g, so the row-major flattening is flat element order.
    bits = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [4 * BLOCK_GROUPS])
    return (bits >> 8).to(tl.float32) * 5.9604644775390625e-08


# ------------------------------------------------------------------------------------------
# Kernels.

@triton.jit
def _row_statistics_kernel(labels_ptr, drop_ptr, counts_ptr, ratio_ptr, num_rows, num_classes,
                           ignore_index, HAS_DROP: tl.constexpr, BLOCK: tl.constexpr):
    # counts = [#non-ignored rows, #foreground rows, #foreground rows of a drop class].
    num_valid = tl.zeros([BLOCK], dtype=tl.int32)
    num_foreground = tl.zeros([BLOCK], dtype=tl.int32)
    num_foreground_drop = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, num_rows, BLOCK):
        rows = start + tl.arange(0, BLOCK)
        in_range = rows < num_rows
        label = tl.load(labels_ptr + rows, mask=in_range, other=ignore_index)
        valid = in_range & (label != ignore_index)
        foreground = valid & (label >= 0) & (label < num_classes)
        num_valid += valid.to(tl.int32)
        num_foreground += foreground.to(tl.int32)
        if HAS_DROP:
            # Only foreground labels index drop_classes: never an out-of-bounds read.
            safe_label = tl.where(foreground, label, 0)
            is_drop = tl.load(drop_ptr + safe_label, mask=foreground, other=0) != 0
            num_foreground_drop += (foreground & is_drop).to(tl.int32)
    valid_rows = tl.sum(num_valid, axis=0)
    fg_rows = tl.sum(num_foreground, axis=0)
    fg_drop_rows = tl.sum(num_foreground_drop, axis=0)
    tl.store(counts_ptr + 0, valid_rows.to(tl.int64))
    tl.store(counts_ptr + 1, fg_rows.to(tl.int64))
    tl.store(counts_ptr + 2, fg_drop_rows.to(tl.int64))
    # float32(fg_drop) / float32(fg), correctly rounded. With no foreground row GOL's ratio is
    # NaN and drops nothing; 1.0 does the same (u < 1) without a NaN.
    ratio = tl.math.div_rn(fg_drop_rows.to(tl.float32), tl.maximum(fg_rows, 1).to(tl.float32))
    tl.store(ratio_ptr, tl.where(fg_rows > 0, ratio, 1.0))


@triton.jit(do_not_specialize=["ignore_index", "seed", "offset_lo", "offset_hi"])
def _gol_loss_kernel(logits_ptr, labels_ptr, drop_ptr, class_weight_ptr, row_weight_ptr,
                     counts_ptr, ratio_ptr, bounds_ptr, grad_ptr, loss_ptr, partials_ptr,
                     num_classes, ignore_index, seed, offset_lo, offset_hi, lo, hi,
                     DROP_MODE: tl.constexpr, GUMBEL: tl.constexpr, GRAD_EXACT: tl.constexpr,
                     MEAN: tl.constexpr, HAS_CLASS_WEIGHT: tl.constexpr,
                     HAS_ROW_WEIGHT: tl.constexpr, NEED_GRAD: tl.constexpr,
                     STORE_LOSS: tl.constexpr, FLOAT64: tl.constexpr,
                     BLOCK_GROUPS: tl.constexpr):
    # DROP_MODE: 0 no drop, 1 eql (foreground rows), 2 droploss (and background rows).
    BLOCK: tl.constexpr = 4 * BLOCK_GROUPS
    if FLOAT64:
        math_dtype = tl.float64
        lo = tl.load(bounds_ptr + 0)  # float64 bounds: a float argument would be float32
        hi = tl.load(bounds_ptr + 1)
    else:
        math_dtype = tl.float32
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    foreground = valid & (label >= 0) & (label < num_classes)
    background = valid & (label == num_classes)

    row_scale = tl.full((), 1.0, math_dtype)
    if HAS_ROW_WEIGHT:
        row_scale = tl.load(row_weight_ptr + row).to(math_dtype)
    if MEAN:
        inv_rows = 1.0 / tl.maximum(tl.load(counts_ptr), 1).to(math_dtype)
    if DROP_MODE == 2:
        ratio = tl.load(ratio_ptr)

    # int64 flat indices throughout: N * C may exceed 2^31. Tiles start on a group of four
    # flat elements, the unit of one Philox call.
    row_start = row * num_classes
    first_group = row_start >> 2
    num_groups = ((row_start + num_classes + 3) >> 2) - first_group
    total = tl.zeros([BLOCK], dtype=math_dtype)
    for tile in range(0, num_groups, BLOCK_GROUPS):
        tile_group = first_group + tile
        flat = tile_group * 4 + tl.arange(0, BLOCK).to(tl.int64)
        cols = flat - row_start
        in_row = (cols >= 0) & (cols < num_classes)
        # bf16/fp16 arithmetic is not available everywhere (the interpreter): convert at once.
        q = tl.load(logits_ptr + flat, mask=in_row, other=0.0).to(math_dtype)
        positive = foreground & (cols == label)
        if HAS_CLASS_WEIGHT:
            w = tl.load(class_weight_ptr + cols, mask=in_row, other=0.0).to(math_dtype)
        else:
            w = tl.full([BLOCK], 1.0, math_dtype)
        w = w * row_scale
        if DROP_MODE != 0:
            is_drop = tl.load(drop_ptr + cols, mask=in_row, other=0) != 0
            # Foreground rows: a drop class's negatives weigh 0 (EQL and DropLoss).
            w = tl.where(foreground & is_drop & (cols != label), 0.0, w)
            if DROP_MODE == 2:
                if background:
                    u = _philox_uniforms(seed, tile_group, offset_lo, offset_hi, BLOCK_GROUPS)
                    w = tl.where(is_drop & (u > ratio), 0.0, w)

        if GUMBEL:
            if FLOAT64:
                loss, grad = _gumbel_closed(q, positive, lo, hi, GRAD_EXACT)
            else:
                loss, grad = _gumbel_float32(q, positive, lo, hi, GRAD_EXACT)
        else:
            loss, grad = _sigmoid_bce(q, positive, FLOAT64)
        # A non-finite logit must surface (the clamp would hide it): q - q is 0 or NaN.
        poison = q - q
        keep = in_row & valid
        weighted_loss = tl.where(keep, w * (loss + poison), 0.0)
        total += weighted_loss
        if NEED_GRAD:
            weighted_grad = tl.where(keep, w * (grad + poison), 0.0)
            if MEAN:
                weighted_grad = weighted_grad * inv_rows
            tl.store(grad_ptr + flat, weighted_grad.to(grad_ptr.dtype.element_ty), mask=in_row)
        if STORE_LOSS:
            tl.store(loss_ptr + flat, weighted_loss.to(loss_ptr.dtype.element_ty), mask=in_row)
    tl.store(partials_ptr + row, tl.sum(total, axis=0))


@triton.jit
def _finalize_kernel(partials_ptr, counts_ptr, loss_ptr, num_rows, MEAN: tl.constexpr,
                     BLOCK: tl.constexpr):
    # One program, a fixed summation order: the loss is the same bits run after run.
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, num_rows, BLOCK):
        rows = start + tl.arange(0, BLOCK)
        acc += tl.load(partials_ptr + rows, mask=rows < num_rows, other=0.0).to(tl.float64)
    total = tl.sum(acc, axis=0)
    if MEAN:
        total = total / tl.maximum(tl.load(counts_ptr), 1).to(tl.float64)
    tl.store(loss_ptr, total.to(loss_ptr.dtype.element_ty))


@triton.jit
def _scale_grad_kernel(grad_ptr, scale_ptr, numel, FLOAT64: tl.constexpr, BLOCK: tl.constexpr):
    # The backward of the fused loss. The usual upstream gradient of 1 is recognised here, on
    # the device (no host sync): then nothing is read or written.
    if FLOAT64:
        s = tl.load(scale_ptr).to(tl.float64)
    else:
        s = tl.load(scale_ptr).to(tl.float32)
    if s != 1.0:
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < numel
        g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(s.dtype)
        tl.store(grad_ptr + offsets, (g * s).to(grad_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------
# Launchers.

def _num_warps(block: int) -> int:
    return max(1, min(8, block // 128))


def gol_loss_forward(logits: torch.Tensor, labels: torch.Tensor,
                     drop_classes: Optional[torch.Tensor], class_weight: Optional[torch.Tensor],
                     row_weight: Optional[torch.Tensor], seed: torch.Tensor, offset: int,
                     mode: str, activation: str, reduction: str, clamp_min: Optional[float],
                     clamp_max: Optional[float], grad_mode: str, ignore_index: int,
                     need_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The fused forward (gumbel_kernels/INTERFACES.md): (loss, d loss / d logits).

    Same semantics and argument conventions as gumbel_kernels.reference.gol_loss_forward;
    inputs arrive validated and contiguous (labels int64, weights in the math dtype, seed an
    int64 CPU tensor of one element). loss: 0-dim float32 (float64 for float64 logits) for
    "mean"/"sum", (N, C) in the logits' dtype for "none"; grad: (N, C) in the logits' dtype,
    or an empty tensor when need_grad is False. Nothing waits on the device.
    """
    n, num_classes = logits.shape
    device = logits.device
    float64 = logits.dtype == torch.float64
    math_dtype = torch.float64 if float64 else torch.float32
    if reduction == "none":
        loss = torch.empty_like(logits)
    else:
        loss = torch.empty((), dtype=math_dtype, device=device)
    grad = torch.empty_like(logits) if need_grad else logits.new_empty(0)
    if logits.numel() == 0:
        if reduction != "none":
            loss.zero_()
        if need_grad:
            grad.zero_()
        return loss, grad

    drop_mode = _DROP_MODES[mode] if drop_classes is not None else 0
    drop = drop_classes.view(torch.uint8) if drop_classes is not None else None
    counts = torch.empty(3, dtype=torch.int64, device=device)
    ratio = torch.empty((), dtype=torch.float32, device=device)
    if reduction == "mean" or drop_mode == 2:
        _row_statistics_kernel[(1,)](
            labels, drop if drop is not None else labels, counts, ratio, n, num_classes,
            ignore_index, HAS_DROP=drop is not None, BLOCK=STATS_BLOCK, num_warps=4)

    lo = float("-inf") if clamp_min is None else float(clamp_min)
    hi = float("inf") if clamp_max is None else float(clamp_max)
    # float64 logits clamp at the float64 bounds (a float kernel argument is float32).
    bounds = torch.tensor([lo, hi], dtype=torch.float64, device=device) if float64 else counts
    partials = torch.empty(n, dtype=math_dtype, device=device)
    seed_value = int(seed.reshape(-1)[0]) & _MASK64  # the key words lo32/hi32 of the seed
    offset &= _MASK64
    groups_per_row = (num_classes + 6) // 4  # a row spans at most this many groups of four
    block_groups = min(triton.next_power_of_2(groups_per_row), MAX_BLOCK_GROUPS)
    unused = partials  # stands in for absent optional pointers (never read: constexpr flags)
    _gol_loss_kernel[(n,)](
        logits, labels, drop if drop is not None else unused,
        class_weight if class_weight is not None else unused,
        row_weight if row_weight is not None else unused,
        counts, ratio, bounds, grad if need_grad else unused,
        loss if reduction == "none" else unused, partials,
        num_classes, ignore_index, seed_value, offset & 0xFFFFFFFF, offset >> 32, lo, hi,
        DROP_MODE=drop_mode, GUMBEL=activation == "gumbel", GRAD_EXACT=grad_mode == "exact",
        MEAN=reduction == "mean", HAS_CLASS_WEIGHT=class_weight is not None,
        HAS_ROW_WEIGHT=row_weight is not None, NEED_GRAD=need_grad,
        STORE_LOSS=reduction == "none", FLOAT64=float64, BLOCK_GROUPS=block_groups,
        num_warps=_num_warps(4 * block_groups))
    if reduction != "none":
        _finalize_kernel[(1,)](partials, counts, loss, n, MEAN=reduction == "mean",
                               BLOCK=FINALIZE_BLOCK, num_warps=4)
    return loss, grad


def scale_grad_(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """grad *= grad_output in place (the backward of the fused loss); returns grad.

    grad_output is a 0-dim (or one-element) upstream gradient, or one of grad's shape. For a
    scalar the "is it 1?" test happens on the device inside the kernel: no host sync.
    """
    if grad_output.numel() != 1:
        return grad.mul_(grad_output)
    numel = grad.numel()
    if numel == 0:
        return grad
    scale = grad_output.reshape(1).to(device=grad.device)
    _scale_grad_kernel[(triton.cdiv(numel, SCALE_BLOCK),)](
        grad, scale, numel, FLOAT64=grad.dtype == torch.float64, BLOCK=SCALE_BLOCK, num_warps=4)
    return grad
