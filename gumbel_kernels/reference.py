"""The GOL loss contract (shared SPEC.md, sections 2-4) written in plain PyTorch.

This module is the oracle every backend is tested against: it favours being obviously
right over being fast (it materialises every N x C intermediate). It also holds the pieces
of the contract that the Python-side backends share: the Philox4x32-10 stream written with
int64 tensor ops, and the DropLoss background ratio.
"""
from __future__ import annotations

import math

from typing import Optional, Tuple

import torch

# Philox4x32-10 constants (Random123, Salmon et al. SC'11).
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF

# Caps taken from torch.nn.functional.binary_cross_entropy, which GOL trains with: the log is
# clamped at -100 and the backward divides by max(p * (1 - p), 1e-12).
LOSS_CAP = 100.0
BCE_EPS = 1e-12


def _mulhilo32(a: torch.Tensor, m: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * m for uint32 values held in int64 tensors.

    The 64-bit product would overflow int64, so it is formed from two 48-bit partial products.
    """
    low = a * (m & 0xFFFF)
    high = a * (m >> 16)
    lo = (low + ((high & 0xFFFF) << 16)) & _MASK32
    hi = ((high + (low >> 16)) >> 16) & _MASK32
    return hi, lo


def philox4x32_10(counter: Tuple[torch.Tensor, ...], key: Tuple[int, int]) -> Tuple[torch.Tensor, ...]:
    """Philox4x32-10 on int64 tensors holding uint32 words; returns the four output words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key[0] & _MASK32, key[1] & _MASK32  # ints or int64 tensors
    for round_index in range(PHILOX_ROUNDS):
        if round_index:
            k0 = (k0 + PHILOX_W0) & _MASK32
            k1 = (k1 + PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo32(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo32(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _split64(value: int) -> Tuple[int, int]:
    value &= (1 << 64) - 1
    return value & _MASK32, value >> 32


def _seed_key(seed, device) -> Tuple:
    """(lo32(seed), hi32(seed)): from an int, or, with no host read (so that torch.compile
    traces it), from a one-element int64 tensor holding the seed's 64 bits."""
    if isinstance(seed, torch.Tensor):
        seed = seed.reshape(()).to(device=device, dtype=torch.int64)
        return seed & _MASK32, (seed >> 32) & _MASK32
    return _split64(seed)


def philox_uniform(num_rows: int, num_cols: int, seed, offset: int,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """The float32 uniforms u_ij of SPEC.md section 4 for an (N, C) matrix.

    Element e = i*C + j uses output word (e & 3) of the Philox call whose counter is
    (lo32(e >> 2), hi32(e >> 2), lo32(offset), hi32(offset)) and whose key is the seed (an int
    or a one-element int64 tensor).
    """
    total = num_rows * num_cols
    groups = (total + 3) // 4
    g = torch.arange(groups, dtype=torch.int64, device=device)
    off_lo, off_hi = _split64(offset)
    counter = (g & _MASK32, (g >> 32) & _MASK32,
               torch.full_like(g, off_lo), torch.full_like(g, off_hi))
    words = torch.stack(philox4x32_10(counter, _seed_key(seed, device)), dim=1).reshape(-1)[:total]
    # The top 24 bits scaled by 2^-24 are exact in float32 and lie in [0, 1).
    return ((words >> 8).to(torch.float32) * (2.0 ** -24)).reshape(num_rows, num_cols)


def count_rows(labels: torch.Tensor, num_classes: int, ignore_index: int,
               drop_classes: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(#foreground rows, #foreground rows whose class is a drop class), the DropLoss ratio's
    counts; a bad label (outside [0, C]) is no foreground row."""
    foreground = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
    if drop_classes is None:
        fg_drop = torch.zeros((), dtype=torch.int64, device=labels.device)
    else:
        safe = torch.where(foreground, labels, torch.zeros_like(labels))
        fg_drop = (foreground & drop_classes[safe]).sum()
    return foreground.sum(), fg_drop


def drop_ratio(fg_rows: torch.Tensor, fg_drop_rows: torch.Tensor) -> torch.Tensor:
    """float32(#fg rows of drop classes) / float32(#fg rows); NaN when there is no fg row.

    A NaN ratio makes every `u > ratio` false, so nothing is dropped, as in GOL.
    """
    return fg_drop_rows.to(torch.float32) / fg_rows.to(torch.float32)


def bad_labels(labels: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """The rows whose label is outside [0, C] and not ignore_index."""
    return (labels != ignore_index) & ((labels < 0) | (labels > num_classes))


def check_labels(labels: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Raise ValueError naming the first label outside [0, C] that is not ignore_index."""
    bad = bad_labels(labels, num_classes, ignore_index)
    if bool(bad.any()):
        raise bad_label_error(labels, int(bad.nonzero()[0, 0]), num_classes, ignore_index)


def bad_label_error(labels: torch.Tensor, index: int, num_classes: int, ignore_index: int,
                    prefix: str = "") -> ValueError:
    """The ValueError naming the bad label labels[index]: one message for check_labels and for
    the Triton backend's device-side check."""
    return ValueError(
        f"{prefix}labels[{index}] = {int(labels[index])} is out of range: expected a class in "
        f"[0, {num_classes - 1}], {num_classes} for background, or ignore_index={ignore_index}")


def element_loss_and_grad(q: torch.Tensor, y: torch.Tensor, activation: str,
                          clamp_min: Optional[float], clamp_max: Optional[float],
                          grad_mode: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Unweighted per-element loss and d loss / d q (SPEC.md section 2), in q's dtype."""
    positive = y > 0
    if activation == "gumbel":
        qc = q if clamp_min is None and clamp_max is None else torch.clamp(q, clamp_min, clamp_max)
        t = torch.exp(-qc)
        one_minus_p = -torch.expm1(-t)  # 1 - p without cancellation near p = 1
        p = torch.exp(-t)
        # -log(1 - p) to full relative precision (Maechler's log1mexp): log(-expm1(-t)) while p
        # is near 1, log1p(-p) once p <= 1/2, where 1 - p would round to 1 for tiny p and lose
        # every digit of a loss of ~p.
        neg_loss = torch.where(t < math.log(2.0), -torch.log(one_minus_p), -torch.log1p(-p))
        loss = torch.where(positive, t, neg_loss).clamp(max=LOSS_CAP)
        # dp/dq = p t, whose limit is 0 where t = exp(-q) overflows (no clamp, very negative q):
        # t is capped there so that the product is 0 rather than 0 * inf = NaN.
        pt = p * torch.clamp(t, max=torch.finfo(t.dtype).max)
        if grad_mode == "reference":
            # BCE backward: (p - y) / max(p (1 - p), eps) * dp/dq.
            numerator = torch.where(positive, -one_minus_p, p)
            grad = numerator / torch.clamp(p * one_minus_p, min=BCE_EPS) * pt
        else:
            grad = torch.where(positive, -t, pt / one_minus_p)
        inside = torch.ones_like(positive)
        if clamp_min is not None:
            inside = inside & (q > clamp_min)
        if clamp_max is not None:
            inside = inside & (q < clamp_max)
        grad = torch.where(inside, grad, torch.zeros_like(grad))
    elif activation == "sigmoid":
        softplus = torch.clamp(q, min=0) + torch.log1p(torch.exp(-q.abs()))
        loss = softplus - y * q
        grad = torch.sigmoid(q) - y
    else:
        raise ValueError(f"activation must be 'gumbel' or 'sigmoid', got {activation!r}")
    # Non-finite logits must surface in loss and gradient (a clamp would otherwise hide an Inf
    # from a NaN guard or a GradScaler): q - q is 0 for finite q and NaN otherwise.
    poison = q - q
    return loss + poison, grad + poison


def element_weights(labels: torch.Tensor, y: torch.Tensor, drop_classes: Optional[torch.Tensor],
                    class_weight: Optional[torch.Tensor], row_weight: Optional[torch.Tensor],
                    mode: str, ignore_index: int, seed, offset: int,
                    pos_weight: Optional[torch.Tensor] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(w, valid): the (N, C) weights of SPEC.md section 3 and the non-ignored row mask, given
    the targets y of one_hot_targets (whose shape and dtype the weights take). `pos_weight`
    (gol_loss_class_stats) replaces class_weight on the positive elements."""
    n, num_classes = y.shape
    dtype, device = y.dtype, labels.device
    valid = labels != ignore_index
    foreground = valid & (labels < num_classes)
    background = valid & (labels == num_classes)
    w = torch.ones(n, num_classes, dtype=dtype, device=device)
    if mode in ("eql", "droploss") and drop_classes is not None:
        is_drop = drop_classes.to(device=device, dtype=torch.bool)
        fg_w = 1.0 - is_drop.to(dtype)[None, :] * (1.0 - y)
        w = torch.where(foreground[:, None], fg_w, w)
        if mode == "droploss":
            fg_rows, fg_drop_rows = count_rows(labels, num_classes, ignore_index, is_drop)
            ratio = drop_ratio(fg_rows, fg_drop_rows)
            u = philox_uniform(n, num_classes, seed, offset, device)
            dropped = is_drop[None, :] & (u > ratio)
            w = torch.where(background[:, None] & dropped, torch.zeros_like(w), w)
    elif mode not in ("bce", "eql", "droploss"):
        raise ValueError(f"mode must be 'bce', 'eql' or 'droploss', got {mode!r}")
    if class_weight is not None or pos_weight is not None:
        ones = torch.ones(num_classes, dtype=dtype, device=device)
        negative_cw = ones if class_weight is None else class_weight.to(dtype)
        positive_cw = negative_cw if pos_weight is None else pos_weight.to(dtype)
        w = w * torch.where(y > 0, positive_cw[None, :], negative_cw[None, :])
    if row_weight is not None:
        w = w * row_weight.to(dtype)[:, None]
    return w, valid


def one_hot_targets(labels: torch.Tensor, num_classes: int, ignore_index: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """y_ij = 1 on the positive column of foreground rows, 0 elsewhere."""
    foreground = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
    safe = torch.where(foreground, labels, torch.zeros_like(labels))
    y = torch.zeros(labels.shape[0], num_classes, dtype=dtype, device=labels.device)
    y.scatter_(1, safe[:, None], foreground[:, None].to(dtype))
    return y


def _weighted_terms(logits, labels, drop_classes, class_weight, row_weight, seed, offset, mode,
                    activation, clamp_min, clamp_max, grad_mode, ignore_index, pos_weight=None):
    """(w * loss, w * d loss / d q, y, valid) in the math dtype, zero on ignored rows: the
    per-element terms of the summed loss."""
    num_classes = logits.shape[1]
    compiling = torch.compiler.is_compiling()
    if not compiling:  # compiled: a bad label's row is NaN, as on CUDA
        check_labels(labels, num_classes, ignore_index)
    math_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    q = logits.to(math_dtype)
    y = one_hot_targets(labels, num_classes, ignore_index, math_dtype)
    loss, grad = element_loss_and_grad(q, y, activation, clamp_min, clamp_max, grad_mode)
    w, valid = element_weights(labels, y, drop_classes, class_weight, row_weight, mode,
                               ignore_index, seed, offset, pos_weight)
    rows = valid[:, None]
    zero = torch.zeros((), dtype=math_dtype, device=logits.device)
    terms = [torch.where(rows, w * value, zero) for value in (loss, grad)]
    if not compiling:  # check_labels passed: no bad row, no N x C NaN passes to pay for
        return terms[0], terms[1], y, valid
    bad = bad_labels(labels, num_classes, ignore_index)[:, None]
    nan = torch.full((), math.nan, dtype=math_dtype, device=logits.device)
    terms = [torch.where(bad, nan, term) for term in terms]
    return terms[0], terms[1], y, valid & ~bad[:, 0]


def gol_loss_forward(logits: torch.Tensor, labels: torch.Tensor,
                     drop_classes: Optional[torch.Tensor], class_weight: Optional[torch.Tensor],
                     row_weight: Optional[torch.Tensor], seed: torch.Tensor, offset: int,
                     mode: str, activation: str, reduction: str,
                     clamp_min: Optional[float], clamp_max: Optional[float], grad_mode: str,
                     ignore_index: int, need_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The fused-forward contract of gumbel_kernels/INTERFACES.md: (loss, d loss / d logits)."""
    weighted_loss, weighted_grad, _, valid = _weighted_terms(
        logits, labels, drop_classes, class_weight, row_weight, seed, offset, mode, activation,
        clamp_min, clamp_max, grad_mode, ignore_index)
    if reduction == "mean":
        denominator = valid.sum().clamp(min=1)  # no host read: torch.compile traces it
        out = weighted_loss.sum() / denominator
        weighted_grad = weighted_grad / denominator
    elif reduction == "sum":
        out = weighted_loss.sum()
    elif reduction == "none":
        out = weighted_loss.to(logits.dtype)
    else:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    grad_out = weighted_grad.to(logits.dtype) if need_grad else logits.new_empty(0)
    return out, grad_out


def gol_loss_class_stats_forward(logits, labels, drop_classes, class_weight, pos_weight,
                                 row_weight, seed, offset, mode, activation, reduction,
                                 clamp_min, clamp_max, grad_mode, ignore_index):
    """gumbel::gol_loss_class_stats: (loss, d loss / d logits, pos_sums, neg_sums), the sums
    (float64 (C,)) of |d loss_sum / d q_ij| over the positive resp. negative elements."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"gol_loss_class_stats: reduction must be 'mean' or 'sum', got "
                         f"{reduction!r}")
    weighted_loss, weighted_grad, y, valid = _weighted_terms(
        logits, labels, drop_classes, class_weight, row_weight, seed, offset, mode, activation,
        clamp_min, clamp_max, grad_mode, ignore_index, pos_weight)
    magnitude = weighted_grad.abs().to(torch.float64)
    positive = y.to(torch.float64)
    pos_sums = (magnitude * positive).sum(dim=0)
    neg_sums = (magnitude * (1.0 - positive)).sum(dim=0)
    denominator = valid.sum().clamp(min=1) if reduction == "mean" else 1
    out = weighted_loss.sum() / denominator
    grad_out = (weighted_grad / denominator).to(logits.dtype)
    return out, grad_out, pos_sums, neg_sums


def gumbel_activation(logits: torch.Tensor) -> torch.Tensor:
    """eta(q) = exp(-exp(-q)), the Gumbel CDF, on the raw logits (no clamp)."""
    return torch.exp(-torch.exp(-logits))
