"""Classification losses as nn.Modules, for configs and the detection RoI head.

Every module is called as `loss(logits, labels)` with foreground classes 0..C-1 and background C
(the convention of gumbel_kernels.gol_loss), and says how wide its head is (`num_logits(C)`:
C for the 1203-way heads, C + 1 for the heads with a background column) and how to turn logits
into scores at inference (`activation`: "gumbel", "sigmoid" or "softmax").
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import _ops
from . import reference as _reference
from .functional import DEFAULT_CLAMP, DEFAULT_LAMBDA, drop_classes_from_frequency, gol_loss


class FusedGOLLoss(nn.Module):
    """gumbel_kernels.gol_loss with fixed settings, over a 1203-way (C-way) head, or a
    (C+1)-way one with `background_logit=True`: its last column is background, the positive
    of background rows (label C), as mmdetection's BCE heads without custom channels train it.

    Args:
        drop_classes: (C,) bool mask of the rare classes (None: nothing dropped).
        mode, activation, clamp, grad_mode, backend: as in gumbel_kernels.gol_loss.
        background_logit: the head has a background column (num_logits(C) = C + 1).
    """

    def __init__(self, drop_classes: Optional[torch.Tensor] = None, *, mode: str = "droploss",
                 activation: str = "gumbel", clamp: Optional[Tuple] = DEFAULT_CLAMP,
                 grad_mode: str = "reference", backend: str = "auto",
                 background_logit: bool = False):
        super().__init__()
        self.background_logit = bool(background_logit)
        if drop_classes is not None:
            drop_classes = torch.as_tensor(drop_classes, dtype=torch.bool)
        self.register_buffer("drop_classes", drop_classes, persistent=False)
        self.mode = mode
        self.activation = activation
        self.clamp = clamp if activation == "gumbel" else None
        self.grad_mode = grad_mode
        self.backend = backend

    def num_logits(self, num_classes: int) -> int:
        return num_classes + 1 if self.background_logit else num_classes

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, *,
                class_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        return gol_loss(logits, labels, self.drop_classes, mode=self.mode,
                        activation=self.activation, clamp=self.clamp, grad_mode=self.grad_mode,
                        class_weight=class_weight, backend=self.backend)

    def extra_repr(self) -> str:
        dropped = 0 if self.drop_classes is None else int(self.drop_classes.sum())
        return (f"mode={self.mode!r}, activation={self.activation!r}, clamp={self.clamp}, "
                f"grad_mode={self.grad_mode!r}, drop_classes={dropped}, "
                f"background_logit={self.background_logit}")


def _drop_classes(image_counts, num_images, lambda_) -> torch.Tensor:
    if image_counts is None or num_images is None:
        raise ValueError("this loss needs the training set's per-class image_counts and "
                         "num_images to find its rare classes")
    return drop_classes_from_frequency(image_counts, num_images, lambda_)


class GOLLoss(FusedGOLLoss):
    """Gumbel Optimized Loss: Gumbel activation + DropLoss weights (the GOL default).

    Args:
        image_counts: (C,) number of training images per class (LVIS `image_count`).
        num_images: the denominator of the frequencies: the training images with annotations,
            as GOL's official frequencies (99,388 on LVIS v1: 815 rare classes at 0.0011).
        lambda_: rare-class frequency threshold (0.0011 for LVIS v1, 0.00177 for v0.5).
    """

    def __init__(self, image_counts: Sequence[int], num_images: int,
                 lambda_: float = DEFAULT_LAMBDA, *, activation: str = "gumbel",
                 mode: str = "droploss", **kwargs):
        super().__init__(_drop_classes(image_counts, num_images, lambda_), mode=mode,
                         activation=activation, **kwargs)


class DropLoss(GOLLoss):
    """DropLoss (Hsieh et al., AAAI 2021): sigmoid activation with the DropLoss weights."""

    def __init__(self, image_counts: Sequence[int], num_images: int,
                 lambda_: float = DEFAULT_LAMBDA, **kwargs):
        kwargs.setdefault("activation", "sigmoid")
        super().__init__(image_counts, num_images, lambda_, mode="droploss", **kwargs)


class EQLLoss(GOLLoss):
    """Equalization Loss (Tan et al., CVPR 2020): rare-class negatives ignored on foreground RoIs."""

    def __init__(self, image_counts: Sequence[int], num_images: int,
                 lambda_: float = DEFAULT_LAMBDA, **kwargs):
        kwargs.setdefault("activation", "sigmoid")
        super().__init__(image_counts, num_images, lambda_, mode="eql", **kwargs)


class SigmoidBCELoss(FusedGOLLoss):
    """Sigmoid binary cross-entropy over a C-way head (background rows: all negative)."""

    def __init__(self, **kwargs):
        super().__init__(None, mode="bce", activation="sigmoid", **kwargs)


class SigmoidCELoss(FusedGOLLoss):
    """The official Sigmoid baseline (GOL Table 1; mmdetection's CrossEntropyLoss with
    use_sigmoid=True): sigmoid BCE over a (C+1)-way head whose last column is background, the
    positive of background rows. mmdetection 2.21 scores this head with a softmax over all
    C + 1 outputs (model.score_activation: softmax); the paper describes sigmoid scores."""

    def __init__(self, **kwargs):
        super().__init__(None, mode="bce", activation="sigmoid", background_logit=True, **kwargs)


class GumbelBCELoss(FusedGOLLoss):
    """Gumbel activation with plain binary cross-entropy over a C-way head (paper Table 1)."""

    def __init__(self, **kwargs):
        super().__init__(None, mode="bce", activation="gumbel", **kwargs)


# The official GumbelCE clamps its reduced loss to [0, 20]: no gradient from a batch above 20.
GUMBEL_CE_LOSS_CLAMP = (0.0, 20.0)


class GumbelCELoss(FusedGOLLoss):
    """GOL's GumbelCE: a (C+1)-way head whose last column is background, trained with Gumbel BCE.

    Labels keep the C = background convention: label C is the positive of the background column.
    As the official GumbelCE, the reduced loss is clamped to `loss_clamp` ([0, 20]; None: no
    clamp), so a batch whose mean loss exceeds 20 contributes no gradient.
    """

    def __init__(self, *, loss_clamp: Optional[Tuple[float, float]] = GUMBEL_CE_LOSS_CLAMP,
                 **kwargs):
        super().__init__(None, mode="bce", activation="gumbel", background_logit=True, **kwargs)
        if loss_clamp is not None and (len(loss_clamp) != 2 or loss_clamp[0] > loss_clamp[1]):
            raise ValueError(f"GumbelCELoss: loss_clamp must be (low, high) with low <= high, "
                             f"got {loss_clamp!r}")
        self.loss_clamp = None if loss_clamp is None else tuple(float(v) for v in loss_clamp)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, *,
                class_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        loss = super().forward(logits, labels, class_weight=class_weight)
        if self.loss_clamp is None:
            return loss
        return loss.clamp(*self.loss_clamp)  # clamp's gradient is 0 outside [low, high]


class SoftmaxCELoss(nn.Module):
    """torchvision's default: softmax cross-entropy over a (C+1)-way head, background = C."""

    activation = "softmax"

    def num_logits(self, num_classes: int) -> int:
        return num_classes + 1

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels)


LOSS_NAMES = ("softmax", "sigmoid", "sigmoid_ce", "gumbel", "eql", "droploss", "gol", "gumbel_ce",
              "federated", "federated_gumbel", "eqlv2", "eqlv2_gumbel")


def build_classification_loss(name: str, image_counts: Optional[Sequence[int]] = None,
                              num_images: Optional[int] = None, **kwargs) -> nn.Module:
    """The classification loss of a config by name (see LOSS_NAMES).

    "gol" is Gumbel + DropLoss, "droploss" and "eql" are the sigmoid methods, "gumbel" is Gumbel
    BCE, "gumbel_ce" the (C+1)-way GumbelCE, "sigmoid" sigmoid BCE over C logits and
    "sigmoid_ce" over C + 1 (the official Sigmoid baseline); "eql", "droploss" and "gol" need
    the class frequencies (image_counts, num_images) and accept lambda_.
    "federated"/"federated_gumbel" (Federated Loss, sigmoid/Gumbel) need image_counts;
    "eqlv2"/"eqlv2_gumbel" (EQLv2, sigmoid/Gumbel) take num_classes (default len(image_counts)).
    """
    if name == "softmax":
        return SoftmaxCELoss()
    if name == "sigmoid":
        return SigmoidBCELoss(**kwargs)
    if name == "sigmoid_ce":
        return SigmoidCELoss(**kwargs)
    if name == "gumbel":
        return GumbelBCELoss(**kwargs)
    if name == "gumbel_ce":
        return GumbelCELoss(**kwargs)
    if name == "eql":
        return EQLLoss(image_counts, num_images, **kwargs)
    if name == "droploss":
        return DropLoss(image_counts, num_images, **kwargs)
    if name == "gol":
        return GOLLoss(image_counts, num_images, **kwargs)
    if name in ("federated", "federated_gumbel"):
        kwargs.setdefault("activation", "gumbel" if name == "federated_gumbel" else "sigmoid")
        return FederatedLoss(image_counts, num_images, **kwargs)
    if name in ("eqlv2", "eqlv2_gumbel"):
        kwargs.setdefault("activation", "gumbel" if name == "eqlv2_gumbel" else "sigmoid")
        num_classes = kwargs.pop("num_classes", None)
        if num_classes is None:
            if image_counts is None:
                raise ValueError(f"{name!r} needs num_classes (or image_counts to count them)")
            num_classes = len(image_counts)
        return EQLv2Loss(int(num_classes), **kwargs)
    raise ValueError(f"unknown classification loss {name!r}; expected one of "
                     f"{', '.join(LOSS_NAMES)}")


# --------------------------------------------------------------------------------------------
# The rest of the paper's toolbox (GOL Fig. 4(ii)): Federated Loss and EQLv2, each with a
# sigmoid or a Gumbel activation.
# --------------------------------------------------------------------------------------------

class FederatedLoss(nn.Module):
    """Federated Loss (Zhou et al., "Probabilistic two-stage detection", 2021) over a C-way head.

    Per call, the loss is only computed on a subset S of the C class columns:
    S = the foreground classes present among `labels`, plus classes drawn *without replacement*
    from the remaining ones with probability proportional to image_count ** freq_weight_power
    (0.5) until |S| = num_sampled (50); if the batch's foreground classes already number
    num_sampled or more, S is just those. (Classes with a zero image count have zero
    probability; they are drawn uniformly only when every positive-probability class is taken,
    so |S| = min(C, num_sampled) whenever that many classes exist.) The columns outside S get
    weight 0, i.e. no loss and no gradient: the loss is
    `gol_loss(logits, labels, mode="bce", activation=..., class_weight=1[S])` with the mean
    reduction of every other module (sum over rows and selected columns / #rows).

    Args:
        image_counts: (C,) training images per class (LVIS `image_count`).
        num_images: accepted for a uniform constructor signature; unused.
        activation: "sigmoid" (the published method) or "gumbel" (GOL Fig. 4(ii)).
        num_sampled: the number of classes the loss sees per call (50 on LVIS).
        freq_weight_power: the exponent of the sampling weights (0.5).
        generator: an optional CPU torch.Generator for the class draw (default: torch's global
            CPU generator, so `torch.manual_seed` reproduces a run).
        clamp, grad_mode, backend: passed to gumbel_kernels.gol_loss (clamp only for Gumbel).

    After a call, `last_selected` holds the sorted (|S|,) int64 CPU tensor of selected classes.
    """

    def __init__(self, image_counts: Sequence[int], num_images: Optional[int] = None, *,
                 activation: str = "sigmoid", num_sampled: int = 50,
                 freq_weight_power: float = 0.5, generator: Optional[torch.Generator] = None,
                 clamp: Optional[Tuple] = DEFAULT_CLAMP, grad_mode: str = "reference",
                 backend: str = "auto"):
        super().__init__()
        if image_counts is None:
            raise ValueError("FederatedLoss needs the training set's per-class image_counts")
        counts = torch.as_tensor(image_counts, dtype=torch.float64)
        if counts.dim() != 1 or counts.numel() < 1:
            raise ValueError(f"FederatedLoss: image_counts must have shape (C,), got "
                             f"{tuple(counts.shape)}")
        if bool((counts < 0).any()) or not bool(torch.isfinite(counts).all()):
            raise ValueError("FederatedLoss: image_counts must be finite and >= 0")
        if activation not in ("sigmoid", "gumbel"):
            raise ValueError(f"FederatedLoss: activation must be 'sigmoid' or 'gumbel', got "
                             f"{activation!r}")
        if not isinstance(num_sampled, int) or num_sampled < 1:
            raise ValueError(f"FederatedLoss: num_sampled must be a positive int, got "
                             f"{num_sampled!r}")
        # Sampling happens on the CPU (a few hundred classes), so the weights stay a CPU tensor.
        self.sample_weights = counts.pow(freq_weight_power)
        self.num_classes = counts.numel()
        self.num_images = num_images
        self.activation = activation
        self.num_sampled = num_sampled
        self.freq_weight_power = freq_weight_power
        self.generator = generator
        self.clamp = clamp if activation == "gumbel" else None
        self.grad_mode = grad_mode
        self.backend = backend
        self.last_selected: Optional[torch.Tensor] = None

    def num_logits(self, num_classes: int) -> int:
        return num_classes

    def select_classes(self, labels: torch.Tensor) -> torch.Tensor:
        """The sorted int64 CPU tensor of the classes S the loss sees for these labels."""
        num_classes = self.num_classes
        labels = labels.detach()
        gt = torch.unique(labels[(labels >= 0) & (labels < num_classes)]).to("cpu", torch.int64)
        needed = min(self.num_sampled, num_classes) - gt.numel()
        if needed <= 0:
            return gt
        weights = self.sample_weights.clone()
        weights[gt] = 0.0
        available = int((weights > 0).sum())
        drawn = []
        if available > 0:
            take = min(needed, available)
            drawn.append(torch.multinomial(weights, take, replacement=False,
                                           generator=self.generator))
            needed -= take
        if needed > 0:  # only zero-count classes are left: draw them uniformly
            rest = torch.ones(num_classes, dtype=torch.float64)
            rest[gt] = 0.0
            for chosen in drawn:
                rest[chosen] = 0.0
            drawn.append(torch.multinomial(rest, needed, replacement=False,
                                           generator=self.generator))
        return torch.sort(torch.cat([gt] + drawn)).values

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"FederatedLoss: logits must have shape (N, {self.num_classes}), "
                             f"got {tuple(logits.shape)}")
        selected = self.select_classes(labels)
        self.last_selected = selected
        math_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        mask = torch.zeros(self.num_classes, dtype=math_dtype)
        mask[selected] = 1.0
        return gol_loss(logits, labels, None, mode="bce", activation=self.activation,
                        clamp=self.clamp, grad_mode=self.grad_mode,
                        class_weight=mask.to(logits.device), backend=self.backend)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, activation={self.activation!r}, "
                f"num_sampled={self.num_sampled}, freq_weight_power={self.freq_weight_power}")


_NO_SEED = torch.zeros((), dtype=torch.int64)  # mode "bce" draws no uniforms


class _EQLv2Function(torch.autograd.Function):
    """Forward: gumbel::gol_loss_class_stats, i.e. one fused pass over the logits that gives the
    loss, its gradient and the per-class sums of |gradient| over the positive and the negative
    elements (the CPU/CUDA kernel; elsewhere the reference implementation of the same op). Negatives
    of column j weigh neg_weight[j], the positive of a row with label j pos_weight[j].

    Returns (loss, pos_sums, neg_sums); the sums are non-differentiable and refer to the
    *summed* loss, as EQLv2 collects them. The backward scales the saved gradient.
    """

    @staticmethod
    def forward(ctx, logits, labels, pos_weight, neg_weight, activation, clamp_min, clamp_max,
                grad_mode, reduction, ignore_index):
        args = (logits.detach(), labels, None, neg_weight, pos_weight, None, _NO_SEED, 0, "bce",
                activation, reduction, clamp_min, clamp_max, grad_mode, ignore_index)
        device_key = "CUDA" if logits.is_cuda else "CPU"
        if _ops.has_kernel("gol_loss_class_stats", device_key):
            loss, grad, pos_sums, neg_sums = torch.ops.gumbel.gol_loss_class_stats(*args)
        else:
            loss, grad, pos_sums, neg_sums = _reference.gol_loss_class_stats_forward(*args)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(pos_sums, neg_sums)
        return loss, pos_sums, neg_sums

    @staticmethod
    def backward(ctx, grad_loss, _unused_pos, _unused_neg):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss).to(grad.dtype), *((None,) * 9)


class EQLv2Loss(nn.Module):
    """Equalization Loss v2 (Tan et al., CVPR 2021): gradient-guided reweighting, C-way head.

    Per class j the module keeps two buffers, `pos_grad[j]` and `neg_grad[j]`: the accumulated
    sums of |d loss / d q_ij| over the positive (y_ij = 1) resp. negative (y_ij = 0) elements of
    column j, over every training call so far. Before each call:
        ratio_j = pos_grad_j / (neg_grad_j + 1e-10)
        neg_w_j = sigmoid(gamma * (ratio_j - mu)),   pos_w_j = 1 + alpha * (1 - neg_w_j)
        w_ij    = y_ij * pos_w_j + (1 - y_ij) * neg_w_j
    (background rows, label C, are negative in every column; ignored rows weigh 0). As in the
    published implementation, the very first call (no statistics yet, `num_updates == 0`) uses
    w = 1 everywhere.

    loss = sum_ij w_ij * loss_ij / #non-ignored rows ("mean"; "sum" without the division), with
    the element loss and gradient of gumbel_kernels.reference.element_loss_and_grad
    (sigmoid BCE, or the Gumbel BCE clamped to (-4, 10)).

    The statistics come out of the loss's own pass over the logits (gumbel::gol_loss_class_stats,
    whose CPU and CUDA kernels sum them over fixed row blocks in a fixed order, so they are
    deterministic): with G_ij = w_ij d loss_ij / d q_ij
    the gradient of the *summed* loss, as EQLv2 collects it,
        pos_j = sum over rows i with label j of |G_ij|,   neg_j = sum over the other rows |G_ij|.
    Under torch.distributed the pair is all-reduced (summed over ranks) before it is added to
    the buffers. Statistics are only collected in training mode, and a column whose statistic
    is not finite (NaN/Inf logits) is left out of that update so one bad batch cannot poison
    the buffers. Without the compiled kernels the op runs as its reference implementation.

    Args:
        num_classes: C, the head width.
        activation: "sigmoid" (the published EQLv2) or "gumbel" (GOL Fig. 4(ii)).
        gamma, mu, alpha: EQLv2's mapping function and positive up-weighting (12, 0.8, 4).
        clamp, grad_mode: the Gumbel clamp and gradient mode (see gumbel_kernels.gol_loss).
        reduction: "mean" (default) or "sum".
    """

    def __init__(self, num_classes: int, *, activation: str = "sigmoid", gamma: float = 12.0,
                 mu: float = 0.8, alpha: float = 4.0, clamp: Optional[Tuple] = DEFAULT_CLAMP,
                 grad_mode: str = "reference", reduction: str = "mean",
                 ignore_index: int = -100):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"EQLv2Loss: num_classes must be a positive int, got {num_classes!r}")
        if activation not in ("sigmoid", "gumbel"):
            raise ValueError(f"EQLv2Loss: activation must be 'sigmoid' or 'gumbel', got "
                             f"{activation!r}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"EQLv2Loss: reduction must be 'mean' or 'sum', got {reduction!r}")
        if grad_mode not in ("reference", "exact"):
            raise ValueError(f"EQLv2Loss: grad_mode must be 'reference' or 'exact', got "
                             f"{grad_mode!r}")
        self.num_classes = num_classes
        self.activation = activation
        self.gamma, self.mu, self.alpha = float(gamma), float(mu), float(alpha)
        clamp = clamp if activation == "gumbel" else None
        self.clamp = clamp
        self.clamp_min, self.clamp_max = (None, None) if clamp is None else (
            None if clamp[0] is None else float(clamp[0]),
            None if clamp[1] is None else float(clamp[1]))
        self.grad_mode = grad_mode
        self.reduction = reduction
        self.ignore_index = ignore_index
        # float64 accumulators: they sum over the whole schedule (~10^5 iterations).
        self.register_buffer("pos_grad", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("neg_grad", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))

    def num_logits(self, num_classes: int) -> int:
        return num_classes

    def class_weights(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(pos_w, neg_w), each (C,) float64, from the statistics accumulated so far."""
        if int(self.num_updates) == 0:
            ones = torch.ones_like(self.pos_grad)
            return ones, ones.clone()
        ratio = self.pos_grad / (self.neg_grad + 1e-10)
        neg_w = torch.sigmoid(self.gamma * (ratio - self.mu))
        pos_w = 1.0 + self.alpha * (1.0 - neg_w)
        return pos_w, neg_w

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"EQLv2Loss: logits must have shape (N, {self.num_classes}), got "
                             f"{tuple(logits.shape)}")
        if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
            raise ValueError(f"EQLv2Loss: labels must have shape (N,) = ({logits.shape[0]},), "
                             f"got {tuple(labels.shape)}")
        labels = labels.to(torch.int64)
        _reference.check_labels(labels, self.num_classes, self.ignore_index)
        pos_w, neg_w = self.class_weights()
        loss, pos_sums, neg_sums = _EQLv2Function.apply(
            logits, labels, pos_w.to(logits.device), neg_w.to(logits.device), self.activation,
            self.clamp_min, self.clamp_max, self.grad_mode, self.reduction, self.ignore_index)
        if self.training:
            self._accumulate(pos_sums, neg_sums)
        return loss

    @torch.no_grad()
    def _accumulate(self, pos_sums: torch.Tensor, neg_sums: torch.Tensor) -> None:
        stats = torch.stack([pos_sums, neg_sums])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(stats)
        finite = torch.isfinite(stats).all(dim=0, keepdim=True)
        stats = torch.where(finite, stats, torch.zeros_like(stats))
        self.pos_grad += stats[0].to(self.pos_grad)
        self.neg_grad += stats[1].to(self.neg_grad)
        self.num_updates += 1

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, activation={self.activation!r}, "
                f"gamma={self.gamma}, mu={self.mu}, alpha={self.alpha}")

