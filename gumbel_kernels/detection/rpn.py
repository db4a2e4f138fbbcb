"""torchvision's region proposal network with the box-regression loss as an option."""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.rpn import RegionProposalNetwork

from .box_loss import box_loss_sum, check_box_loss


class GOLRegionProposalNetwork(RegionProposalNetwork):
    """RegionProposalNetwork whose box loss is `box_loss` ("smooth_l1": torchvision's, "l1":
    mmdetection's); objectness BCE and the normalisation by the sampled anchors unchanged.

    Args:
        box_loss: see gumbel_kernels.detection.box_loss.
        (the rest as torchvision.models.detection.rpn.RegionProposalNetwork)
    """

    def __init__(self, *args, box_loss: str = "smooth_l1", **kwargs):
        super().__init__(*args, **kwargs)
        self.box_loss = check_box_loss(box_loss)

    def compute_loss(self, objectness: Tensor, pred_bbox_deltas: Tensor, labels: List[Tensor],
                     regression_targets: List[Tensor]) -> Tuple[Tensor, Tensor]:
        sampled_pos, sampled_neg = self.fg_bg_sampler(labels)
        sampled_pos = torch.where(torch.cat(sampled_pos, dim=0))[0]
        sampled_neg = torch.where(torch.cat(sampled_neg, dim=0))[0]
        sampled = torch.cat([sampled_pos, sampled_neg], dim=0)
        labels_all = torch.cat(labels, dim=0)
        targets = torch.cat(regression_targets, dim=0)
        box_loss = box_loss_sum(pred_bbox_deltas[sampled_pos], targets[sampled_pos],
                                self.box_loss) / sampled.numel()
        objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled],
                                                             labels_all[sampled])
        return objectness_loss, box_loss
