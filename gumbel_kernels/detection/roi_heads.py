"""RoI heads for GOL on torchvision's Mask R-CNN.

torchvision numbers classes 0 = background, 1..C foreground, and trains the box classifier with
softmax cross-entropy over C + 1 logits. Here the classifier is any module of
gumbel_kernels.losses (C logits for the Gumbel/sigmoid heads, C + 1 for softmax/GumbelCE) called
with this project's labels (foreground 0..C-1, background C), in float32 outside autocast; the
box regression, the mask branch and the label numbering of the outputs stay torchvision's.
Inference scores come from the loss's activation (Gumbel: exp(-exp(-q)) on the raw logits).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import (RoIHeads, maskrcnn_inference,
                                                    maskrcnn_loss)
from torchvision.ops import boxes as box_ops

import gumbel_kernels as gk


def to_gol_labels(torchvision_labels: Tensor, num_classes: int) -> Tensor:
    """torchvision's 0 = background, 1..C  ->  this project's 0..C-1, background C."""
    return torch.where(torchvision_labels == 0, torch.full_like(torchvision_labels, num_classes),
                       torchvision_labels - 1)


class GOLBoxPredictor(nn.Module):
    """Box classifier of `num_logits` outputs and class-specific box regression (C + 1 classes).

    Initialisation follows the activation, as in the official GOL code: Gumbel heads start with
    every weight at 0.001 and a bias of -2; sigmoid heads with N(0, 0.001^2) weights and a bias
    of -3.2 (GOL's DropLoss config); softmax heads with torchvision's N(0, 0.01^2) and 0.
    """

    def __init__(self, in_channels: int, num_classes: int, num_logits: int, activation: str):
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_logits)
        self.bbox_pred = nn.Linear(in_channels, (num_classes + 1) * 4)
        bias = {"gumbel": -2.0, "sigmoid": -3.2, "softmax": 0.0}[activation]
        if activation == "gumbel":
            nn.init.constant_(self.cls_score.weight, 0.001)
        else:
            nn.init.normal_(self.cls_score.weight, std=0.01 if activation == "softmax" else 0.001)
        nn.init.constant_(self.cls_score.bias, bias)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.constant_(self.bbox_pred.bias, 0.0)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        x = x.flatten(start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)


def box_regression_loss(box_regression: Tensor, labels: Tensor, regression_targets: Tensor) -> Tensor:
    """torchvision's Fast R-CNN box loss: smooth L1 (beta 1/9) on the positives' own class,
    summed and divided by the number of sampled RoIs."""
    positive = torch.where(labels > 0)[0]
    labels_pos = labels[positive]
    box_regression = box_regression.reshape(box_regression.shape[0], -1, 4)
    loss = F.smooth_l1_loss(box_regression[positive, labels_pos], regression_targets[positive],
                            beta=1 / 9, reduction="sum")
    return loss / labels.numel()


class GOLRoIHeads(RoIHeads):
    """torchvision RoIHeads whose box classification loss and scores are pluggable.

    Args:
        classification_loss: a gumbel_kernels.losses module (num_logits(), activation).
        num_classes: C, foreground classes.
        (the rest as torchvision.models.detection.roi_heads.RoIHeads)
    """

    def __init__(self, *args, classification_loss: nn.Module, num_classes: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.classification_loss = classification_loss
        self.num_classes = num_classes

    def class_scores(self, class_logits: Tensor) -> Tensor:
        """(N, C) foreground scores from the classifier's logits, by the loss's activation."""
        c = self.num_classes
        activation = self.classification_loss.activation
        logits = class_logits.float()
        if activation == "softmax":
            return F.softmax(logits, dim=-1)[:, :c]  # background is the last column
        if activation == "sigmoid":
            return torch.sigmoid(logits[:, :c])
        return gk.gumbel_activation(logits[:, :c])  # no clamp at inference

    def box_classification_loss(self, class_logits: Tensor, labels: Tensor) -> Tensor:
        with torch.autocast(class_logits.device.type, enabled=False):
            return self.classification_loss(class_logits.float(),
                                            to_gol_labels(labels, self.num_classes))

    def postprocess_detections(self, class_logits, box_regression, proposals, image_shapes):
        device = class_logits.device
        c = self.num_classes
        boxes_per_image = [len(p) for p in proposals]
        pred_boxes = self.box_coder.decode(box_regression, proposals)  # (R, C + 1, 4)
        pred_scores = self.class_scores(class_logits)
        results = []
        for boxes, scores, image_shape in zip(pred_boxes.split(boxes_per_image),
                                              pred_scores.split(boxes_per_image), image_shapes):
            boxes = box_ops.clip_boxes_to_image(boxes, image_shape)[:, 1:]  # drop background
            labels = torch.arange(1, c + 1, device=device).view(1, -1).expand_as(scores)
            boxes, scores, labels = boxes.reshape(-1, 4), scores.reshape(-1), labels.reshape(-1)
            keep = torch.where(scores > self.score_thresh)[0]  # strict, as GOL's 1e-4
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)
            keep = keep[: self.detections_per_img]
            results.append((boxes[keep], scores[keep], labels[keep]))
        return ([r[0] for r in results], [r[1] for r in results], [r[2] for r in results])

    def forward(self, features: Dict[str, Tensor], proposals: List[Tensor],
                image_shapes: List[Tuple[int, int]],
                targets: Optional[List[Dict[str, Tensor]]] = None):
        losses: Dict[str, Tensor] = {}
        result: List[Dict[str, Tensor]] = []
        if self.training:
            if targets is None:
                raise ValueError("GOLRoIHeads: targets are required in training mode")
            proposals, matched_idxs, labels, regression_targets = \
                self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        if self.training:
            labels_all = torch.cat(labels)
            losses["loss_classifier"] = self.box_classification_loss(class_logits, labels_all)
            losses["loss_box_reg"] = box_regression_loss(box_regression, labels_all,
                                                         torch.cat(regression_targets))
        else:
            boxes, scores, det_labels = self.postprocess_detections(
                class_logits, box_regression, proposals, image_shapes)
            result = [{"boxes": b, "labels": l, "scores": s}
                      for b, s, l in zip(boxes, scores, det_labels)]

        if self.has_mask():
            if self.training:
                mask_proposals, positive_matched = [], []
                for image_proposals, image_labels, image_matched in zip(proposals, labels,
                                                                        matched_idxs):
                    positive = torch.where(image_labels > 0)[0]
                    mask_proposals.append(image_proposals[positive])
                    positive_matched.append(image_matched[positive])
            else:
                mask_proposals = [r["boxes"] for r in result]
            mask_features = self.mask_head(self.mask_roi_pool(features, mask_proposals, image_shapes))
            mask_logits = self.mask_predictor(mask_features)
            if self.training:
                losses["loss_mask"] = maskrcnn_loss(
                    mask_logits, mask_proposals, [t["masks"] for t in targets],
                    [t["labels"] for t in targets], positive_matched)
            else:
                for probabilities, r in zip(maskrcnn_inference(mask_logits,
                                                               [r["labels"] for r in result]),
                                            result):
                    r["masks"] = probabilities
        return result, losses
