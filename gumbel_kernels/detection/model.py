"""Builds torchvision's Mask R-CNN with the GOL RoI head from a config's `model` section.

Keys (defaults in gumbel_kernels/engine/config.py, DEFAULTS["model"]):
  backbone: resnet18 | resnet34 | resnet50 | resnet101 (FPN)
  weights: null (random init), a local state-dict file of the ResNet trunk, or a torchvision
           weight name such as ResNet50_Weights.IMAGENET1K_V1 (downloaded once, by rank 0);
           a trunk key missing from either is an error (detection/weights.py)
  trainable_layers: ResNet stages trained (5 = all; 3 is torchvision's default with weights)
  norm: frozen_bn (torchvision's default, for pretrained trunks) | eval_bn (mmdetection's
        norm_eval=True: BatchNorm statistics frozen, gamma/beta trained in the trainable
        stages; the official configs) | bn (trainable BatchNorm, for training from scratch:
        frozen statistics of a random init normalise nothing);
        default: frozen_bn with weights, bn without
  rpn_pre_nms_top_n, rpn_post_nms_top_n: [train, test] proposals per image (per level before
        NMS, in all after; torchvision's defaults [2000, 1000] and [2000, 1000], mmdetection's
        [2000, 1000] and [1000, 1000])
  min_size: list of training shorter sides (one drawn per image); the last is the test size
  max_size: longer-side cap
  normalized_mask, mask_temperature: GOL's cosine mask predictor
  nms: per-class NMS IoU (GOL: 0.3), score_thresh (1e-4), detections_per_img (300),
  box_batch_size_per_image (512), box_positive_fraction (0.25)
  roi_sampling_ratio, roi_aligned: RoIAlign of the box and mask poolers (torchvision 2, false;
        mmdetection 2.x 0, true)
  box_loss: smooth_l1 (torchvision) | l1 (mmdetection) for the RPN and the box head
  mask_target: roi_align (torchvision) | bitmap | polygon (mmdetection), see mask_targets.py
  mask_paste: torchvision | grid_sample (mmdetection / detectron2), see transform.py
  score_activation: null (the loss's activation) | softmax | sigmoid | gumbel
  cls_init, cls_init_weight, cls_init_bias: the box classifier's initialisation
        (roi_heads.initialize_box_branch)
"""
from __future__ import annotations

import logging

from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.ops.misc import FrozenBatchNorm2d

from .mask_head import NormalizedMaskPredictor
from .poolers import LevelRoIAlign
from .roi_heads import GOLBoxPredictor, GOLRoIHeads, initialize_box_branch
from .rpn import GOLRegionProposalNetwork
from .transform import GOLTransform
from .weights import load_trunk_weights, read_trunk_weights

log = logging.getLogger(__name__)

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
NORMS = ("frozen_bn", "eval_bn", "bn")


class EvalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that always normalises with its running statistics and never updates them
    (mmdetection's norm_eval=True); its affine parameters train where requires_grad is set."""

    def train(self, mode: bool = True):
        return super().train(False)


def resolved_norm(cfg: dict) -> str:
    """model.norm, with its default (frozen_bn with trunk weights, bn without) filled in."""
    norm = cfg["norm"] or ("frozen_bn" if cfg["weights"] else "bn")
    if norm not in NORMS:
        raise ValueError(f"model.norm={norm!r} must be one of {', '.join(NORMS)}")
    return norm


def _backbone(cfg: dict, load_weights: bool):
    name = cfg["backbone"]
    if name not in BACKBONES:
        raise ValueError(f"model.backbone={name!r} must be one of {', '.join(BACKBONES)}")
    norm_layer = {"frozen_bn": FrozenBatchNorm2d, "eval_bn": EvalBatchNorm2d,
                  "bn": nn.BatchNorm2d}[resolved_norm(cfg)]
    # The trunk's weights are loaded below, by the one strict path for files and torchvision
    # names alike; freezing stages does not depend on them.
    backbone = resnet_fpn_backbone(backbone_name=name, weights=None,
                                   trainable_layers=int(cfg["trainable_layers"]),
                                   norm_layer=norm_layer)
    if not cfg["weights"]:
        log.warning("model.weights is empty: the %s backbone starts from random init", name)
    elif load_weights:
        state, source = read_trunk_weights(cfg["weights"], name)
        load_trunk_weights(backbone.body, state, source)
    return backbone


def build_model(cfg: dict, num_classes: int, classification_loss: nn.Module, *,
                load_weights: bool = True) -> MaskRCNN:
    """Mask R-CNN for `num_classes` foreground classes with `classification_loss` in the box head.

    `cfg` is a config's `model` section; keys it leaves out take engine/config.py's DEFAULTS.
    `load_weights=False` leaves the trunk at random init whatever model.weights says (for a
    model whose every weight comes from a checkpoint next: no download, same layers)."""
    from ..engine.config import DEFAULTS  # here: engine.config validates against BACKBONES
    cfg = {**DEFAULTS["model"], **cfg}
    backbone = _backbone(cfg, load_weights)
    min_size = cfg["min_size"]
    min_size = tuple(min_size) if isinstance(min_size, (list, tuple)) else (int(min_size),)
    pre_nms, post_nms = cfg["rpn_pre_nms_top_n"], cfg["rpn_post_nms_top_n"]
    model = MaskRCNN(backbone, num_classes=num_classes + 1, min_size=min_size,
                     max_size=int(cfg["max_size"]))
    model.transform = GOLTransform(model.transform.min_size, model.transform.max_size,
                                   model.transform.image_mean, model.transform.image_std,
                                   mask_paste=cfg["mask_paste"])
    old_rpn = model.rpn
    model.rpn = GOLRegionProposalNetwork(
        old_rpn.anchor_generator, old_rpn.head,
        old_rpn.proposal_matcher.high_threshold, old_rpn.proposal_matcher.low_threshold,
        old_rpn.fg_bg_sampler.batch_size_per_image, old_rpn.fg_bg_sampler.positive_fraction,
        dict(training=int(pre_nms[0]), testing=int(pre_nms[1])),
        dict(training=int(post_nms[0]), testing=int(post_nms[1])),
        old_rpn.nms_thresh, score_thresh=old_rpn.score_thresh, box_loss=cfg["box_loss"])
    old = model.roi_heads
    levels = ["0", "1", "2", "3"]
    box_roi_pool = LevelRoIAlign(levels, 7, int(cfg["roi_sampling_ratio"]), cfg["roi_aligned"])
    mask_roi_pool = LevelRoIAlign(levels, 14, int(cfg["roi_sampling_ratio"]), cfg["roi_aligned"])
    representation = old.box_head.fc7.out_features
    box_predictor = GOLBoxPredictor(representation, num_classes,
                                    classification_loss.num_logits(num_classes))
    initialize_box_branch(old.box_head, box_predictor, cfg["cls_init"], cfg["cls_init_weight"],
                          cfg["cls_init_bias"], classification_loss.activation)
    mask_channels = old.mask_head[-1][0].out_channels  # torchvision's last 3x3 conv
    if cfg["normalized_mask"]:
        mask_predictor = NormalizedMaskPredictor(mask_channels, 256, num_classes + 1,
                                                 float(cfg["mask_temperature"]))
    else:
        mask_predictor = MaskRCNNPredictor(mask_channels, 256, num_classes + 1)
    model.roi_heads = GOLRoIHeads(
        box_roi_pool, old.box_head, box_predictor,
        fg_iou_thresh=0.5, bg_iou_thresh=0.5,
        batch_size_per_image=int(cfg["box_batch_size_per_image"]),
        positive_fraction=float(cfg["box_positive_fraction"]),
        bbox_reg_weights=None,
        score_thresh=float(cfg["score_thresh"]),
        nms_thresh=float(cfg["nms"]),
        detections_per_img=int(cfg["detections_per_img"]),
        mask_roi_pool=mask_roi_pool, mask_head=old.mask_head, mask_predictor=mask_predictor,
        classification_loss=classification_loss, num_classes=num_classes,
        score_activation=cfg["score_activation"], box_loss=cfg["box_loss"],
        mask_target=cfg["mask_target"])
    return model
