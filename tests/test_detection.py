"""Detection pieces on a tiny synthetic batch: one training step per method (finite loss, gradient
reaching the backbone), inference outputs, the label mapping, and each piece of the official
(mmdetection 2.x) recipe: poolers, RPN proposal counts, L1 box losses, head widths, inits and
score activations, mask targets and pasting, the NormedConv2d mask predictor, norm_eval BN."""
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import MultiScaleRoIAlign, roi_align

from gumbel_kernels.detection import NormalizedMaskPredictor, build_model, to_gol_labels
from gumbel_kernels.detection.mask_targets import mask_targets, rasterize_polygons_in_box
from gumbel_kernels.detection.model import EvalBatchNorm2d
from gumbel_kernels.detection.poolers import LevelRoIAlign
from gumbel_kernels.detection.roi_heads import box_regression_loss
from gumbel_kernels.detection.transform import paste_masks_grid_sample
from gumbel_kernels.losses import build_classification_loss

# pycocotools' own mask decoding warns under NumPy 2; nothing to fix on our side.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# The official recipe's model switches (configs/lvis_v1_r50_base.yaml).
MMDET = {"roi_sampling_ratio": 0, "roi_aligned": True, "box_loss": "l1", "norm": "eval_bn",
         "mask_target": "polygon", "mask_paste": "grid_sample", "trainable_layers": 3}

NUM_CLASSES = 5
COUNTS = [1, 3, 40, 200, 900]
TINY = {"backbone": "resnet18", "weights": None, "trainable_layers": 5, "min_size": [96],
        "max_size": 128,
        "box_batch_size_per_image": 32, "rpn_pre_nms_top_n": [100, 50],
        "rpn_post_nms_top_n": [50, 25], "detections_per_img": 20}


def batch():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 112, generator=g), torch.rand(3, 80, 96, generator=g)]
    masks0 = torch.zeros(1, 96, 112, dtype=torch.uint8)
    masks0[0, 10:50, 20:60] = 1
    masks1 = torch.zeros(2, 80, 96, dtype=torch.uint8)
    masks1[0, 5:40, 5:40] = 1
    masks1[1, 30:70, 40:90] = 1
    targets = [{"boxes": torch.tensor([[20.0, 10.0, 60.0, 50.0]]), "labels": torch.tensor([1]),
                "masks": masks0},
               {"boxes": torch.tensor([[5.0, 5.0, 40.0, 40.0], [40.0, 30.0, 90.0, 70.0]]),
                "labels": torch.tensor([3, 5]), "masks": masks1}]
    return images, targets


def model_for(method, **overrides):
    torch.manual_seed(0)
    kwargs = {"lambda_": 0.01} if method in ("eql", "droploss", "gol") else {}
    loss = build_classification_loss(method, COUNTS, 1000, **kwargs)
    return build_model({**TINY, **overrides}, NUM_CLASSES, loss)


def polygon_targets(targets):
    """The batch's targets with each mask as its bounding rectangle's polygon."""
    out = []
    for t in targets:
        polys = [[np.array([x1, y1, x2, y1, x2, y2, x1, y2], dtype=np.float64)]
                 for x1, y1, x2, y2 in t["boxes"].tolist()]
        out.append({"boxes": t["boxes"], "labels": t["labels"], "polygons": polys})
    return out


@pytest.mark.parametrize("method", ["softmax", "sigmoid", "sigmoid_ce", "gumbel", "eql",
                                    "droploss", "gol", "gumbel_ce"])
def test_one_training_step(method):
    model = model_for(method, normalized_mask=method == "gol", nms=0.3)
    model.train()
    images, targets = batch()
    losses = model(images, targets)
    assert set(losses) >= {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    first_conv = model.backbone.body.conv1.weight
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0
    cls = model.roi_heads.box_predictor.cls_score.weight
    assert cls.grad is not None and cls.grad.abs().sum() > 0


def test_training_step_with_the_official_recipe():
    model = model_for("gol", normalized_mask=True, nms=0.3, **MMDET)
    model.train()
    images, targets = batch()
    losses = model(images, polygon_targets(targets))
    total = sum(losses.values())
    assert torch.isfinite(total) and losses["loss_mask"] > 0
    total.backward()
    layer2_bn = model.backbone.body.layer2[0].bn1
    assert isinstance(layer2_bn, EvalBatchNorm2d) and layer2_bn.weight.grad is not None
    assert model.backbone.body.layer1[0].bn1.weight.requires_grad is False
    model.eval()
    with torch.no_grad():
        outputs = model(images)
    assert outputs[0]["masks"].shape[-2:] == images[0].shape[-2:]


def test_inference_output_format():
    model = model_for("gol", normalized_mask=True, nms=0.3)
    model.eval()
    images, _ = batch()
    with torch.no_grad():
        outputs = model(images)
    for image, out in zip(images, outputs):
        k = out["boxes"].shape[0]
        assert 0 < k <= 20
        assert out["boxes"].shape == (k, 4) and out["scores"].shape == (k,)
        assert out["masks"].shape == (k, 1, *image.shape[1:])
        assert bool((out["scores"] > 1e-4).all()) and bool((out["scores"] <= 1).all())
        assert bool((out["labels"] >= 1).all() and (out["labels"] <= NUM_CLASSES).all())
        # Gumbel scores of the raw logits: the initial bias -2 gives about exp(-e^2).
        assert out["scores"].max() < 0.5


def test_classifier_initialisation_follows_gol():
    predictor = model_for("gol").roi_heads.box_predictor
    assert torch.all(predictor.cls_score.weight == 0.001)
    assert torch.all(predictor.cls_score.bias == -2.0)
    assert predictor.cls_score.out_features == NUM_CLASSES
    assert predictor.bbox_pred.out_features == (NUM_CLASSES + 1) * 4
    assert model_for("softmax").roi_heads.box_predictor.cls_score.out_features == NUM_CLASSES + 1


def test_normalized_mask_predictor_is_normed_conv2d():
    torch.manual_seed(0)
    predictor = NormalizedMaskPredictor(8, 64, 1204, temperature=20.0)
    # FCNMaskHead.init_weights: kaiming_normal (fan_out = classes, relu), bias 0.
    weight = predictor.mask_fcn_logits.weight
    assert torch.all(predictor.mask_fcn_logits.bias == 0)
    assert abs(float(weight.detach().std()) / math.sqrt(2 / 1204) - 1) < 0.05
    x = torch.randn(2, 8, 7, 7)
    with torch.no_grad():
        predictor.mask_fcn_logits.bias.uniform_(-1, 1)  # the bias is added to the cosine logits
        logits = predictor(x)
        features = F.relu(predictor.conv5_mask(x))
        features = features / (features.norm(dim=1, keepdim=True) + 1e-6)
        w = weight[:, :, 0, 0] / (weight[:, :, 0, 0].norm(dim=1, keepdim=True) + 1e-6)
        expected = 20.0 * torch.einsum("nchw,kc->nkhw", features, w) \
            + predictor.mask_fcn_logits.bias[None, :, None, None]
    assert logits.shape == (2, 1204, 14, 14)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-4)


def fpn_features(generator):
    return OrderedDict((name, torch.randn(2, 4, 64 // 2 ** k, 80 // 2 ** k, generator=generator))
                       for k, name in enumerate(["0", "1", "2", "3"]))


def random_boxes(generator, n=40):
    """Sides log-uniform in [4, 256] px (every FPN level), inside a 256 x 320 image."""
    wh = 4 * 64 ** torch.rand(n, 2, generator=generator)
    xy = torch.rand(n, 2, generator=generator) * (torch.tensor([320.0, 256.0]) - wh)
    return torch.cat([xy, xy + wh], dim=1)


def test_pooler_defaults_reproduce_torchvision_and_mmdet_settings_reproduce_roi_align():
    g = torch.Generator().manual_seed(0)
    features, boxes = fpn_features(g), [random_boxes(g), random_boxes(g, 25)]
    shapes = [(256, 320), (256, 300)]
    names = ["0", "1", "2", "3"]
    ours = LevelRoIAlign(names, 7, 2, False)(features, boxes, shapes)
    torchvision_pool = MultiScaleRoIAlign(names, 7, 2)(features, boxes, shapes)
    torch.testing.assert_close(ours, torchvision_pool)

    pool = LevelRoIAlign(names, 14, 0, True)
    pooled = pool(features, boxes, shapes)
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1)
                      for i, b in enumerate(boxes)])
    scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    levels = torch.floor(torch.log2(scale / 56 + 1e-6)).clamp(0, 3).long()
    assert len(set(levels.tolist())) > 1
    for k, row in enumerate(rois):
        level = int(levels[k])
        expected = roi_align(features[names[level]], row[None], 14, 1 / 4 / 2 ** level,
                             sampling_ratio=0, aligned=True)
        torch.testing.assert_close(pooled[k:k + 1], expected)
    assert not torch.allclose(pooled, LevelRoIAlign(names, 14, 2, False)(features, boxes, shapes))


def test_model_poolers_and_proposal_counts_follow_the_config():
    default = model_for("gol")
    for pool in (default.roi_heads.box_roi_pool, default.roi_heads.mask_roi_pool):
        assert (pool.sampling_ratio, pool.aligned) == (2, False)
    official = model_for("gol", **MMDET, rpn_pre_nms_top_n=[2000, 1000],
                         rpn_post_nms_top_n=[1000, 1000])
    box_pool, mask_pool = official.roi_heads.box_roi_pool, official.roi_heads.mask_roi_pool
    assert (box_pool.sampling_ratio, box_pool.aligned, box_pool.output_size) == (0, True, (7, 7))
    assert (mask_pool.sampling_ratio, mask_pool.aligned, mask_pool.output_size) == (0, True,
                                                                                     (14, 14))
    official.train()
    assert (official.rpn.pre_nms_top_n(), official.rpn.post_nms_top_n()) == (2000, 1000)
    official.eval()
    assert (official.rpn.pre_nms_top_n(), official.rpn.post_nms_top_n()) == (1000, 1000)


def test_box_losses_l1_and_smooth_l1():
    g = torch.Generator().manual_seed(0)
    deltas = torch.randn(6, (NUM_CLASSES + 1) * 4, generator=g)
    targets = torch.randn(6, 4, generator=g)
    labels = torch.tensor([0, 2, 0, 5, 1, 0])  # torchvision labels: 0 = background
    own = deltas.reshape(6, -1, 4)[torch.arange(6), labels]
    positive = labels > 0
    l1 = (own[positive] - targets[positive]).abs().sum() / 6
    torch.testing.assert_close(box_regression_loss(deltas, labels, targets, "l1"), l1)
    smooth = F.smooth_l1_loss(own[positive], targets[positive], beta=1 / 9, reduction="sum") / 6
    torch.testing.assert_close(box_regression_loss(deltas, labels, targets, "smooth_l1"), smooth)

    # RPN: 20 anchors, all sampled (fewer than 256), 5 positives.
    rpn = model_for("gol", box_loss="l1").rpn
    objectness = torch.randn(20, 1, generator=g)
    pred = torch.randn(20, 4, generator=g)
    anchor_labels = torch.zeros(20)
    anchor_labels[:5] = 1
    anchor_targets = torch.randn(20, 4, generator=g)
    obj_loss, rpn_box = rpn.compute_loss(objectness, pred, [anchor_labels], [anchor_targets])
    torch.testing.assert_close(rpn_box, (pred[:5] - anchor_targets[:5]).abs().sum() / 20)
    torch.testing.assert_close(obj_loss, F.binary_cross_entropy_with_logits(objectness[:, 0],
                                                                            anchor_labels))
    rpn_smooth = model_for("gol").rpn
    _, box = rpn_smooth.compute_loss(objectness, pred, [anchor_labels], [anchor_targets])
    torch.testing.assert_close(box, F.smooth_l1_loss(pred[:5], anchor_targets[:5], beta=1 / 9,
                                                     reduction="sum") / 20)
    with pytest.raises(ValueError, match="box_loss"):
        model_for("gol", box_loss="giou")


@pytest.mark.parametrize("method, init, width, weight, bias", [
    ("softmax", ("constant", 0.001, -6.5), NUM_CLASSES + 1, 0.001, -6.5),
    ("sigmoid_ce", ("constant", 0.001, -6.5), NUM_CLASSES + 1, 0.001, -6.5),
    ("gumbel_ce", ("constant", 0.001, -2.0), NUM_CLASSES + 1, 0.001, -2.0),
    ("droploss", ("constant", 0.01, -6.9), NUM_CLASSES, 0.01, -6.9),
    ("gol", ("auto", None, None), NUM_CLASSES, 0.001, -2.0),
])
def test_constant_head_inits_leave_the_rest_of_the_box_branch_at_pytorch_defaults(
        method, init, width, weight, bias):
    scheme, value, offset = init
    predictor = model_for(method, cls_init=scheme, cls_init_weight=value,
                          cls_init_bias=offset).roi_heads.box_predictor
    assert predictor.cls_score.out_features == width
    assert torch.all(predictor.cls_score.weight == weight)
    assert torch.all(predictor.cls_score.bias == bias)
    # nn.Linear's default (uniform, bound 1/sqrt(1024)), not mmdetection's N(0, 0.001^2)
    assert float(predictor.bbox_pred.weight.detach().std()) > 0.01


def test_normal_head_init_is_mmdetections_default():
    model = model_for("eql", cls_init="normal")
    predictor, head = model.roi_heads.box_predictor, model.roi_heads.box_head
    assert predictor.cls_score.out_features == NUM_CLASSES
    assert abs(float(predictor.cls_score.weight.detach().std()) - 0.01) < 0.001
    assert torch.all(predictor.cls_score.bias == 0) and torch.all(predictor.bbox_pred.bias == 0)
    assert abs(float(predictor.bbox_pred.weight.detach().std()) - 0.001) < 0.0002
    for fc in (head.fc6, head.fc7):  # Xavier-uniform, bias 0
        bound = math.sqrt(6 / (fc.in_features + fc.out_features))
        largest = float(fc.weight.detach().abs().max())
        assert 0.99 * bound < largest <= bound * (1 + 1e-6)
        assert torch.all(fc.bias == 0)
    with pytest.raises(ValueError, match="cls_init_weight"):
        model_for("softmax", cls_init="constant")


def test_score_activation_option():
    logits = torch.randn(4, NUM_CLASSES + 1)
    heads = model_for("sigmoid_ce", score_activation="softmax").roi_heads
    torch.testing.assert_close(heads.class_scores(logits),
                               torch.softmax(logits, dim=1)[:, :NUM_CLASSES])
    heads = model_for("sigmoid_ce").roi_heads
    assert heads.score_activation == "sigmoid"
    torch.testing.assert_close(heads.class_scores(logits),
                               torch.sigmoid(logits[:, :NUM_CLASSES]))
    gumbel = model_for("gumbel_ce").roi_heads.class_scores(logits)
    torch.testing.assert_close(gumbel, torch.exp(-torch.exp(-logits[:, :NUM_CLASSES])))
    with pytest.raises(ValueError, match="background column"):
        model_for("sigmoid", score_activation="softmax")


def test_grid_sample_paste_uses_float_boxes():
    masks = torch.ones(1, 1, 28, 28)
    box = torch.tensor([[2.2, 3.1, 7.2, 9.1]])
    pasted = paste_masks_grid_sample(masks, box, (12, 12))[0, 0]
    expected = torch.zeros(12, 12)
    expected[3:9, 2:7] = 1  # pixel centres (x + 0.5, y + 0.5) inside the box
    torch.testing.assert_close(pasted, expected)
    # torchvision's legacy paste rounds the box and pads the mask by a pixel: a different area.
    from torchvision.models.detection.roi_heads import paste_masks_in_image
    legacy = paste_masks_in_image(masks, box, (12, 12))[0, 0]
    assert int((legacy > 0.5).sum()) != 30
    model = model_for("gol", mask_paste="grid_sample")
    assert model.transform.mask_paste == "grid_sample"


def test_mask_targets_polygon_bitmap_and_roi_align():
    # A polygon covering the left half of the RoI rasterises to the left half of the grid.
    half = rasterize_polygons_in_box([np.array([10.0, 20, 15, 20, 15, 30, 10, 30])],
                                     (10.0, 20.0, 20.0, 30.0), 28)
    assert half.dtype == np.uint8 and set(np.unique(half)) <= {0, 1}
    assert half[:, :13].all() and not half[:, 15:].any()
    bitmap = torch.zeros(1, 40, 40, dtype=torch.uint8)
    bitmap[0, 10:30, 10:25] = 1
    boxes, matched = [torch.tensor([[10.3, 10.0, 30.0, 30.0]])], [torch.tensor([0])]
    targets = [{"masks": bitmap,
                "polygons": [[np.array([10.0, 10, 25, 10, 25, 30, 10, 30])]]}]
    soft = mask_targets("roi_align", boxes, matched, targets, [(40, 40)], 28)
    binary = mask_targets("bitmap", boxes, matched, targets, [(40, 40)], 28)
    polygon = mask_targets("polygon", boxes, matched, targets, [(40, 40)], 28)
    assert ((soft > 0) & (soft < 1)).any()  # torchvision: soft, unaligned
    assert set(binary.unique().tolist()) == {0.0, 1.0} and set(polygon.unique().tolist()) == {0.0,
                                                                                             1.0}
    assert abs(float(binary.mean()) - 14.7 / 19.7) < 0.05  # the covered fraction of the RoI
    assert abs(float(polygon.mean()) - 14.7 / 19.7) < 0.05
    with pytest.raises(ValueError, match="polygons"):
        mask_targets("polygon", boxes, matched, [{"masks": bitmap}], [(40, 40)], 28)


def test_eval_bn_keeps_statistics_frozen_in_training_mode():
    bn = EvalBatchNorm2d(3)
    bn.train()
    assert not bn.training
    before = bn.running_mean.clone()
    bn(torch.randn(4, 3, 5, 5) + 5.0)
    assert torch.equal(bn.running_mean, before)


def test_label_mapping():
    labels = torch.tensor([0, 1, 5, 3])
    assert to_gol_labels(labels, 5).tolist() == [5, 0, 4, 2]
