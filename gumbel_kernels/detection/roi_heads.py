"""RoI heads for GOL on torchvision's Mask R-CNN.

torchvision numbers classes 0 = background, 1..C foreground, and trains the box classifier with
softmax cross-entropy over C + 1 logits. Here the classifier is any module of
gumbel_kernels.losses (C logits for the Gumbel/sigmoid heads, C + 1 for the heads with a
background column: softmax, GumbelCE, sigmoid_ce) called with this project's labels (foreground
0..C-1, background C), in float32 outside autocast; the label numbering of the outputs stays
torchvision's. Inference scores come from the loss's activation (Gumbel: exp(-exp(-q)) on the raw
logits) unless `score_activation` says otherwise. The box-regression loss (smooth L1 or L1) and
the mask targets (gumbel_kernels.detection.mask_targets) are options.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_inference
from torchvision.ops import boxes as box_ops

import gumbel_kernels as gk

from .box_loss import box_loss_sum, check_box_loss
from .mask_targets import check_mask_target, mask_loss, mask_targets

SCORE_ACTIVATIONS = ("softmax", "sigmoid", "gumbel")
CLS_INITS = ("auto", "constant", "normal")


def to_gol_labels(torchvision_labels: Tensor, num_classes: int) -> Tensor:
    """torchvision's 0 = background, 1..C  ->  this project's 0..C-1, background C."""
    return torch.where(torchvision_labels == 0, torch.full_like(torchvision_labels, num_classes),
                       torchvision_labels - 1)


class GOLBoxPredictor(nn.Module):
    """Box classifier of `num_logits` outputs and class-specific box regression (C + 1 classes).

    Its initialisation is `initialize_box_branch`'s (PyTorch's nn.Linear default until then).
    """

    def __init__(self, in_channels: int, num_classes: int, num_logits: int):
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_logits)
        self.bbox_pred = nn.Linear(in_channels, (num_classes + 1) * 4)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        x = x.flatten(start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)


def initialize_box_branch(box_head: nn.Module, predictor: GOLBoxPredictor, scheme: str,
                          weight: Optional[float], bias: Optional[float], activation: str) -> None:
    """Initialises the box classifier, and with it the box branch, as mmdetection 2.x does.

    scheme "constant" (an init_cfg `Constant` overriding fc_cls, as every official GOL and
    Table 1 config has): cls_score weight = `weight`, bias = `bias`; bbox_pred and the two
    FCs of `box_head` keep PyTorch's nn.Linear default, since such an init_cfg replaces the
    head's default one. scheme "normal" (mmdetection's default, the official sigmoid-EQL
    configs): cls_score N(0, `weight`^2) (default 0.01) with bias `bias` (default 0), bbox_pred
    N(0, 0.001^2) / 0, the FCs Xavier-uniform / 0. scheme "auto": "constant" with 0.001 / -2
    for Gumbel heads (every official Gumbel config), "normal" otherwise.
    """
    if scheme not in CLS_INITS:
        raise ValueError(f"model.cls_init={scheme!r} must be one of {', '.join(CLS_INITS)}")
    if scheme == "auto":
        scheme = "constant" if activation == "gumbel" else "normal"
        if activation == "gumbel":
            weight = 0.001 if weight is None else weight
            bias = -2.0 if bias is None else bias
    if scheme == "constant":
        if weight is None or bias is None:
            raise ValueError("model.cls_init='constant' needs model.cls_init_weight and "
                             "model.cls_init_bias")
        nn.init.constant_(predictor.cls_score.weight, float(weight))
        nn.init.constant_(predictor.cls_score.bias, float(bias))
        return
    nn.init.normal_(predictor.cls_score.weight, std=0.01 if weight is None else float(weight))
    nn.init.constant_(predictor.cls_score.bias, 0.0 if bias is None else float(bias))
    nn.init.normal_(predictor.bbox_pred.weight, std=0.001)
    nn.init.zeros_(predictor.bbox_pred.bias)
    for layer in box_head.modules():
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)


def box_regression_loss(box_regression: Tensor, labels: Tensor, regression_targets: Tensor,
                        kind: str = "smooth_l1") -> Tensor:
    """The Fast R-CNN box loss (smooth L1 with beta 1/9, or L1) on the positives' own class,
    summed and divided by the number of sampled RoIs (torchvision's and mmdetection's rule)."""
    positive = torch.where(labels > 0)[0]
    labels_pos = labels[positive]
    box_regression = box_regression.reshape(box_regression.shape[0], -1, 4)
    loss = box_loss_sum(box_regression[positive, labels_pos], regression_targets[positive], kind)
    return loss / labels.numel()


class GOLRoIHeads(RoIHeads):
    """torchvision RoIHeads whose box classification loss and scores are pluggable.

    Args:
        classification_loss: a gumbel_kernels.losses module (num_logits(), activation).
        num_classes: C, foreground classes.
        score_activation: "softmax" | "sigmoid" | "gumbel" for the inference scores; None: the
            loss's activation. "softmax" runs over every logit and needs a background column
            (mmdetection 2.21 scores every head without custom channels this way).
        box_loss: "smooth_l1" | "l1" (gumbel_kernels.detection.box_loss).
        mask_target: "roi_align" | "bitmap" | "polygon" (gumbel_kernels.detection.mask_targets).
        (the rest as torchvision.models.detection.roi_heads.RoIHeads)
    """

    def __init__(self, *args, classification_loss: nn.Module, num_classes: int,
                 score_activation: Optional[str] = None, box_loss: str = "smooth_l1",
                 mask_target: str = "roi_align", **kwargs):
        super().__init__(*args, **kwargs)
        self.classification_loss = classification_loss
        self.num_classes = num_classes
        score_activation = score_activation or classification_loss.activation
        if score_activation not in SCORE_ACTIVATIONS:
            raise ValueError(f"model.score_activation={score_activation!r} must be one of "
                             f"{', '.join(SCORE_ACTIVATIONS)}")
        if score_activation == "softmax" and classification_loss.num_logits(num_classes) \
                == num_classes:
            raise ValueError(f"model.score_activation='softmax' needs a head with a background "
                             f"column; {type(classification_loss).__name__} has "
                             f"{num_classes} logits for {num_classes} classes")
        self.score_activation = score_activation
        self.box_loss = check_box_loss(box_loss)
        self.mask_target = check_mask_target(mask_target)

    def check_targets(self, targets):
        if targets is None:
            raise ValueError("GOLRoIHeads: targets are required in training mode")
        mask_keys = ("polygons",) if self.mask_target == "polygon" else ("masks", "mask_crops")
        needed = [("boxes",), ("labels",)] + ([mask_keys] if self.has_mask() else [])
        for keys in needed:
            if not all(any(key in t for key in keys) for t in targets):
                raise ValueError(f"GOLRoIHeads: every target needs `{'` or `'.join(keys)}` "
                                 f"(model.mask_target={self.mask_target!r})")

    def class_scores(self, class_logits: Tensor) -> Tensor:
        """(N, C) foreground scores from the classifier's logits, by `score_activation`."""
        c = self.num_classes
        logits = class_logits.float()
        if self.score_activation == "softmax":
            return F.softmax(logits, dim=-1)[:, :c]  # background is the last column
        if self.score_activation == "sigmoid":
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
                                                         torch.cat(regression_targets),
                                                         self.box_loss)
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
                size = mask_logits.shape[-1]
                gt_labels = torch.cat([t["labels"][m] for t, m in zip(targets, positive_matched)])
                losses["loss_mask"] = mask_loss(
                    mask_logits, mask_targets(self.mask_target, mask_proposals, positive_matched,
                                              targets, image_shapes, size), gt_labels)
            else:
                for probabilities, r in zip(maskrcnn_inference(mask_logits,
                                                               [r["labels"] for r in result]),
                                            result):
                    r["masks"] = probabilities
        return result, losses
