"""The two baselines the fused kernels are measured against.

`literal_gol` is GOL's DropLoss with the Gumbel activation written op by op the way the published
mmdetection loss writes it (the eager baseline and the input of the `compile_literal` provider):
clamp the logits to (-4, 10), p = 1 / exp(exp(-q)), a one-hot target built over C + 1 columns
whose background column is cut off, the DropLoss weights from a full N x C `torch.rand_like`,
`F.binary_cross_entropy(p, y, reduction="none")`, and `(loss * w).sum() / N`.

`compile_friendly_gol` computes the same loss, written for torch.compile: no data-dependent
shapes, no materialised one-hot/weight matrices, the stable closed forms of the loss, each
transcendental written so that inductor keeps it in one fused loop, and, when a gradient is
wanted, the gradient of GOL's BCE backward formed in that same pass (the backward only scales
it). Its background drop uses a vectorizable integer hash instead of torch.rand_like (see
`_uniform`). It is the strongest compile baseline we know how to write.

Both take (logits (N, C), labels (N,) with background = C, drop_classes (C,) bool) and return the
scalar float32 loss; half logits are upcast first, as mmdetection's `force_fp32` on the box head
loss does. Their random drops are seeded from torch's generator, so they agree with
`gumbel_kernels` (Philox, SPEC.md section 4) in distribution, not element by element. The
gradient is GOL's (BCE backward, dead zone included); it is zero outside the clamp's open
interval, as torch's clamp backward is.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

CLAMP_MIN = -4.0
CLAMP_MAX = 10.0
LOSS_CAP = 100.0  # F.binary_cross_entropy clamps log(.) at -100
BCE_EPS = 1e-12  # ... and its backward divides by max(p (1 - p), 1e-12)


def literal_gol(logits: torch.Tensor, labels: torch.Tensor,
                drop_classes: torch.Tensor) -> torch.Tensor:
    """GOL DropLoss (Gumbel activation), eager and literal: every intermediate is materialised."""
    scores = logits.float()
    num_rows, num_classes = scores.shape
    device = scores.device

    # One-hot over C + 1 columns (background label C lands in the extra column), then cut to C.
    target = scores.new_zeros(num_rows, num_classes + 1)
    target[torch.arange(num_rows, device=device), labels] = 1
    target = target[:, :num_classes]

    # Class-level drop indicator T, expanded to the full matrix.
    class_drop = scores.new_zeros(num_classes)
    class_drop[drop_classes] = 1
    class_drop = class_drop.view(1, num_classes).expand(num_rows, num_classes)

    # Share of foreground rows whose class is a drop class (boolean indexing: dynamic shape).
    is_foreground = labels != num_classes
    ratio = torch.mean(drop_classes[labels[is_foreground]].float())
    foreground = is_foreground.float().view(num_rows, 1).expand(num_rows, num_classes)
    background = 1 - foreground

    # Background rows drop a drop-class negative where a uniform exceeds the ratio.
    uniform = torch.rand_like(background) * background
    bg_drop = torch.where(uniform > ratio, torch.ones_like(uniform), torch.zeros_like(uniform))
    drop_indicator = (bg_drop + foreground) * class_drop
    weight = 1 - drop_indicator * (1 - target)

    clamped = torch.clamp(scores, min=CLAMP_MIN, max=CLAMP_MAX)
    p = 1 / torch.exp(torch.exp(-clamped))
    loss = F.binary_cross_entropy(p, target, reduction="none")
    return torch.sum(loss * weight) / num_rows


def _uniform(num_rows: int, num_classes: int, seed: torch.Tensor,
             device: torch.device) -> torch.Tensor:
    """Counter-based uniforms in [0, 1) with 24 random bits, one per (i, j): a 32-bit integer
    hash (Wellons' "lowbias32") of the element index i*C + j plus a per-call seed.

    torch.rand_like would serve too, but inductor lowers it to one scalar Philox call per
    element, about four times the cost of the whole loss math on CPU; int32 multiplies, shifts
    and xors vectorize and fuse. int32 products wrap, which is what a 32-bit hash wants; the
    arithmetic right shifts are masked to act as logical ones.
    """
    rows = torch.arange(num_rows, device=device, dtype=torch.int32)
    cols = torch.arange(num_classes, device=device, dtype=torch.int32)
    x = rows[:, None] * num_classes + cols[None, :] + seed
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * 0x7FEB352D
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * (0x846CA68B - (1 << 32))  # the multiplier as a signed int32
    x = x ^ ((x >> 16) & 0xFFFF)
    return ((x >> 8) & 0xFFFFFF).float() * (2.0 ** -24)


def _kept_elements(labels: torch.Tensor, drop_classes: torch.Tensor, positive: torch.Tensor,
                   seed: torch.Tensor) -> torch.Tensor:
    """The DropLoss weight (True keep, False drop) as a bool (N, C), with no data-dependent
    shapes."""
    num_rows, num_classes = positive.shape
    foreground = labels < num_classes
    fg_rows = foreground.sum()
    fg_drop_rows = (foreground & drop_classes[labels.clamp(max=num_classes - 1)]).sum()
    ratio = fg_drop_rows.float() / fg_rows.float()  # NaN without foreground: nothing dropped
    bg_drop = _uniform(num_rows, num_classes, seed, labels.device) > ratio
    dropped = drop_classes & ~positive & (foreground[:, None] | bg_drop)
    return ~dropped


def _t(clamped: torch.Tensor) -> torch.Tensor:
    # Called once per use on purpose: inductor stores a CPU exp() that has several users to
    # memory (an extra N x C write and read); recomputed, it stays in the fused loop.
    return torch.exp(-clamped)


def _positive_and_loss(q: torch.Tensor, labels: torch.Tensor):
    positive = labels[:, None] == torch.arange(q.shape[1], device=q.device)
    qc = q.clamp(CLAMP_MIN, CLAMP_MAX)
    # y = 1: -log p = t;  y = 0: -log(1 - p) = -log(-expm1(-t));  both capped like BCE.
    loss = torch.where(positive, _t(qc), -torch.log(-torch.expm1(-_t(qc)))).clamp(max=LOSS_CAP)
    return positive, qc, loss


def _loss_only(logits, labels, drop_classes, seed):
    q = logits.float()
    positive, _, loss = _positive_and_loss(q, labels)
    keep = _kept_elements(labels, drop_classes, positive, seed)
    # A product (not a select) so that a NaN loss on a dropped element still poisons the sum.
    # Row sums first: inductor then keeps the whole expression in one 2-D loop instead of
    # storing the N x C product for a separate flat reduction.
    return (loss * keep).sum(dim=1).sum() / q.shape[0]


def _loss_with_gradient(logits, labels, drop_classes, seed):
    num_rows = logits.shape[0]
    q_input = logits.float()
    q = q_input.detach()
    positive, qc, loss = _positive_and_loss(q, labels)
    keep = _kept_elements(labels, drop_classes, positive, seed)
    # GOL's gradient, BCE backward (p - y) / max(p (1 - p), eps) times dp/dq = p t, zero outside
    # the clamp's open interval, formed in the forward pass (the backward only scales it).
    # p t = exp(-q - t) saves a product.
    p = torch.exp(-_t(qc))
    one_minus_p = -torch.expm1(-_t(qc))
    p_t = torch.exp(-qc - _t(qc))
    bce_denominator = torch.clamp(torch.exp(-_t(qc)) * -torch.expm1(-_t(qc)), min=BCE_EPS)
    # p_t / denominator first: for q near the lower clamp p and p t are ~1e-24 and ~1e-22, and
    # their product would be a float32 denormal, which the CPU computes through slow microcode
    # assists (several times the cost of the whole loop); the quotient keeps every step normal.
    grad = torch.where(positive, -one_minus_p, p) * (p_t / bce_denominator)
    inside = (q > CLAMP_MIN) & (q < CLAMP_MAX)
    grad = torch.where(inside & keep, grad, 0.0) / num_rows
    # The value of the loss with gradient `grad`: the surrogate term is zero but carries d/dq.
    # One reduction for both, so inductor does not re-read grad and logits in a second pass.
    return (loss * keep / num_rows + grad * (q_input - q)).sum()


def compile_friendly_gol(logits: torch.Tensor, labels: torch.Tensor, drop_classes: torch.Tensor,
                         seed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """GOL DropLoss (Gumbel activation) as one fusible expression: the same loss and gradient
    as `literal_gol`, random drops aside. Meant to be wrapped in torch.compile.

    `seed`: an int32 0-dim tensor keying the drop hash; None draws one from torch's generator
    (pass it in from outside a compiled region: inside, inductor inlines the draw into the
    element loop).
    """
    if seed is None:
        seed = torch.randint(0, 2 ** 31 - 1, (), dtype=torch.int32, device=logits.device)
    if torch.is_grad_enabled() and logits.requires_grad:
        return _loss_with_gradient(logits, labels, drop_classes, seed)
    return _loss_only(logits, labels, drop_classes, seed)
