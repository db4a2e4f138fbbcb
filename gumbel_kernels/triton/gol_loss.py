"""Triton backend of gumbel::gol_loss: one fused pass computing the GOL loss and its gradient.

Reads top-down (Liger-Kernel's file shape): element math, the kernels, the launcher registered
as the op `gumbel_triton::gol_loss` (torch.library.triton_op: a fake kernel, opcheck and
torch.compile(fullgraph=True) see through it), the fused-forward entry point `gol_loss_forward`
(the contract of gumbel_kernels/INTERFACES.md, the semantics of
gumbel_kernels.reference.gol_loss_forward) and `scale_grad_` (the backward).

A call is three launches on the tensors' device, and no host synchronisation but the optional
label check:
1. `_row_statistics_kernel` (one program) counts the non-ignored rows, the foreground rows and
   the foreground rows of a drop class, finds the first out-of-range label, and divides the
   DropLoss ratio with IEEE rounding (the drop mask must be bit-identical to the reference's).
2. `_gol_loss_kernel` walks the flat N*C elements in tiles of TILE = 4 * GROUPS (one launch
   over the whole tiles, unmasked, one program for a partial last tile), as a [GROUPS, 4] block: each row of the block is one group of four flat elements, the unit of one
   Philox call (SPEC.md section 4) and one 128-bit load. A tile spans at most two rows when
   TILE <= C (the row and its label are a compare and a select per element; smaller C takes a
   division), the Philox words are picked per element from the group's own call (no
   shuffle), Philox runs only in tiles with a background row, and every mode, activation,
   clamp kind and weight switch is a compile-time constant. One loss partial per tile.
3. `_finalize_kernel` (one program) sums the partials in a fixed order in float64: no atomics,
   so a call is bit-reproducible.
Labels outside [0, C] give NaN rows on the device; `gol_loss_forward` raises for them on the
host (one 8-byte read) unless compiling, capturing a CUDA graph, or GUMBEL_CUDA_CHECK_LABELS=0.

Numerics: float32 math for half/float32 logits, float64 for float64. No libdevice calls and no
tl.math.log1p/expm1 (the interpreter has neither). In float32 there is no log at all: the
bounded clamps (inside [-4, 27], the GOL default) take csrc/gol_math.h's bounded path, the
others its series path; exp is exp2 of a product whose rounding error is carried (tl.exp alone
rounds x * log2(e) first, |x| ulp for the large |x| of p = exp(-t)). Under TRITON_INTERPRET=1
(set before this module is imported) the kernels run on CPU tensors.
"""
from __future__ import annotations

import math
import os
import struct
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
LARGEST_FINITE = tl.constexpr(3.4028234663852886e38)  # caps t where p t must not be 0 * inf
LOG2E = tl.constexpr(1.4426950216293335)       # float32(log2(e))
LOG2E_LO = tl.constexpr(1.925963033500011e-08)  # log2(e) - float32(log2(e))
LN2 = tl.constexpr(0.6931471805599453)
# Clamps inside these bounds take the bounded path (csrc/gol_math.h, kBoundedClamp*).
BOUNDED_CLAMP = (-4.0, 27.0)
MAX_TILE = 1024  # flat elements per program: 8 per thread with 4 warps
NARROW_TILE = 256  # C < MAX_TILE
STATS_BLOCK = 1024
FINALIZE_BLOCK = 1024
SCALE_BLOCK = 1024
NO_BAD_LABEL = 2 ** 63 - 1
CHECK_LABELS_ENV = "GUMBEL_CUDA_CHECK_LABELS"

_DROP_MODES = {"bce": 0, "eql": 1, "droploss": 2}
_MASK64 = (1 << 64) - 1


# ------------------------------------------------------------------------------------------
# Element math.

@triton.jit
def _horner4(x, c0, c1, c2, c3):
    return ((c0 * x + c1) * x + c2) * x + c3


@triton.jit
def _exp(x):
    """exp(x) in float32 within ~2 ulp: exp2 of y = x * log2(e), times the first-order
    correction for the rounding error of y (and of the log2(e) constant)."""
    y = x * LOG2E
    error = tl.fma(x, LOG2E, -y) + x * LOG2E_LO
    # Past |y| = 256 the result is 0 or inf anyway, and an infinite x would make error NaN.
    error = tl.where(tl.abs(y) < 256.0, error, 0.0)
    return tl.exp2(y) * (1.0 + error * LN2)


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
    """log(1 + x) for x > -1 (float64 path): the rounding of u = 1 + x cancels in
    log(u) * x / (u - 1)."""
    u = 1.0 + x
    d = u - 1.0
    return tl.where(d == 0.0, x, tl.log(u) * x / tl.where(d == 0.0, 1.0, d))


@triton.jit
def _cap(loss):
    # min(loss, 100) that keeps a NaN (tl.minimum may drop it).
    return tl.where(loss > LOSS_CAP, LOSS_CAP, loss)


@triton.jit
def _clamp(q, lo, hi):
    qc = tl.where(q < lo, lo, q)
    return tl.where(qc > hi, hi, qc)


@triton.jit
def _small_t_series(qc, t):
    """t < 1: -log(1 - e^-t) = qc + u - log(sinh(u) / u) (u = t / 2, a series in u^2) and
    p t / (1 - p) = t / (e^t - 1), the Bernoulli series in t^2 (csrc/gol_math.h)."""
    u = t * 0.5
    u2 = u * u
    loss = qc + u - _horner4(u2, -1.0 / 37800.0, 1.0 / 2835.0, -1.0 / 180.0, 1.0 / 6.0) * u2
    t2 = t * t
    grad = tl.fma(_horner4(t2, -1.0 / 1209600.0, 1.0 / 30240.0, -1.0 / 720.0, 1.0 / 12.0), t2,
                  1.0 - u)
    return loss, grad


@triton.jit
def _gumbel_bounded(q, positive, lo, hi, GRAD_EXACT: tl.constexpr):
    """float32, a clamp inside [-4, 27]: t = exp(-qc) in [1.9e-12, 54.6], so nothing over- or
    underflows, the loss stays below its cap and BCE's eps bites only through p < 1e-12.
    t < 1: the series; t >= 1: -log(1 - p) = p Q(p) (csrc/gol_math.h's fitted polynomial) and
    p t / (1 - p) with one reciprocal. Positives: t, and -t (or BCE's dead zone)."""
    qc = _clamp(q, lo, hi)
    t = _exp(-qc)
    p = _exp(-t)
    loss_low, grad_low = _small_t_series(qc, t)
    q_poly = _horner4(p, _horner4(p, 0.574717104, -0.203410551, 0.288397342, 0.177490458),
                      0.252199203, 0.333229631, 0.500001848)
    loss_high = p * tl.fma(q_poly, p, 1.0)
    # 1 - p: >= 0.63 where the t >= 1 branch divides by it. For a positive, BCE's dead zone
    # p (1 - p) < eps needs p < 1/2 here (t >= 1.9e-12 keeps (1 - p) p above eps near p = 1),
    # where 1 - p has no cancellation either: no expm1 is needed.
    one_minus_p = 1.0 - p
    factor = 1.0 / one_minus_p
    pt = p * t
    grad_positive = -t
    if not GRAD_EXACT:
        factor = tl.where(p < BCE_EPS, p * INV_BCE_EPS, factor)
        dead_zone = -pt * one_minus_p * INV_BCE_EPS
        in_dead_zone = (p < 0.5) & (p * one_minus_p < BCE_EPS)
        grad_positive = tl.where(in_dead_zone, dead_zone, grad_positive)
    low = t < 1.0
    loss = tl.where(positive, t, tl.where(low, loss_low, loss_high))
    grad = tl.where(positive, grad_positive, tl.where(low, grad_low, pt * factor))
    return loss, grad


@triton.jit
def _gumbel_series(q, positive, lo, hi, GRAD_EXACT: tl.constexpr):
    """float32, any other clamp (csrc/gol_math.h's series path), t = exp(-qc) unbounded:
      t < 0.7:  _small_t_series;
      t >= 0.7: p <= 1/2 and -log(1 - p) = 2 atanh(s), s = p / (2 - p) <= 1/3, a series."""
    qc = _clamp(q, lo, hi)
    t = _exp(-qc)
    p = _exp(-t)
    loss_low, grad_low = _small_t_series(qc, t)
    a = 1.0 - p  # >= 1/2 where it is used, no cancellation
    b = 2.0 - p
    r = 1.0 / (a * b)
    loss_high = _two_atanh(p * a * r)  # s = p / (2 - p)
    # p t, capped so that it is 0 (its limit) rather than 0 * inf once t overflows.
    pt = p * tl.where(t > LARGEST_FINITE, LARGEST_FINITE, t)
    grad_high = pt * b * r             # p t / (1 - p)
    low = t < 0.7
    loss_negative = tl.where(low, loss_low, loss_high)
    grad_negative = tl.where(low, grad_low, grad_high)
    grad_positive = -t
    if not GRAD_EXACT:
        # BCE's eps: p (1 - p) < 1e-12 when p is tiny (q < -3.32) or when 1 - p ~ t is
        # (q > 27.6); below it BCE multiplies by 1 / eps (the positives' dead zone).
        grad_negative = tl.where(p < BCE_EPS, p * INV_BCE_EPS * pt, grad_negative)
        grad_negative = tl.where(t < BCE_EPS, t * INV_BCE_EPS, grad_negative)
        one_minus_p = _one_minus_exp_neg(t)
        grad_positive = tl.where(p * one_minus_p < BCE_EPS, -pt * one_minus_p * INV_BCE_EPS,
                                 grad_positive)
    loss = _cap(tl.where(positive, t, loss_negative))
    grad = tl.where(positive, grad_positive, grad_negative)
    return loss, grad


@triton.jit
def _gumbel_closed(q, positive, lo, hi, GRAD_EXACT: tl.constexpr):
    """The same in closed form (float64 path), as gumbel_kernels.reference writes it."""
    qc = _clamp(q, lo, hi)
    t = tl.exp(-qc)
    p = tl.exp(-t)
    one_minus_p = _one_minus_exp_neg(t)
    # -log(1 - p): once p <= 1/2 as -log1p(-p), since 1 - p rounds to 1 for t > 36.
    neg_log = tl.where(p < 0.5, -_log1p_closed(-p), -tl.log(one_minus_p))
    loss = _cap(tl.where(positive, t, neg_log))
    pt = p * tl.where(t > 1.7976931348623157e308, 1.7976931348623157e308, t)
    if GRAD_EXACT:
        grad = tl.where(positive, -t, pt / one_minus_p)
    else:
        # F.binary_cross_entropy's backward: (p - y) / max(p (1 - p), eps) * p t.
        denominator = p * one_minus_p
        denominator = tl.where(denominator < BCE_EPS, BCE_EPS, denominator)
        grad = tl.where(positive, -one_minus_p, p) / denominator * pt
    return loss, grad


@triton.jit
def _sigmoid_bce(q, positive, FLOAT64: tl.constexpr):
    """softplus(q) - y q and sigmoid(q) - y, from e = exp(-|q|) so that nothing overflows.

    A positive's terms are taken as softplus(-q) and -sigmoid(-q): the same values without the
    cancellation of softplus(q) - q and sigmoid(q) - 1 for large q.
    """
    if FLOAT64:
        e = tl.exp(-tl.abs(q))
        log1p_e = _log1p_closed(e)
    else:
        e = _exp(-tl.abs(q))
        log1p_e = _two_atanh(e / (2.0 + e))  # log(1 + e) = 2 atanh(e / (2 + e)), e <= 1
    r = 1.0 / (1.0 + e)
    sigmoid_q = tl.where(q < 0.0, e * r, r)
    sigmoid_minus_q = tl.where(q < 0.0, r, e * r)
    softplus_q = tl.where(q > 0.0, q, 0.0) + log1p_e
    softplus_minus_q = tl.where(q < 0.0, -q, 0.0) + log1p_e
    loss = tl.where(positive, softplus_minus_q, softplus_q)
    return loss, tl.where(positive, -sigmoid_minus_q, sigmoid_q)


@triton.jit
def _philox_uniforms(seed, first_group, offset_lo, offset_hi, GROUPS: tl.constexpr):
    """u of the flat elements 4 * first_group + [0, 4 * GROUPS), as a [GROUPS, 4] block.

    SPEC.md section 4: element e takes word (e & 3) of the Philox4x32-10 call with counter
    (lo32(e >> 2), hi32(e >> 2), lo32(offset), hi32(offset)) and key (lo32(seed), hi32(seed))
    (tl.philox splits a 64-bit seed into that key). Each group's call is made on a [GROUPS, 1]
    column, which broadcasts along the four elements its thread holds; u = (x >> 8) * 2^-24 is
    exact in float32.
    """
    group = first_group + tl.arange(0, GROUPS).to(tl.int64)[:, None]
    c0 = (group & 0xFFFFFFFF).to(tl.uint32)
    c1 = (group >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0) + offset_lo.to(tl.uint32)
    c3 = tl.zeros_like(c0) + offset_hi.to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3)
    word = tl.arange(0, 4)[None, :]
    bits = tl.where(word == 0, r0, tl.where(word == 1, r1, tl.where(word == 2, r2, r3)))
    return (bits >> 8).to(tl.float32) * 5.9604644775390625e-08


@triton.jit
def _float64_from_bits(bits):
    # A float64 scalar passed as its bit pattern: the interpreter and the compiler then agree on
    # it exactly (a float argument would be float32 in one and a Python float in the other).
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


# ------------------------------------------------------------------------------------------
# Kernels.

@triton.jit
def _row_statistics_kernel(labels_ptr, drop_ptr, counts_ptr, ratio_ptr, num_rows, num_classes,
                           ignore_index, HAS_DROP: tl.constexpr, BLOCK: tl.constexpr):
    # counts = [#non-ignored rows, #foreground rows, #foreground rows of a drop class, the
    # index of the first label outside [0, C] (NO_BAD_LABEL if none)].
    num_valid = tl.zeros([BLOCK], dtype=tl.int32)
    num_foreground = tl.zeros([BLOCK], dtype=tl.int32)
    num_foreground_drop = tl.zeros([BLOCK], dtype=tl.int32)
    first_bad = tl.full([BLOCK], 9223372036854775807, dtype=tl.int64)
    for start in range(0, num_rows, BLOCK):
        rows = start + tl.arange(0, BLOCK).to(tl.int64)
        in_range = rows < num_rows
        label = tl.load(labels_ptr + rows, mask=in_range, other=ignore_index)
        valid = in_range & (label != ignore_index)
        foreground = valid & (label >= 0) & (label < num_classes)
        bad = valid & ((label < 0) | (label > num_classes))
        num_valid += (valid & ~bad).to(tl.int32)
        num_foreground += foreground.to(tl.int32)
        first_bad = tl.minimum(first_bad, tl.where(bad, rows, 9223372036854775807))
        if HAS_DROP:
            # Only foreground labels index drop_classes: never an out-of-bounds read.
            safe_label = tl.where(foreground, label, 0)
            is_drop = tl.load(drop_ptr + safe_label, mask=foreground, other=0) != 0
            num_foreground_drop += (foreground & is_drop).to(tl.int32)
    fg_rows = tl.sum(num_foreground, axis=0)
    fg_drop_rows = tl.sum(num_foreground_drop, axis=0)
    tl.store(counts_ptr + 0, tl.sum(num_valid, axis=0).to(tl.int64))
    tl.store(counts_ptr + 1, fg_rows.to(tl.int64))
    tl.store(counts_ptr + 2, fg_drop_rows.to(tl.int64))
    tl.store(counts_ptr + 3, tl.min(first_bad, axis=0))
    # float32(fg_drop) / float32(fg), correctly rounded. With no foreground row GOL's ratio is
    # NaN and drops nothing; 1.0 does the same (u < 1) without a NaN.
    ratio = tl.math.div_rn(fg_drop_rows.to(tl.float32), tl.maximum(fg_rows, 1).to(tl.float32))
    tl.store(ratio_ptr, tl.where(fg_rows > 0, ratio, 1.0))


# The switches that change only which loads, stores and drops run are runtime arguments (a
# uniform branch, never specialised): only what changes the element math is a compile-time
# constant, so that every variant the launcher can request is compiled ahead of time in CI
# (tests/test_triton_aot.py) in a minute.
_RUNTIME_SWITCHES = ["drop_mode", "has_class_weight", "has_row_weight", "need_grad",
                     "store_loss", "mean"]


@triton.jit(do_not_specialize=["first_tile", "total", "num_rows", "num_classes", "ignore_index", "offset_lo",
                               "offset_hi", "lo_bits", "hi_bits", *_RUNTIME_SWITCHES])
def _gol_loss_kernel(logits_ptr, labels_ptr, drop_ptr, class_weight_ptr, row_weight_ptr,
                     counts_ptr, ratio_ptr, seed_ptr, grad_ptr, loss_ptr, partials_ptr,
                     first_tile, total, num_rows, num_classes, ignore_index, offset_lo,
                     offset_hi, lo_bits, hi_bits, drop_mode, has_class_weight, has_row_weight,
                     need_grad, store_loss, mean, GUMBEL: tl.constexpr, BOUNDED: tl.constexpr,
                     GRAD_EXACT: tl.constexpr, FLOAT64: tl.constexpr, WIDE_ROWS: tl.constexpr,
                     FULL: tl.constexpr, GROUPS: tl.constexpr):
    # drop_mode: 0 no drop, 1 eql (foreground rows), 2 droploss (and background rows).
    # WIDE_ROWS: TILE <= C, so a tile spans at most two rows. FULL: every element of the tile
    # exists (all tiles but a partial last one, which a second launch of one program does).
    TILE: tl.constexpr = 4 * GROUPS
    math_dtype = tl.float64 if FLOAT64 else tl.float32
    lo = _float64_from_bits(lo_bits).to(math_dtype)
    hi = _float64_from_bits(hi_bits).to(math_dtype)

    # int64 flat indices: N * C may exceed 2^31; the columns fit 32 bits.
    tile_index = first_tile + tl.program_id(0)
    start = tile_index.to(tl.int64) * TILE
    local = tl.arange(0, GROUPS)[:, None] * 4 + tl.arange(0, 4)[None, :]
    flat = start + local
    if FULL:
        in_range = tl.full([GROUPS, 4], 1, tl.int1)  # constant: the loads and stores unmasked
    else:
        in_range = flat < total
    first_row = start // num_classes
    first_col = (start - first_row * num_classes).to(tl.int32)
    if WIDE_ROWS:
        col = first_col + local
        second = col >= num_classes
        col = tl.where(second, col - num_classes, col)
        row = first_row + second.to(tl.int64)
        has_second = first_row + 1 < num_rows
        label_a = tl.load(labels_ptr + first_row)
        label_b = tl.load(labels_ptr + first_row + 1, mask=has_second, other=ignore_index)
        label = tl.where(second, label_b, label_a)
        tile_has_background = (label_a == num_classes) | (label_b == num_classes)
    else:
        offset = first_col + local
        row_step = offset // num_classes
        col = offset - row_step * num_classes
        row = first_row + row_step.to(tl.int64)
        label = tl.load(labels_ptr + row, mask=in_range, other=ignore_index)
        tile_has_background = tl.max((label == num_classes).to(tl.int32)) > 0

    valid = in_range & (label != ignore_index)
    bad = valid & ((label < 0) | (label > num_classes))
    foreground = valid & (label >= 0) & (label < num_classes)
    positive = foreground & (col == label)

    q = tl.load(logits_ptr + flat, mask=in_range, other=0.0).to(math_dtype)

    # w = (0 if dropped) * class weight * row weight, in the reference's order: 0 * w keeps a
    # NaN/Inf weight visible.
    w = tl.full([GROUPS, 4], 1.0, math_dtype)
    if has_class_weight != 0:
        w = tl.load(class_weight_ptr + col, mask=in_range, other=0.0).to(math_dtype)
    if drop_mode != 0:
        is_drop = tl.load(drop_ptr + col, mask=in_range, other=0) != 0
        # Foreground rows: a drop class's negatives weigh 0 (EQL and DropLoss).
        w = tl.where(foreground & is_drop & ~positive, w * 0.0, w)
        if drop_mode == 2:
            ratio = tl.load(ratio_ptr)
            if tile_has_background & (ratio < 1.0):
                seed = tl.load(seed_ptr)
                u = _philox_uniforms(seed, start >> 2, offset_lo, offset_hi, GROUPS)
                background = valid & (label == num_classes)
                w = tl.where(background & is_drop & (u > ratio), w * 0.0, w)
    if has_row_weight != 0:
        if WIDE_ROWS:
            weight_a = tl.load(row_weight_ptr + first_row)
            weight_b = tl.load(row_weight_ptr + first_row + 1, mask=has_second, other=0.0)
            w = w * tl.where(second, weight_b, weight_a).to(math_dtype)
        else:
            w = w * tl.load(row_weight_ptr + row, mask=in_range, other=0.0).to(math_dtype)

    if GUMBEL:
        if FLOAT64:
            loss, grad = _gumbel_closed(q, positive, lo, hi, GRAD_EXACT)
        elif BOUNDED:
            loss, grad = _gumbel_bounded(q, positive, lo, hi, GRAD_EXACT)
        else:
            loss, grad = _gumbel_series(q, positive, lo, hi, GRAD_EXACT)
        grad = tl.where((q > lo) & (q < hi), grad, 0.0)
    else:
        loss, grad = _sigmoid_bce(q, positive, FLOAT64)
    # A non-finite logit must surface (the clamp would hide it): q - q is 0 or NaN. A bad
    # label makes its row NaN (the host check reports it unless it is skipped).
    poison = tl.where(bad, float("nan"), q - q)
    keep = valid & ~bad
    weighted_loss = tl.where(valid, tl.where(keep, w * loss, 0.0) + poison, 0.0)
    tl.store(partials_ptr + tile_index, tl.sum(weighted_loss).to(tl.float64))
    if need_grad != 0:
        rows = tl.maximum(tl.load(counts_ptr), 1).to(math_dtype)
        scale = tl.where(mean != 0, 1.0 / rows, 1.0)
        weighted_grad = tl.where(valid, tl.where(keep, w * grad * scale, 0.0) + poison, 0.0)
        tl.store(grad_ptr + flat, weighted_grad.to(grad_ptr.dtype.element_ty), mask=in_range)
    if store_loss != 0:
        tl.store(loss_ptr + flat, weighted_loss.to(loss_ptr.dtype.element_ty), mask=in_range)


@triton.jit
def _finalize_kernel(partials_ptr, counts_ptr, loss_ptr, num_partials, MEAN: tl.constexpr,
                     BLOCK: tl.constexpr):
    # One program, a fixed summation order: the loss is the same bits run after run.
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, num_partials, BLOCK):
        index = start + tl.arange(0, BLOCK)
        acc += tl.load(partials_ptr + index, mask=index < num_partials, other=0.0)
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
    return max(1, min(4, block // 256))


def tile_size(num_classes: int) -> Tuple[int, bool]:
    """(TILE, WIDE_ROWS) for C columns: MAX_TILE flat elements when a tile spans at most two
    rows (C >= MAX_TILE: LVIS's 1203, V3Det's 13204), else NARROW_TILE with a division per
    element for the row."""
    return (MAX_TILE, True) if num_classes >= MAX_TILE else (NARROW_TILE, False)


def kernel_constants(dtype: torch.dtype, activation: str, clamp_min: Optional[float],
                     clamp_max: Optional[float], grad_mode: str, num_classes: int) -> dict:
    """The compile-time constants of _gol_loss_kernel for a call (with its pointer dtypes, the
    whole set of variants: tests/test_triton_aot.py compiles each)."""
    float64 = dtype == torch.float64
    gumbel = activation == "gumbel"
    bounded = (gumbel and not float64 and clamp_min is not None and clamp_max is not None
               and BOUNDED_CLAMP[0] <= clamp_min and clamp_max <= BOUNDED_CLAMP[1])
    tile, wide = tile_size(num_classes)
    return dict(GUMBEL=gumbel, BOUNDED=bounded, GRAD_EXACT=gumbel and grad_mode == "exact",
                FLOAT64=float64, WIDE_ROWS=wide, GROUPS=tile // 4, num_warps=_num_warps(tile))


def _float64_bits(value: Optional[float], default: float) -> int:
    return struct.unpack("<q", struct.pack("<d", default if value is None else float(value)))[0]


def _device_guard(tensor: torch.Tensor):
    """The tensors' device as the current one (Triton launches on the current device)."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return _NoGuard()


class _NoGuard:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_SCHEMA = ("(Tensor logits, Tensor labels, Tensor? drop_classes, Tensor? class_weight, "
           "Tensor? row_weight, Tensor seed, int offset, str mode, str activation, "
           "str reduction, float? clamp_min, float? clamp_max, str grad_mode, int ignore_index, "
           "bool need_grad) -> (Tensor, Tensor, Tensor)")


@torch.library.triton_op("gumbel_triton::gol_loss", mutates_args=(), schema=_SCHEMA)
def gol_loss_op(logits: torch.Tensor, labels: torch.Tensor,
                drop_classes: Optional[torch.Tensor], class_weight: Optional[torch.Tensor],
                row_weight: Optional[torch.Tensor], seed: torch.Tensor, offset: int, mode: str,
                activation: str, reduction: str, clamp_min: Optional[float],
                clamp_max: Optional[float], grad_mode: str, ignore_index: int,
                need_grad: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton fused forward as an op: (loss, grad, counts), counts the int64 row
    statistics [valid, foreground, foreground of a drop class, first bad label index] that the
    host label check reads. Inputs as gol_loss_forward takes them (contiguous, labels int64,
    weights in the math dtype); `seed` an int64 one-element tensor (copied to the device)."""
    n, num_classes = logits.shape
    device = logits.device
    float64 = logits.dtype == torch.float64
    math_dtype = torch.float64 if float64 else torch.float32
    loss = (torch.empty_like(logits) if reduction == "none"
            else torch.empty((), dtype=math_dtype, device=device))
    grad = torch.empty_like(logits) if need_grad else logits.new_empty(0)
    counts = torch.empty(4, dtype=torch.int64, device=device)
    total = n * num_classes
    if total == 0:
        if reduction != "none":
            loss.zero_()
        counts.copy_(torch.tensor([0, 0, 0, NO_BAD_LABEL]))
        return loss, grad, counts

    drop_mode = _DROP_MODES[mode] if drop_classes is not None else 0
    # Absent optional tensors are stood in for by tensors of the same dtypes (never read or
    # written: the runtime switches say so), so that their presence changes no kernel signature.
    weight_dummy = torch.empty(1, dtype=math_dtype, device=device)
    drop = (drop_classes.view(torch.uint8) if drop_classes is not None
            else torch.empty(1, dtype=torch.uint8, device=device))
    ratio = torch.empty((), dtype=torch.float32, device=device)
    with _device_guard(logits):
        torch.library.wrap_triton(_row_statistics_kernel)[(1,)](
            labels, drop, counts, ratio, n, num_classes, ignore_index,
            HAS_DROP=drop_classes is not None, BLOCK=STATS_BLOCK, num_warps=4)
        tile, wide = tile_size(num_classes)
        num_tiles = triton.cdiv(total, tile)
        partials = torch.empty(num_tiles, dtype=torch.float64, device=device)
        offset &= _MASK64
        arguments = (
            logits, labels, drop, class_weight if class_weight is not None else weight_dummy,
            row_weight if row_weight is not None else weight_dummy,
            counts, ratio, seed.to(device=device, dtype=torch.int64),
            grad if need_grad else logits, loss if reduction == "none" else logits, partials)
        scalars = (
            total, n, num_classes, ignore_index, offset & 0xFFFFFFFF, offset >> 32,
            _float64_bits(clamp_min, -math.inf), _float64_bits(clamp_max, math.inf),
            drop_mode, int(class_weight is not None), int(row_weight is not None),
            int(need_grad), int(reduction == "none"), int(reduction == "mean"))
        constants = kernel_constants(logits.dtype, activation, clamp_min, clamp_max, grad_mode,
                                     num_classes)
        full_tiles = total // tile
        if full_tiles:
            torch.library.wrap_triton(_gol_loss_kernel)[(full_tiles,)](
                *arguments, 0, *scalars, FULL=True, **constants)
        if full_tiles < num_tiles:
            torch.library.wrap_triton(_gol_loss_kernel)[(1,)](
                *arguments, full_tiles, *scalars, FULL=False, **constants)
        if reduction != "none":
            torch.library.wrap_triton(_finalize_kernel)[(1,)](
                partials, counts, loss, num_tiles, MEAN=reduction == "mean",
                BLOCK=FINALIZE_BLOCK, num_warps=4)
    return loss, grad, counts


@gol_loss_op.register_fake
def _gol_loss_op_fake(logits, labels, drop_classes, class_weight, row_weight, seed, offset,
                      mode, activation, reduction, clamp_min, clamp_max, grad_mode,
                      ignore_index, need_grad):
    math_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    loss = (torch.empty_like(logits) if reduction == "none"
            else logits.new_empty((), dtype=math_dtype))
    grad = torch.empty_like(logits) if need_grad else logits.new_empty(0)
    return loss, grad, logits.new_empty(4, dtype=torch.int64)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, grad_loss, _grad_of_grad, _grad_of_counts):
    from ..functional import refuse_double_backward
    refuse_double_backward("gumbel_triton::gol_loss")
    (grad,) = ctx.saved_tensors
    if grad.dim() != 2:
        raise RuntimeError("gumbel_triton::gol_loss was called with need_grad=False, so it "
                           "saved no gradient; call it with need_grad=True to differentiate it")
    return (grad * grad_loss).to(grad.dtype), *([None] * 14)


gol_loss_op.register_autograd(_backward, setup_context=_setup_context)


def _host_label_check_allowed(logits: torch.Tensor) -> bool:
    if os.environ.get(CHECK_LABELS_ENV, "1") == "0" or torch.compiler.is_compiling():
        return False
    return not (logits.is_cuda and torch.cuda.is_current_stream_capturing())


def raise_on_bad_label(counts: torch.Tensor, labels: torch.Tensor, num_classes: int,
                       ignore_index: int) -> None:
    """The host label check: one 8-byte read of the first bad label's index."""
    first_bad = int(counts[3])
    if first_bad != NO_BAD_LABEL:
        raise ValueError(
            f"gol_loss: labels[{first_bad}] = {int(labels[first_bad])} is out of range: "
            f"expected a class in [0, {num_classes - 1}], {num_classes} for background, or "
            f"ignore_index={ignore_index}")


def gol_loss_forward(logits: torch.Tensor, labels: torch.Tensor,
                     drop_classes: Optional[torch.Tensor], class_weight: Optional[torch.Tensor],
                     row_weight: Optional[torch.Tensor], seed: torch.Tensor, offset: int,
                     mode: str, activation: str, reduction: str, clamp_min: Optional[float],
                     clamp_max: Optional[float], grad_mode: str, ignore_index: int,
                     need_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The fused forward (gumbel_kernels/INTERFACES.md): (loss, d loss / d logits).

    Same semantics and argument conventions as gumbel_kernels.reference.gol_loss_forward;
    inputs arrive validated and contiguous (labels int64, weights in the math dtype, seed an
    int64 tensor of one element, on the CPU or on the logits' device). loss: 0-dim float32
    (float64 for float64 logits) for "mean"/"sum", (N, C) in the logits' dtype for "none";
    grad: (N, C) in the logits' dtype, or an empty tensor when need_grad is False.
    """
    offset &= _MASK64
    offset -= (offset >> 63) << 64  # the same 64 counter bits as the op's int64
    loss, grad, counts = gol_loss_op(logits, labels, drop_classes, class_weight, row_weight,
                                     seed, offset, mode, activation, reduction, clamp_min,
                                     clamp_max, grad_mode, ignore_index, need_grad)
    if logits.numel() and _host_label_check_allowed(logits):
        raise_on_bad_label(counts, labels, logits.shape[1], ignore_index)
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
    with _device_guard(grad):
        _scale_grad_kernel[(triton.cdiv(numel, SCALE_BLOCK),)](
            grad, scale, numel, FLOAT64=grad.dtype == torch.float64, BLOCK=SCALE_BLOCK,
            num_warps=4)
    return grad
