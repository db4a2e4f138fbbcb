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

from .. import _ops, reference

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
MAX_TILE = 1024  # flat elements per tile: 4 per thread (one Philox group) with 8 warps
NARROW_TILE = 256  # C < MAX_TILE
MAX_PROGRAMS = 1024  # of the fused kernel (each walks consecutive tiles)
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
def _exp_neg_small(x):
    """exp(-x) for |x| <= 27 (t = exp(-qc) of a bounded clamp): _exp without log2(e)'s own
    rounding error, which matters only where t is tiny (csrc/gol_math.h, exp_neg_small)."""
    y = x * LOG2E
    error = tl.fma(x, LOG2E, -y)
    power = tl.exp2(-y)
    return tl.fma(power * error, -LN2, power)


@triton.jit
def _exp_neg_bounded(x):
    """exp(-x) for 0 < x <= 55 (p = exp(-t) of a bounded clamp): _exp without its guard for
    infinite arguments, which cannot occur here (csrc/gol_math.h, exp_neg_bounded)."""
    y = x * LOG2E
    error = tl.fma(x, LOG2E_LO, tl.fma(x, LOG2E, -y))
    power = tl.exp2(-y)
    return tl.fma(power * error, -LN2, power)


@triton.jit
def _gumbel_bounded(q, lo, hi, GRAD_EXACT: tl.constexpr, POSITIVES: tl.constexpr, positive):
    """float32, a clamp inside [-4, 27]: t = exp(-qc) in [1.9e-12, 54.6], so nothing over- or
    underflows, the loss stays below its cap and BCE's eps bites only through p < 1e-12.
    t < 1: the series; t >= 1: -log(1 - p) = p Q(p) (csrc/gol_math.h's fitted polynomial) and
    p t / (1 - p) with one reciprocal. POSITIVES: `positive` marks elements with y = 1 (t, and
    -t or BCE's dead zone); without, all are negatives (a tile of background rows).
    The clamp drops a NaN (min/max): the caller's poison term q - q surfaces it."""
    qc = tl.minimum(tl.maximum(q, lo), hi)
    t = _exp_neg_small(qc)
    p = _exp_neg_bounded(t)
    loss_low, grad_low = _small_t_series(qc, t)
    q_poly = _horner4(p, _horner4(p, 0.574717104, -0.203410551, 0.288397342, 0.177490458),
                      0.252199203, 0.333229631, 0.500001848)
    loss_high = p * tl.fma(q_poly, p, 1.0)
    # 1 - p: >= 0.63 where the t >= 1 branch divides by it. For a positive, BCE's dead zone
    # p (1 - p) < eps needs p < 1/2 here (t >= 1.9e-12 keeps (1 - p) p above eps near p = 1),
    # where 1 - p has no cancellation either: no expm1 is needed.
    one_minus_p = 1.0 - p
    # 1 / (1 - p) as rsqrt((1 - p)^2): one MUFU.RSQ (about 2 ulp) where a division adds range
    # fix-ups that 1 - p in [0.63, 1] never needs (the CUDA kernel uses rcp.approx alike).
    factor = tl.math.rsqrt(one_minus_p * one_minus_p)
    pt = p * t
    if not GRAD_EXACT:
        factor = tl.where(p < BCE_EPS, p * INV_BCE_EPS, factor)
    low = t < 1.0
    loss = tl.where(low, loss_low, loss_high)
    grad = tl.where(low, grad_low, pt * factor)
    if POSITIVES:
        grad_positive = -t
        if not GRAD_EXACT:
            dead_zone = -pt * one_minus_p * INV_BCE_EPS
            in_dead_zone = (p < 0.5) & (p * one_minus_p < BCE_EPS)
            grad_positive = tl.where(in_dead_zone, dead_zone, grad_positive)
        loss = tl.where(positive, t, loss)
        grad = tl.where(positive, grad_positive, grad)
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
def _philox_round_keys(seed):
    """The ten round keys (k0_r, k1_r) of Philox4x32-10 for a 64-bit seed (key = (lo32, hi32)),
    computed once per program: tl.philox would add them up again in every call."""
    seed = seed.to(tl.uint64)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    keys = (k0, k1)
    for _ in tl.static_range(9):
        k0 = tl.add(k0, 0x9E3779B9, sanitize_overflow=False)
        k1 = tl.add(k1, 0xBB67AE85, sanitize_overflow=False)
        keys = keys + (k0, k1)
    return keys


@triton.jit
def _philox_words(keys, first_group, offset_lo, offset_hi, GROUPS: tl.constexpr):
    """The Philox words of the flat elements 4 * first_group + [0, 4 * GROUPS), as a
    [GROUPS, 4] block: element e takes word (e & 3) of the Philox4x32-10 call with counter
    (lo32(e >> 2), hi32(e >> 2), lo32(offset), hi32(offset)) and the seed's round keys
    (SPEC.md section 4; the rounds of tl.philox, Random123's). Each group's call is made on a
    [GROUPS, 1] column, which broadcasts along the four elements its thread holds."""
    group = first_group + tl.arange(0, GROUPS).to(first_group.dtype)[:, None]
    if first_group.dtype == tl.int64:
        c0 = (group & 0xFFFFFFFF).to(tl.uint32)
        c1 = (group >> 32).to(tl.uint32)
    else:  # 32-bit flat indices (N * C < 2^31): the counter's high word is 0
        c0 = group.to(tl.uint32)
        c1 = tl.zeros_like(c0)
    c2 = tl.zeros_like(c0) + offset_lo.to(tl.uint32)
    c3 = tl.zeros_like(c0) + offset_hi.to(tl.uint32)
    for r in tl.static_range(10):
        previous_c0, previous_c2 = c0, c2
        c0 = tl.math.umulhi(0xCD9E8D57, previous_c2) ^ c1 ^ keys[2 * r]
        c2 = tl.math.umulhi(0xD2511F53, previous_c0) ^ c3 ^ keys[2 * r + 1]
        c1 = tl.mul(0xCD9E8D57, previous_c2, sanitize_overflow=False)
        c3 = tl.mul(0xD2511F53, previous_c0, sanitize_overflow=False)
    word = tl.arange(0, 4)[None, :]
    return tl.where(word == 0, c0, tl.where(word == 1, c1, tl.where(word == 2, c2, c3)))


@triton.jit
def _philox_uniforms(seed, first_group, offset_lo, offset_hi, GROUPS: tl.constexpr):
    """u = (x >> 8) 2^-24 of _philox_words' words: exact in float32, in [0, 1)."""
    bits = _philox_words(_philox_round_keys(seed), first_group, offset_lo, offset_hi, GROUPS)
    return (bits >> 8).to(tl.float32) * 5.9604644775390625e-08


@triton.jit
def _row_code(label, num_classes, ignore_index):
    """A row's kind in one int32: its positive column (a foreground row), -1 a background row,
    -2 an ignored row, -3 a bad label (outside [0, C]: its row is NaN)."""
    bad = (label < 0) | (label > num_classes)
    code = tl.where(label == num_classes, -1, label)
    code = tl.where(bad, -3, code)
    code = tl.where(label == ignore_index, -2, code)
    return code.to(tl.int32)


@triton.jit
def _threshold_bits(ratio):
    """u = (x >> 8) 2^-24 > ratio for a Philox word x, as x > this (csrc/cuda/gol_kernels.cuh,
    drop_threshold_bits): ratio 2^24 is exact, floor(ratio 2^24) 2^8 + 255."""
    top = (ratio * 16777216.0).to(tl.uint32)
    return (top << 8) | 0xFF


@triton.jit
def _float64_from_bits(bits):
    # A float64 scalar passed as its bit pattern: the interpreter and the compiler then agree on
    # it exactly (a float argument would be float32 in one and a Python float in the other).
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


# ------------------------------------------------------------------------------------------
# Kernels.

@triton.jit
def _row_statistics_kernel(labels_ptr, drop_ptr, counts_ptr, ratio_ptr, codes_ptr,
                           thresholds_ptr, num_rows, num_classes, ignore_index,
                           HAS_DROP: tl.constexpr, BLOCK: tl.constexpr):
    # counts = [#non-ignored rows, #foreground rows, #foreground rows of a drop class, the
    # index of the first label outside [0, C] (NO_BAD_LABEL if none)]; codes = each row's
    # _row_code, and one more, an ignored row's, at index N (the fused kernel then reads the
    # row after the last one unmasked); thresholds (with drop classes) = each column's drop
    # threshold on the Philox word, twice over (2C entries, as the fused kernel's tables): the
    # ratio's _threshold_bits for a drop class, 0xFFFFFFFF (never exceeded) for the others.
    num_valid = tl.zeros([BLOCK], dtype=tl.int32)
    num_foreground = tl.zeros([BLOCK], dtype=tl.int32)
    num_foreground_drop = tl.zeros([BLOCK], dtype=tl.int32)
    first_bad = tl.full([BLOCK], 9223372036854775807, dtype=tl.int64)
    for start in range(0, num_rows, BLOCK):
        rows = start + tl.arange(0, BLOCK).to(tl.int64)
        in_range = rows < num_rows
        label = tl.load(labels_ptr + rows, mask=in_range, other=ignore_index)
        tl.store(codes_ptr + rows, _row_code(label, num_classes, ignore_index), mask=in_range)
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
    tl.store(codes_ptr + num_rows, -2)
    # float32(fg_drop) / float32(fg), correctly rounded. With no foreground row GOL's ratio is
    # NaN and drops nothing; 1.0 does the same (u < 1) without a NaN.
    ratio = tl.math.div_rn(fg_drop_rows.to(tl.float32), tl.maximum(fg_rows, 1).to(tl.float32))
    ratio = tl.where(fg_rows > 0, ratio, 1.0)
    tl.store(ratio_ptr, ratio)
    if HAS_DROP:
        threshold = _threshold_bits(ratio)
        for start in range(0, num_classes, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            in_range = cols < num_classes
            is_drop = tl.load(drop_ptr + cols, mask=in_range, other=0) != 0
            value = tl.where(is_drop, threshold, 0xFFFFFFFF).to(tl.uint32)
            value = value.to(tl.int32, bitcast=True)
            tl.store(thresholds_ptr + cols, value, mask=in_range)
            tl.store(thresholds_ptr + num_classes + cols, value, mask=in_range)


# The switches that change only which loads, stores and drops run are runtime arguments (a
# uniform branch, never specialised): only what changes the element math is a compile-time
# constant, so that every variant the launcher can request is compiled ahead of time in CI
# (tests/test_triton_aot.py) in a minute.
_RUNTIME_SWITCHES = ["drop_mode", "has_class_weight", "has_row_weight", "need_grad",
                     "store_loss", "mean"]


@triton.jit(do_not_specialize=["first_tile", "end_tile", "tiles_per_program", "first_partial",
                               "total", "num_rows", "num_classes", "offset_lo", "offset_hi",
                               "lo_bits", "hi_bits", "inv_c_bits",
                               *_RUNTIME_SWITCHES])
def _gol_loss_kernel(logits_ptr, codes_ptr, drop_ptr, thresholds_ptr, class_weight_ptr,
                     row_weight_ptr,
                     counts_ptr, ratio_ptr, seed_ptr, grad_ptr, loss_ptr, partials_ptr,
                     first_tile, end_tile, tiles_per_program, first_partial, total, num_rows,
                     num_classes, offset_lo, offset_hi, lo_bits, hi_bits, inv_c_bits, drop_mode,
                     has_class_weight, has_row_weight,
                     need_grad, store_loss, mean, GUMBEL: tl.constexpr, BOUNDED: tl.constexpr,
                     GRAD_EXACT: tl.constexpr, FLOAT64: tl.constexpr, WIDE_ROWS: tl.constexpr,
                     FULL: tl.constexpr, GROUPS: tl.constexpr,
                     COMMON_PATH_ONLY: tl.constexpr = False):
    # Program p walks tiles first_tile + p * tiles_per_program ... (up to end_tile), one after
    # the other, and writes one loss partial (partials[first_partial + p]): the per-call setup
    # and the block reduction are paid once per program, not once per tile.
    # drop_mode: 0 no drop, 1 eql (foreground rows), 2 droploss (and background rows).
    # WIDE_ROWS: TILE <= C, so a tile spans at most two rows. FULL: every element of the tile
    # exists (all tiles but a partial last one, which a second launch of one program does).
    # COMMON_PATH_ONLY (bench/sass_report.py only, never launched): tiles that are not all
    # background rows do nothing, so that the SASS is the common path's (and the test that
    # selects it), to count.
    TILE: tl.constexpr = 4 * GROUPS
    math_dtype = tl.float64 if FLOAT64 else tl.float32
    lo = _float64_from_bits(lo_bits).to(math_dtype)
    hi = _float64_from_bits(hi_bits).to(math_dtype)

    rows = tl.maximum(tl.load(counts_ptr), 1).to(math_dtype)
    grad_scale = tl.where(mean != 0, 1.0 / rows, 1.0)
    ratio = tl.load(ratio_ptr)
    draws = (drop_mode == 2) & (ratio < 1.0)
    threshold = _threshold_bits(ratio)
    round_keys = _philox_round_keys(tl.load(seed_ptr))
    inv_c = _float64_from_bits(inv_c_bits)

    tile = first_tile + tl.program_id(0) * tiles_per_program
    last = tl.minimum(tile + tiles_per_program, end_tile)
    # Flat indices in total's type: int32 below 2^31 elements (cheaper addresses and Philox
    # counters), int64 above; the columns fit 32 bits. The first tile's row and column by a
    # division, the next ones' by stepping (TILE <= C: at most one row wrap).
    start = tile.to(total.dtype) * TILE
    first_row, first_col = _row_and_column(start, num_classes, inv_c)
    # One running sum per group, each tile's four losses added first (within the thread that
    # holds the group): a fixed order, and one register per group where four would spill.
    total_loss = tl.zeros([GROUPS], dtype=math_dtype)
    while tile < last:
        if not WIDE_ROWS:
            first_row, first_col = _row_and_column(start, num_classes, inv_c)
        total_loss += tl.sum(_tile(
            logits_ptr, codes_ptr, drop_ptr, thresholds_ptr, class_weight_ptr, row_weight_ptr,
            round_keys,
            grad_ptr, loss_ptr, start, first_row, first_col, total, num_rows, num_classes,
            offset_lo, offset_hi, lo, hi, grad_scale, draws, threshold, drop_mode,
            has_class_weight, has_row_weight, need_grad, store_loss, GUMBEL, BOUNDED, GRAD_EXACT,
            FLOAT64, WIDE_ROWS, FULL, GROUPS, COMMON_PATH_ONLY), axis=1)
        tile += 1
        start += TILE
        if WIDE_ROWS:
            first_col += TILE
            if first_col >= num_classes:
                first_col -= num_classes
                first_row += 1
    tl.store(partials_ptr + first_partial + tl.program_id(0), tl.sum(total_loss).to(tl.float64))


@triton.jit
def _row_and_column(start, num_classes, inv_c):
    """(start // C, start % C), the quotient as floor(start * (1 / C)) in float64 (a 64-bit
    integer division is a subroutine call), corrected by one where the product rounded across
    an integer."""
    row = (start.to(tl.float64) * inv_c).to(tl.int64)
    row = tl.where(row * num_classes > start, row - 1, row)
    row = tl.where((row + 1) * num_classes <= start, row + 1, row)
    # Both fit 32 bits (N < 2^31): a loop-carried row in one register, not two.
    return row.to(tl.int32), (start - row * num_classes).to(tl.int32)


@triton.jit
def _tile(logits_ptr, codes_ptr, drop_ptr, thresholds_ptr, class_weight_ptr, row_weight_ptr,
          round_keys,
          grad_ptr,
          loss_ptr, start, first_row, first_col, total, num_rows, num_classes, offset_lo,
          offset_hi, lo, hi, grad_scale, draws, threshold, drop_mode,
          has_class_weight, has_row_weight, need_grad, store_loss, GUMBEL: tl.constexpr,
          BOUNDED: tl.constexpr, GRAD_EXACT: tl.constexpr, FLOAT64: tl.constexpr,
          WIDE_ROWS: tl.constexpr, FULL: tl.constexpr, GROUPS: tl.constexpr,
          COMMON_PATH_ONLY: tl.constexpr):
    """One tile of TILE = 4 * GROUPS flat elements from `start` (row first_row, column
    first_col): gradient and "none" losses stored, the weighted losses returned."""
    TILE: tl.constexpr = 4 * GROUPS
    math_dtype = tl.float64 if FLOAT64 else tl.float32
    local = tl.arange(0, GROUPS)[:, None] * 4 + tl.arange(0, 4)[None, :]
    flat = start + local
    if FULL:
        in_range = tl.full([GROUPS, 4], 1, tl.int1)  # constant: the loads and stores unmasked
    else:
        in_range = flat < total
    # The column tables hold each column twice (drop flags and class weights of 2C columns),
    # so that first_col + local indexes them across a row boundary with no wrap.
    col_ext = first_col + local
    q = tl.load(logits_ptr + flat, mask=in_range, other=0.0).to(math_dtype)
    poison = q - q  # NaN for a NaN/Inf logit, which the clamp would otherwise hide
    if WIDE_ROWS:
        # The row codes of the tile's two rows (past the last row: the ignored code at N).
        code_a = tl.load(codes_ptr + first_row)
        code_b = tl.load(codes_ptr + first_row + 1)
        has_second = first_row + 1 < num_rows  # (for the row weights)
        in_first_row = first_col + TILE <= num_classes
        # GOL's usual tile: every element in background rows (three in four rows are).
        uniform_background = FULL & (code_a == -1) & ((code_b == -1) | in_first_row)
    else:
        uniform_background: tl.constexpr = False  # constexpr: the branch below is not compiled

    if uniform_background:
        # No per-element row logic: no positives, nothing ignored, every drop class's negative
        # dropped where its uniform exceeds the ratio.
        w = tl.full([GROUPS, 4], 1.0, math_dtype)
        if has_class_weight != 0:
            w = tl.load(class_weight_ptr + col_ext).to(math_dtype)
        if draws:
            # One compare per element: the column's threshold is 0xFFFFFFFF unless it drops.
            column_threshold = tl.load(thresholds_ptr + col_ext).to(tl.uint32, bitcast=True)
            bits = _philox_words(round_keys, start >> 2, offset_lo, offset_hi, GROUPS)
            w = tl.where(bits > column_threshold, w * 0.0, w)
        if has_row_weight != 0:
            second = col_ext >= num_classes
            weight_a = tl.load(row_weight_ptr + first_row)
            weight_b = tl.load(row_weight_ptr + first_row + 1, mask=has_second, other=0.0)
            w = w * tl.where(second, weight_b, weight_a).to(math_dtype)
        loss, grad = _element_terms(q, False, lo, hi, GUMBEL, BOUNDED, GRAD_EXACT, FLOAT64,
                                    False)
        weighted_loss = w * loss + poison
        weighted_grad = (w * grad_scale) * grad + poison
    elif COMMON_PATH_ONLY:
        # bench/sass_report.py: the other tiles' work left out; the test that picks the path,
        # which every tile pays, kept.
        weighted_loss = tl.zeros([GROUPS, 4], dtype=math_dtype)
        weighted_grad = weighted_loss
    else:
        # Each element's row kind: from the tile's two rows' codes (_row_code), selected per
        # element by one predicate, or, below MAX_TILE columns, from its own row's label. (row_w
        # is bound before the runtime `if`s that set it: the compiler keeps only variables
        # every branch defines.)
        row_w = tl.full([GROUPS, 4], 1.0, math_dtype)
        if WIDE_ROWS:
            second = col_ext >= num_classes
            # Row b's positive column sits at code_b + C in the doubled columns; its other
            # codes (< 0) then fall below C, where no element of row b is.
            positive = col_ext == tl.where(second, code_b + num_classes, code_a)
            kept = tl.where(second, code_b >= -1, code_a >= -1)
            foreground = tl.where(second, code_b >= 0, code_a >= 0)
            background = tl.where(second, code_b == -1, code_a == -1)
            bad = tl.where(second, code_b == -3, code_a == -3)
            if has_row_weight != 0:
                weight_a = tl.load(row_weight_ptr + first_row)
                weight_b = tl.load(row_weight_ptr + first_row + 1, mask=has_second, other=0.0)
                row_w = tl.where(second, weight_b, weight_a).to(math_dtype)
        else:
            row_step = col_ext // num_classes
            col = col_ext - row_step * num_classes
            row = first_row + row_step.to(tl.int64)
            code = tl.load(codes_ptr + row, mask=in_range, other=-2)
            if has_row_weight != 0:
                row_w = tl.load(row_weight_ptr + row, mask=in_range, other=0.0).to(math_dtype)
            col_ext = col  # (the tables' first copy)
            positive = col == code  # codes < 0 never match a column
            kept = code >= -1       # a foreground or background row
            foreground = code >= 0
            background = code == -1
            bad = code == -3
        # w = (0 if dropped) * class weight * row weight, in the reference's order: 0 * w
        # keeps a NaN/Inf weight visible.
        w = tl.full([GROUPS, 4], 1.0, math_dtype)
        if has_class_weight != 0:
            w = tl.load(class_weight_ptr + col_ext, mask=in_range, other=0.0).to(math_dtype)
        if drop_mode != 0:
            is_drop = tl.load(drop_ptr + col_ext, mask=in_range, other=0) != 0
            # Foreground rows: a drop class's negatives weigh 0 (EQL and DropLoss).
            dropped = foreground & is_drop & ~positive
            if draws:
                bits = _philox_words(round_keys, start >> 2, offset_lo, offset_hi, GROUPS)
                dropped = dropped | (background & is_drop & (bits > threshold))
            w = tl.where(dropped, w * 0.0, w)
        if has_row_weight != 0:
            w = w * row_w
        loss, grad = _element_terms(q, positive, lo, hi, GUMBEL, BOUNDED, GRAD_EXACT, FLOAT64,
                                    True)
        # A bad label makes its row NaN (the host check reports it unless it is skipped); an
        # ignored row, or an element past the end, is 0.
        outside = tl.where(bad, float("nan"), 0.0)
        weighted_loss = tl.where(kept, w * loss + poison, outside)
        weighted_grad = tl.where(kept, (w * grad_scale) * grad + poison, outside)
    if need_grad != 0:
        tl.store(grad_ptr + flat, weighted_grad.to(grad_ptr.dtype.element_ty), mask=in_range)
    if store_loss != 0:
        tl.store(loss_ptr + flat, weighted_loss.to(loss_ptr.dtype.element_ty), mask=in_range)
    return weighted_loss



@triton.jit
def _element_terms(q, positive, lo, hi, GUMBEL: tl.constexpr, BOUNDED: tl.constexpr,
                   GRAD_EXACT: tl.constexpr, FLOAT64: tl.constexpr, POSITIVES: tl.constexpr):
    """The unweighted loss and gradient of the call's math (POSITIVES: see _gumbel_bounded)."""
    if GUMBEL:
        if FLOAT64:
            loss, grad = _gumbel_closed(q, positive, lo, hi, GRAD_EXACT)
        elif BOUNDED:
            loss, grad = _gumbel_bounded(q, lo, hi, GRAD_EXACT, POSITIVES, positive)
        else:
            loss, grad = _gumbel_series(q, positive, lo, hi, GRAD_EXACT)
        grad = tl.where((q > lo) & (q < hi), grad, 0.0)
    else:
        loss, grad = _sigmoid_bce(q, positive, FLOAT64)
    return loss, grad


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
    return max(1, block // 128)  # four elements, one Philox group, per thread


# GOL's usual launch (the bounded math, C >= MAX_TILE as LVIS's and V3Det's, whole tiles:
# nearly all the work) is compiled for at most REGISTER_CAP registers per thread: 6 programs of
# 8 warps per SM on sm_80/sm_90, 75% occupancy, which it fits without spilling
# (tests/test_triton_aot.py checks every capped variant); bfloat16 past 2^31 elements (64-bit
# indices) needs 48 (5 programs, 62.5%). The other variants would spill under a cap (the series
# and sigmoid math, float64, narrow rows' per-element division) and run uncapped, as does the
# one-program tail launch.
REGISTER_CAP = 40
REGISTER_CAP_BF16_INT64 = 48


def register_cap(full: bool, dtype: torch.dtype, bounded: bool, wide: bool,
                 int64_indices: bool) -> dict:
    """The launch options that cap the registers of a _gol_loss_kernel launch (maxnreg)."""
    if not (full and wide and bounded):  # (never bounded in float64: kernel_constants)
        return {}
    if dtype == torch.bfloat16 and int64_indices:
        return {"maxnreg": REGISTER_CAP_BF16_INT64}
    return {"maxnreg": REGISTER_CAP}


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
    math_dtype = _ops.scalar_loss_dtype(logits)  # also the dtype of the math and the weights
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
    # The fused kernel reads columns first_col + k across a row boundary: tables of 2C columns.
    drop_twice = drop.repeat(2) if drop_classes is not None else drop
    thresholds_twice = torch.empty(2 * num_classes if drop_classes is not None else 1,
                                   dtype=torch.int32, device=device)
    class_weight_twice = class_weight.repeat(2) if class_weight is not None else weight_dummy
    ratio = torch.empty((), dtype=torch.float32, device=device)
    with _device_guard(logits):
        codes = torch.empty(n + 1, dtype=torch.int32, device=device)
        torch.library.wrap_triton(_row_statistics_kernel)[(1,)](
            labels, drop, counts, ratio, codes, thresholds_twice, n, num_classes, ignore_index,
            HAS_DROP=drop_classes is not None, BLOCK=STATS_BLOCK, num_warps=4)
        tile, wide = tile_size(num_classes)
        full_tiles, tail = divmod(total, tile)
        # Whole tiles in at most MAX_PROGRAMS programs of consecutive tiles (a fixed number for
        # the shape, on every device: the loss's partials, and so its bits, do not depend on
        # the GPU), a partial last tile in one more.
        tiles_per_program = triton.cdiv(full_tiles, MAX_PROGRAMS) if full_tiles else 0
        programs = triton.cdiv(full_tiles, tiles_per_program) if full_tiles else 0
        num_partials = programs + (1 if tail else 0)
        partials = torch.empty(num_partials, dtype=torch.float64, device=device)
        offset &= _MASK64
        arguments = (
            logits, codes, drop_twice, thresholds_twice, class_weight_twice,
            row_weight if row_weight is not None else weight_dummy,
            counts, ratio, seed.to(device=device, dtype=torch.int64),
            grad if need_grad else logits, loss if reduction == "none" else logits, partials)
        scalars = (
            total, n, num_classes, offset & 0xFFFFFFFF, offset >> 32,
            _float64_bits(clamp_min, -math.inf), _float64_bits(clamp_max, math.inf),
            _float64_bits(1.0 / num_classes, 0.0), drop_mode, int(class_weight is not None),
            int(row_weight is not None), int(need_grad), int(reduction == "none"),
            int(reduction == "mean"))
        constants = kernel_constants(logits.dtype, activation, clamp_min, clamp_max, grad_mode,
                                     num_classes)
        if programs:
            torch.library.wrap_triton(_gol_loss_kernel)[(programs,)](
                *arguments, 0, full_tiles, tiles_per_program, 0, *scalars, FULL=True,
                **constants,
                **register_cap(True, logits.dtype, constants["BOUNDED"], constants["WIDE_ROWS"],
                               total >= 2 ** 31))
        if tail:
            torch.library.wrap_triton(_gol_loss_kernel)[(1,)](
                *arguments, full_tiles, full_tiles + 1, 1, programs, *scalars, FULL=False,
                **constants)
        if reduction != "none":
            torch.library.wrap_triton(_finalize_kernel)[(1,)](
                partials, counts, loss, num_partials, MEAN=reduction == "mean",
                BLOCK=FINALIZE_BLOCK, num_warps=4)
    return loss, grad, counts


@gol_loss_op.register_fake
def _gol_loss_op_fake(logits, labels, drop_classes, class_weight, row_weight, seed, offset,
                      mode, activation, reduction, clamp_min, clamp_max, grad_mode,
                      ignore_index, need_grad):
    loss = (torch.empty_like(logits) if reduction == "none"
            else logits.new_empty((), dtype=_ops.scalar_loss_dtype(logits)))
    grad = torch.empty_like(logits) if need_grad else logits.new_empty(0)
    return loss, grad, logits.new_empty(4, dtype=torch.int64)


# The C++ ops' autograd (gumbel_kernels._ops): the same 15 inputs, only the loss
# differentiated, through the saved gradient.
gol_loss_op.register_autograd(_ops.gol_loss_backward("gumbel_triton::gol_loss"),
                              setup_context=_ops.gol_loss_setup_context)


def _host_label_check_allowed(logits: torch.Tensor) -> bool:
    if os.environ.get(CHECK_LABELS_ENV, "1") == "0" or torch.compiler.is_compiling():
        return False
    return not (logits.is_cuda and torch.cuda.is_current_stream_capturing())


def raise_on_bad_label(counts: torch.Tensor, labels: torch.Tensor, num_classes: int,
                       ignore_index: int) -> None:
    """The host label check: one 8-byte read of the first bad label's index."""
    first_bad = int(counts[3])
    if first_bad != NO_BAD_LABEL:
        raise reference.bad_label_error(labels, first_bad, num_classes, ignore_index,
                                        prefix="gol_loss: ")


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
