"""Builds torchvision's Mask R-CNN with the GOL RoI head from a config's `model` section.

Keys (defaults in gumbel_kernels/engine/config.py):
  backbone: resnet18 | resnet34 | resnet50 | resnet101 (FPN)
  weights: null (random init), a local state-dict file of the ResNet trunk, or a torchvision
           weight name such as ResNet50_Weights.IMAGENET1K_V1 (needs a download)
  trainable_layers: ResNet stages trained (5 = all; 3 is torchvision's default with weights)
  norm: frozen_bn (torchvision's default, for pretrained trunks) | bn (trainable BatchNorm, for
        training from scratch: frozen statistics of a random init normalise nothing);
        default: frozen_bn with weights, bn without
  rpn_pre_nms_top_n, rpn_post_nms_top_n: [train, test] proposals per image (torchvision's
        defaults [2000, 1000] and [2000, 1000]; the CPU demo uses fewer)
  min_size: list of training shorter sides (one drawn per batch); the last is the test size
  max_size: longer-side cap
  normalized_mask, mask_temperature: GOL's cosine mask predictor
  nms: per-class NMS IoU (GOL: 0.3), score_thresh (1e-4), detections_per_img (300),
  box_batch_size_per_image (512), box_positive_fraction (0.25)
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch
from torch import nn
from torchvision.models import get_weight
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.ops.misc import FrozenBatchNorm2d

from .mask_head import NormalizedMaskPredictor
from .roi_heads import GOLBoxPredictor, GOLRoIHeads

log = logging.getLogger(__name__)

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")


def _backbone(cfg: dict):
    name = cfg["backbone"]
    if name not in BACKBONES:
        raise ValueError(f"model.backbone={name!r} must be one of {', '.join(BACKBONES)}")
    weights = cfg.get("weights")
    torchvision_weights = None
    local_file: Optional[str] = None
    if weights:
        if os.path.exists(str(weights)):
            local_file = str(weights)
        else:
            try:
                torchvision_weights = get_weight(str(weights))
            except (ValueError, KeyError) as error:
                raise ValueError(f"model.weights={weights!r} is neither a file nor a torchvision "
                                 f"weight name ({error})") from None
    else:
        log.warning("model.weights is empty: the %s backbone starts from random init", name)
    norm = cfg.get("norm") or ("frozen_bn" if weights else "bn")
    if norm not in ("frozen_bn", "bn"):
        raise ValueError(f"model.norm={norm!r} must be 'frozen_bn' or 'bn'")
    norm_layer = FrozenBatchNorm2d if norm == "frozen_bn" else nn.BatchNorm2d
    backbone = resnet_fpn_backbone(backbone_name=name, weights=torchvision_weights,
                                   trainable_layers=int(cfg.get("trainable_layers", 5)),
                                   norm_layer=norm_layer)
    if local_file is not None:
        state = torch.load(local_file, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        missing, unexpected = backbone.body.load_state_dict(state, strict=False)
        log.info("loaded %s: %d missing, %d unexpected keys", local_file, len(missing),
                 len(unexpected))
    return backbone


def build_model(cfg: dict, num_classes: int, classification_loss: nn.Module) -> MaskRCNN:
    """Mask R-CNN for `num_classes` foreground classes with `classification_loss` in the box head."""
    backbone = _backbone(cfg)
    min_size = cfg.get("min_size", [800])
    min_size = tuple(min_size) if isinstance(min_size, (list, tuple)) else (int(min_size),)
    pre_nms = cfg.get("rpn_pre_nms_top_n", [2000, 1000])
    post_nms = cfg.get("rpn_post_nms_top_n", [2000, 1000])
    model = MaskRCNN(backbone, num_classes=num_classes + 1, min_size=min_size,
                     max_size=int(cfg.get("max_size", 1333)),
                     rpn_pre_nms_top_n_train=int(pre_nms[0]), rpn_pre_nms_top_n_test=int(pre_nms[1]),
                     rpn_post_nms_top_n_train=int(post_nms[0]),
                     rpn_post_nms_top_n_test=int(post_nms[1]))
    old = model.roi_heads
    representation = old.box_head.fc7.out_features
    box_predictor = GOLBoxPredictor(representation, num_classes,
                                    classification_loss.num_logits(num_classes),
                                    classification_loss.activation)
    mask_channels = old.mask_head[-1][0].out_channels  # torchvision's last 3x3 conv
    if cfg.get("normalized_mask", False):
        mask_predictor = NormalizedMaskPredictor(mask_channels, 256, num_classes + 1,
                                                 float(cfg.get("mask_temperature", 20.0)))
    else:
        mask_predictor = MaskRCNNPredictor(mask_channels, 256, num_classes + 1)
    model.roi_heads = GOLRoIHeads(
        old.box_roi_pool, old.box_head, box_predictor,
        fg_iou_thresh=0.5, bg_iou_thresh=0.5,
        batch_size_per_image=int(cfg.get("box_batch_size_per_image", 512)),
        positive_fraction=float(cfg.get("box_positive_fraction", 0.25)),
        bbox_reg_weights=None,
        score_thresh=float(cfg.get("score_thresh", 1e-4)),
        nms_thresh=float(cfg.get("nms", 0.5)),
        detections_per_img=int(cfg.get("detections_per_img", 300)),
        mask_roi_pool=old.mask_roi_pool, mask_head=old.mask_head, mask_predictor=mask_predictor,
        classification_loss=classification_loss, num_classes=num_classes)
    return model
