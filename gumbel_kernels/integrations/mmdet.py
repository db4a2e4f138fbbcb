"""The GOL losses for mmdetection 3.x: importing this module registers them in mmdet's MODELS.

Two lines in an mmdet 3.x config (see configs/mmdet/ for the full GOL recipe):

    custom_imports = dict(imports=['gumbel_kernels.integrations.mmdet'], allow_failed_imports=False)
    model = dict(roi_head=dict(bbox_head=dict(
        loss_cls=dict(type='GOLLoss', ann_file='data/lvis_v1/annotations/lvis_v1_train.json'))))

Registered types (RoI classification losses of a BBoxHead; C = num_classes):

    type                 fc_cls width  method                                  activation
    GOLLoss              C             Gumbel + DropLoss weights (GOL)         'gumbel' | 'sigmoid' (= DropLoss)
    GumbelEQLLoss        C             Equalization Loss weights               'gumbel' | 'sigmoid' (= EQL)
    GumbelBCELoss        C             plain binary cross-entropy              'gumbel' | 'sigmoid'
    GumbelCELoss         C + 1         GOL's GumbelCE, loss clamped to [0, 20] Gumbel only
    GumbelFederatedLoss  C             Federated Loss (50 sampled classes)     'gumbel' | 'sigmoid'
    GumbelEQLv2Loss      C             EQLv2 (gradient-guided reweighting)     'gumbel' | 'sigmoid'

Every loss follows mmdet's classification-loss protocol: `forward(cls_score, label, weight=None,
avg_factor=None, reduction_override=None)` with labels 0..C-1 for the classes and C for
background (the convention of gumbel_kernels.gol_loss too), and sets `custom_cls_channels`,
`custom_activation` and `custom_accuracy`, so that mmdet's BBoxHead sizes fc_cls with
`get_cls_channels`, scores detections with `get_activation` (Gumbel or sigmoid scores plus a zero
background column, which mmdet's multiclass_nms drops) and logs `get_accuracy`.

What mmdet's arguments mean here (N rows = sampled RoIs; l_ij the element loss of gol_loss, its
DropLoss/EQL/Federated weights included; "row loss" L_i = sum_j l_ij):
- `weight` (mmdet's label_weights, shape (N,)) is gol_loss's `row_weight`: L_i counts
  weight[i] times; weight 0 gives the row no loss and no gradient.
- reduction "mean" with `avg_factor` (what BBoxHead.loss passes: the number of rows with
  weight > 0): `gol_loss(..., reduction="sum") / (avg_factor + eps)`, eps = float32 epsilon,
  exactly mmdet's weight_reduce_loss. With the default `pos_weight=-1` every weight is 1 and
  avg_factor = N, i.e. GOL's own sum / N.
- "mean" without avg_factor: gol_loss's mean, sum_i weight[i] * L_i / (number of rows; rows
  labelled -100 are not counted). "sum": the sum (avg_factor with "sum" raises, as in mmdet).
- "none" (reduction_override, e.g. mmdet's OHEM sampler): the (N,) per-RoI losses
  weight[i] * L_i, float32 (float64 for float64 logits).
The result is multiplied by `loss_weight`. Half-precision (AMP) logits go in as they are: the
kernel computes in float32, the scalar loss is float32 and the gradient has the logits' dtype.
The DropLoss draw uses `seed=None`, i.e. a seed drawn from torch's default CPU generator, so
`torch.manual_seed` (mmengine's `randomness.seed`) reproduces a run. `use_sigmoid`, which
mmdet's base configs leave in loss_cls, is accepted and ignored: `activation` decides.

Class frequencies (GOLLoss, GumbelEQLLoss, GumbelFederatedLoss) come from `image_counts` +
`num_images`, or from `ann_file`, an LVIS json: the image_count of each category, class k being
the k-th category of the file (mmdet's LVIS datasets number them so; LVIS lists them by id),
and, as the official GOL code counts them, the number of distinct images with annotations. The
json is read once per process at build time (as the dataset reads it); pass image_counts +
num_images to skip that.
"""
from __future__ import annotations

import functools
import inspect
import json
import os
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from mmdet.models.losses.accuracy import accuracy
from mmdet.registry import MODELS

from .. import losses
from ..backends import BACKENDS
from ..functional import (DEFAULT_CLAMP, DEFAULT_LAMBDA, GRAD_MODES, gol_loss,
                          gumbel_activation)

__all__ = ["GOLLoss", "GumbelEQLLoss", "GumbelBCELoss", "GumbelCELoss", "GumbelFederatedLoss",
           "GumbelEQLv2Loss", "lvis_class_frequencies"]

ACTIVATIONS = ("gumbel", "sigmoid")
REDUCTIONS = ("mean", "sum", "none")
LVIS_V1_NUM_CLASSES = 1203
# The divisor guard of mmdet's weight_reduce_loss: loss.sum() / (avg_factor + eps).
_AVG_FACTOR_EPS = torch.finfo(torch.float32).eps


# ----------------------------------------------------------------------------------------------
# Class frequencies from an LVIS json
# ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _read_lvis_frequencies(path: str, _mtime_ns: int, _size: int) -> Tuple[Tuple[int, ...], int]:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"ann_file {path}: not valid json ({e})") from e
    for key in ("categories", "annotations"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise ValueError(f"ann_file {path}: needs a '{key}' list (an LVIS annotation file)")
    counts = {}  # category id -> image_count, in the file's order
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or "id" not in cat or "image_count" not in cat:
            raise ValueError(f"ann_file {path}: categories[{i}] needs 'id' and 'image_count' "
                             f"(LVIS categories carry both)")
        count = cat["image_count"]
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError(f"ann_file {path}: categories[{i}].image_count={count!r} must be an "
                             f"integer >= 0")
        if cat["id"] in counts:
            raise ValueError(f"ann_file {path}: categories[{i}].id={cat['id']!r} repeats")
        counts[cat["id"]] = count
    image_ids = set()
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann:
            raise ValueError(f"ann_file {path}: annotations[{i}] has no 'image_id'")
        image_ids.add(ann["image_id"])
    if not counts or not image_ids:
        raise ValueError(f"ann_file {path}: has {len(counts)} categories and "
                         f"{len(image_ids)} annotated images; both must be > 0")
    return tuple(counts.values()), len(image_ids)


def lvis_class_frequencies(ann_file) -> Tuple[Tuple[int, ...], int]:
    """(image_counts, num_images) of an LVIS json: the image_count of each category in the file's
    order (mmdet's class order) and the number of distinct images that have annotations (the
    official GOL frequencies)."""
    path = os.path.realpath(os.fspath(ann_file))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ann_file {os.fspath(ann_file)!r} does not exist")
    stat = os.stat(path)
    return _read_lvis_frequencies(path, stat.st_mtime_ns, stat.st_size)


# ----------------------------------------------------------------------------------------------
# Option checks shared by the losses
# ----------------------------------------------------------------------------------------------

def _reject_unknown_options(loss: nn.Module, unknown: dict) -> None:
    # mmdet's base configs give loss_cls `use_sigmoid`, which dict merging carries into any
    # loss_cls a config puts in its place (the official GOL losses take it as a dummy too);
    # `activation` is what chooses the activation here.
    unknown.pop("use_sigmoid", None)
    if not unknown:
        return
    known = [name for name, p in inspect.signature(type(loss).__init__).parameters.items()
             if name != "self" and p.kind == p.KEYWORD_ONLY]
    raise TypeError(f"{type(loss).__name__}: unknown option(s) {', '.join(sorted(unknown))}; "
                    f"the options are {', '.join(known)}")


def _check_choice(loss_name: str, option: str, value, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{loss_name}: {option} must be one of "
                         f"{', '.join(map(repr, choices))}, got {value!r}")


def _frequencies(loss_name: str, num_classes: int, image_counts, num_images, ann_file,
                 need_num_images: bool = True) -> Tuple[list, Optional[int]]:
    """The (image_counts, num_images) a loss was given, checked against num_classes."""
    if ann_file is not None:
        if image_counts is not None or num_images is not None:
            raise ValueError(f"{loss_name}: give either ann_file or image_counts + num_images, "
                             f"not both")
        image_counts, num_images = lvis_class_frequencies(ann_file)
        source = f"ann_file {os.fspath(ann_file)!r} has {len(image_counts)} categories"
    else:
        if image_counts is None or (need_num_images and num_images is None):
            needed = "image_counts + num_images" if need_num_images else "image_counts"
            raise ValueError(f"{loss_name}: needs the training set's class frequencies: "
                             f"{needed}, or ann_file (the LVIS train json)")
        image_counts = torch.as_tensor(image_counts).tolist()
        if not isinstance(image_counts, list):
            raise ValueError(f"{loss_name}: image_counts must be a sequence of {num_classes} "
                             f"counts, got a scalar")
        source = f"image_counts has {len(image_counts)} entries"
    if len(image_counts) != num_classes:
        raise ValueError(f"{loss_name}: {source}, but num_classes={num_classes} (one image count "
                         f"per class, in the dataset's class order)")
    return image_counts, num_images


# ----------------------------------------------------------------------------------------------
# The mmdet protocol, shared by every loss
# ----------------------------------------------------------------------------------------------

class _MMDetClassificationLoss(nn.Module):
    """mmdet's classification-loss protocol around a loss module of gumbel_kernels.losses
    (`self.criterion`); subclasses say how one call of the fused loss is made (`_fused`)."""

    has_background_logit = False  # True: a (C+1)-way fc_cls whose last column is background
    reductions = REDUCTIONS

    def __init__(self, unknown: dict, *, num_classes: int, activation: str, loss_weight: float,
                 reduction: str, grad_mode: str, backend: str = "auto"):
        """`unknown`: the options a subclass was given beyond its signature (an error)."""
        super().__init__()
        _reject_unknown_options(self, unknown)
        name = type(self).__name__
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"{name}: num_classes must be a positive int, got {num_classes!r}")
        _check_choice(name, "activation", activation, ACTIVATIONS)
        _check_choice(name, "reduction", reduction, self.reductions)
        _check_choice(name, "grad_mode", grad_mode, GRAD_MODES)
        _check_choice(name, "backend", backend, ("auto",) + BACKENDS)
        self.num_classes = num_classes
        self.activation = activation
        self.loss_weight = float(loss_weight)
        self.reduction = reduction
        # Read by mmdet's BBoxHead: fc_cls width, inference scores and logged accuracy are ours.
        self.custom_cls_channels = True
        self.custom_activation = True
        self.custom_accuracy = True

    @property
    def num_logits(self) -> int:
        return self.num_classes + 1 if self.has_background_logit else self.num_classes

    def get_cls_channels(self, num_classes: int) -> int:
        """The width of fc_cls for a head of `num_classes` classes."""
        if num_classes != self.num_classes:
            raise ValueError(f"{type(self).__name__}: the bbox head has num_classes={num_classes} "
                             f"but loss_cls has num_classes={self.num_classes}; set both to the "
                             f"dataset's number of classes")
        return self.num_logits

    def get_activation(self, cls_score: torch.Tensor) -> torch.Tensor:
        """(N, C + 1) detection scores: Gumbel exp(-exp(-q)) (or sigmoid) of the raw logits,
        plus a zero background column on the C-way heads (mmdet's NMS drops the last column)."""
        self._check_cls_score(cls_score)
        if self.activation == "gumbel":
            scores = gumbel_activation(cls_score)
        else:
            scores = torch.sigmoid(cls_score)
        if self.has_background_logit:
            return scores
        return torch.cat([scores, scores.new_zeros((scores.shape[0], 1))], dim=1)

    def get_accuracy(self, cls_score: torch.Tensor, labels: torch.Tensor) -> Dict[str, torch.Tensor]:
        """acc_classes: top-1 accuracy (percent) over the C classes, on the foreground RoIs."""
        foreground = (labels >= 0) & (labels < self.num_classes)
        return {"acc_classes": accuracy(cls_score[foreground, :self.num_classes],
                                        labels[foreground])}

    def _check_cls_score(self, cls_score: torch.Tensor) -> None:
        if cls_score.dim() != 2 or cls_score.shape[1] != self.num_logits:
            raise ValueError(f"{type(self).__name__}: cls_score must have shape "
                             f"(N, {self.num_logits}) for num_classes={self.num_classes}, got "
                             f"{tuple(cls_score.shape)}")

    def forward(self, cls_score: torch.Tensor, label: torch.Tensor,
                weight: Optional[torch.Tensor] = None, avg_factor=None,
                reduction_override: Optional[str] = None) -> torch.Tensor:
        """The loss of (N, width) logits `cls_score` for labels in [0, C] (see the module doc)."""
        name = type(self).__name__
        if reduction_override is not None:
            _check_choice(name, "reduction_override", reduction_override, self.reductions)
        reduction = reduction_override or self.reduction
        self._check_cls_score(cls_score)
        math_dtype = _math_dtype(cls_score)
        row_weight = None
        if weight is not None:
            if weight.shape != (cls_score.shape[0],):
                raise ValueError(f"{name}: weight (label_weights) must have shape (N,) = "
                                 f"({cls_score.shape[0]},), got {tuple(weight.shape)}")
            row_weight = weight.to(math_dtype)
        if reduction == "none":
            loss = self._fused(cls_score, label, row_weight, "none").to(math_dtype).sum(dim=1)
        elif avg_factor is None:
            loss = self._fused(cls_score, label, row_weight, reduction)
        elif reduction == "mean":
            loss = self._fused(cls_score, label, row_weight, "sum") / (avg_factor + _AVG_FACTOR_EPS)
        else:
            raise ValueError(f'{name}: avg_factor can not be used with reduction="sum"')
        return self.loss_weight * self._after_reduction(loss)

    def _fused(self, cls_score, labels, row_weight, reduction: str) -> torch.Tensor:
        """gumbel_kernels.gol_loss with the criterion's settings: mean, sum or (N, C) elements."""
        c = self.criterion
        return gol_loss(cls_score, labels, c.drop_classes, mode=c.mode, activation=c.activation,
                        reduction=reduction, clamp=c.clamp, grad_mode=c.grad_mode,
                        row_weight=row_weight, backend=c.backend)

    def _after_reduction(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, activation={self.activation!r}, "
                f"loss_weight={self.loss_weight}, reduction={self.reduction!r}")


# ----------------------------------------------------------------------------------------------
# The registered losses
# ----------------------------------------------------------------------------------------------

@MODELS.register_module()
class GOLLoss(_MMDetClassificationLoss):
    """GOL: Gumbel activation + DropLoss (the rare classes' negatives dropped), C-way head.

    Options: num_classes (1203), image_counts + num_images or ann_file (class frequencies),
    lambda_ (0.0011: classes with image frequency below it are rare), activation ('gumbel';
    'sigmoid' is DropLoss), loss_weight (1.0), reduction ('mean'), clamp ((-4, 10), the Gumbel
    logit clamp), grad_mode ('reference'), backend ('auto'): see gumbel_kernels.gol_loss.
    """

    _mode = "droploss"

    def __init__(self, *, num_classes: int = LVIS_V1_NUM_CLASSES,
                 image_counts: Optional[Sequence[int]] = None, num_images: Optional[int] = None,
                 ann_file: Optional[str] = None, lambda_: float = DEFAULT_LAMBDA,
                 activation: str = "gumbel", loss_weight: float = 1.0, reduction: str = "mean",
                 clamp=DEFAULT_CLAMP, grad_mode: str = "reference", backend: str = "auto",
                 **unknown):
        super().__init__(unknown, num_classes=num_classes, activation=activation,
                         loss_weight=loss_weight, reduction=reduction, grad_mode=grad_mode,
                         backend=backend)
        counts, images = _frequencies(type(self).__name__, num_classes, image_counts,
                                      num_images, ann_file)
        self.criterion = losses.GOLLoss(counts, images, lambda_, activation=activation,
                                        mode=self._mode, clamp=_clamp(clamp),
                                        grad_mode=grad_mode, backend=backend)


@MODELS.register_module()
class GumbelEQLLoss(GOLLoss):
    """Equalization Loss weights (rare negatives ignored on foreground RoIs), Gumbel or sigmoid
    (= EQL); the options of GOLLoss."""

    _mode = "eql"


@MODELS.register_module()
class GumbelBCELoss(_MMDetClassificationLoss):
    """Plain binary cross-entropy over a C-way head, Gumbel (paper Table 1) or sigmoid.

    Options: num_classes, activation, loss_weight, reduction, clamp, grad_mode, backend (as GOLLoss).
    """

    def __init__(self, *, num_classes: int = LVIS_V1_NUM_CLASSES, activation: str = "gumbel",
                 loss_weight: float = 1.0, reduction: str = "mean", clamp=DEFAULT_CLAMP,
                 grad_mode: str = "reference", backend: str = "auto", **unknown):
        super().__init__(unknown, num_classes=num_classes, activation=activation,
                         loss_weight=loss_weight, reduction=reduction, grad_mode=grad_mode,
                         backend=backend)
        module = losses.GumbelBCELoss if activation == "gumbel" else losses.SigmoidBCELoss
        self.criterion = module(clamp=_clamp(clamp), grad_mode=grad_mode, backend=backend)


@MODELS.register_module()
class GumbelCELoss(_MMDetClassificationLoss):
    """GOL's GumbelCE: a (C+1)-way fc_cls (last column background) trained with Gumbel BCE.

    Label C is the positive of the background column. As the official code, the reduced loss
    (after avg_factor, before loss_weight) is clamped to [0, 20], so a batch whose loss is above
    20 gives no gradient; with reduction "none" each RoI's loss is clamped.
    get_activation returns the Gumbel scores of all C + 1 columns, get_accuracy also `acc`:
    the (C+1)-way top-1 accuracy over all RoIs, background included (what the official
    GumbelCE logs as acc_classes).

    Options: num_classes, loss_weight, reduction, clamp, grad_mode, backend (as GOLLoss).
    """

    has_background_logit = True

    def __init__(self, *, num_classes: int = LVIS_V1_NUM_CLASSES, loss_weight: float = 1.0,
                 reduction: str = "mean", clamp=DEFAULT_CLAMP, grad_mode: str = "reference",
                 backend: str = "auto", **unknown):
        super().__init__(unknown, num_classes=num_classes, activation="gumbel",
                         loss_weight=loss_weight, reduction=reduction, grad_mode=grad_mode,
                         backend=backend)
        self.criterion = losses.GumbelCELoss(clamp=_clamp(clamp), grad_mode=grad_mode,
                                             backend=backend)

    def get_accuracy(self, cls_score, labels):
        acc = super().get_accuracy(cls_score, labels)
        acc["acc"] = accuracy(cls_score, labels)
        return acc

    def _after_reduction(self, loss):
        # The official [0, 20] clamp of losses.GumbelCELoss, applied here after mmdet's
        # avg_factor division (the module's forward would clamp before it).
        return loss.clamp(*self.criterion.loss_clamp)


@MODELS.register_module()
class GumbelFederatedLoss(_MMDetClassificationLoss):
    """Federated Loss over a C-way head: per call only the batch's classes plus classes drawn by
    image_count ** freq_weight_power, up to num_sampled (see gumbel_kernels.losses.FederatedLoss),
    Gumbel or sigmoid (the published method).

    Options: num_classes, image_counts (+ optional num_images) or ann_file, num_sampled (50),
    freq_weight_power (0.5), activation, loss_weight, reduction, clamp, grad_mode, backend.
    """

    def __init__(self, *, num_classes: int = LVIS_V1_NUM_CLASSES,
                 image_counts: Optional[Sequence[int]] = None, num_images: Optional[int] = None,
                 ann_file: Optional[str] = None, num_sampled: int = 50,
                 freq_weight_power: float = 0.5, activation: str = "gumbel",
                 loss_weight: float = 1.0, reduction: str = "mean", clamp=DEFAULT_CLAMP,
                 grad_mode: str = "reference", backend: str = "auto", **unknown):
        super().__init__(unknown, num_classes=num_classes, activation=activation,
                         loss_weight=loss_weight, reduction=reduction, grad_mode=grad_mode,
                         backend=backend)
        counts, images = _frequencies(type(self).__name__, num_classes, image_counts,
                                      num_images, ann_file, need_num_images=False)
        self.criterion = losses.FederatedLoss(counts, images, activation=activation,
                                              num_sampled=num_sampled,
                                              freq_weight_power=freq_weight_power,
                                              clamp=_clamp(clamp), grad_mode=grad_mode,
                                              backend=backend)

    def _fused(self, cls_score, labels, row_weight, reduction):
        c = self.criterion
        selected = c.select_classes(labels)
        c.last_selected = selected
        mask = torch.zeros(self.num_classes, dtype=_math_dtype(cls_score))
        mask[selected] = 1.0
        return gol_loss(cls_score, labels, None, mode="bce", activation=c.activation,
                        reduction=reduction, clamp=c.clamp, grad_mode=c.grad_mode,
                        class_weight=mask.to(cls_score.device), row_weight=row_weight,
                        backend=c.backend)


@MODELS.register_module()
class GumbelEQLv2Loss(_MMDetClassificationLoss):
    """EQLv2 over a C-way head (see gumbel_kernels.losses.EQLv2Loss), Gumbel or sigmoid (the
    published method); its gradient statistics are buffers (saved in checkpoints), summed over
    ranks under torch.distributed.

    Label weights must be 0 or 1 (mmdet's default pos_weight=-1 gives 1): a 0 row is left out
    of the loss and of the statistics. Reduction "none" is not available (the statistics are
    collected from the reduced loss).

    Options: num_classes, gamma (12), mu (0.8), alpha (4), activation, loss_weight, reduction,
    clamp, grad_mode.
    """

    reductions = ("mean", "sum")

    def __init__(self, *, num_classes: int = LVIS_V1_NUM_CLASSES, gamma: float = 12.0,
                 mu: float = 0.8, alpha: float = 4.0, activation: str = "gumbel",
                 loss_weight: float = 1.0, reduction: str = "mean", clamp=DEFAULT_CLAMP,
                 grad_mode: str = "reference", **unknown):
        super().__init__(unknown, num_classes=num_classes, activation=activation,
                         loss_weight=loss_weight, reduction=reduction, grad_mode=grad_mode)
        # Always the sum: the mean is taken here, over the rows gol_loss's mean would count.
        self.criterion = losses.EQLv2Loss(num_classes, activation=activation, gamma=gamma, mu=mu,
                                          alpha=alpha, clamp=_clamp(clamp), grad_mode=grad_mode,
                                          reduction="sum")

    def _fused(self, cls_score, labels, row_weight, reduction):
        ignore = self.criterion.ignore_index
        counted_rows = (labels != ignore).sum().clamp(min=1)
        if row_weight is not None:
            if bool(((row_weight != 0) & (row_weight != 1)).any()):
                raise ValueError(f"{type(self).__name__}: weight (label_weights) must be 0 or 1 "
                                 f"(set the RoI head's train_cfg pos_weight=-1)")
            labels = torch.where(row_weight == 0, torch.full_like(labels, ignore), labels)
        total = self.criterion(cls_score, labels)
        return total / counted_rows if reduction == "mean" else total

    def extra_repr(self) -> str:
        return super().extra_repr() + f", gamma={self.criterion.gamma}, mu={self.criterion.mu}, " \
                                      f"alpha={self.criterion.alpha}"


def _math_dtype(cls_score: torch.Tensor) -> torch.dtype:
    return torch.float64 if cls_score.dtype == torch.float64 else torch.float32


def _clamp(clamp):
    """mmengine configs give lists: the (min, max) pair gol_loss takes (None: no clamp)."""
    return None if clamp is None else tuple(clamp)
