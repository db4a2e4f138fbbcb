"""The box-regression loss of the RPN and of the box head, by config name.

torchvision's Mask R-CNN regresses with smooth L1 (beta 1/9); mmdetection 2.x, and so the
official GOL configs, with plain L1 (`loss_bbox=dict(type='L1Loss')`) in both places. Either
is summed here; the callers divide by the number of sampled anchors / RoIs, the normaliser
both libraries use.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

BOX_LOSSES = ("smooth_l1", "l1")


def check_box_loss(kind: str) -> str:
    if kind not in BOX_LOSSES:
        raise ValueError(f"model.box_loss={kind!r} must be one of {', '.join(BOX_LOSSES)}")
    return kind


def box_loss_sum(prediction: Tensor, target: Tensor, kind: str) -> Tensor:
    """Summed regression loss of encoded box deltas."""
    if kind == "l1":
        return F.l1_loss(prediction, target, reduction="sum")
    return F.smooth_l1_loss(prediction, target, beta=1 / 9, reduction="sum")
