"""gumbel_kernels.integrations.mmdet against a real mmdetection 3.x: the registered losses in a
real Shared2FCBBoxHead (fc_cls width, loss() equal to gk.gol_loss, accuracy keys,
predict_by_feat scores), the shipped configs/mmdet config, an LVIS json as ann_file, bad input.

The `mm` fixture is tests/mmdet_support.py's mmdet with a stand-in for mmcv's compiled ops.
"""
import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gumbel_kernels as gk
from gumbel_kernels.losses import EQLv2Loss

from mmdet_support import mmdet_modules, require  # noqa: I001 (tests/, on pytest's path)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "mmdet" / "mask-rcnn_r50_fpn_gol_sample1e-3-ms-2x_lvis-v1.py"
C = 1203
NUM_IMAGES = 100_000


@pytest.fixture(scope="module")
def mm():
    with mmdet_modules() as modules:
        yield modules


def _image_counts(num_classes=C, seed=0):
    """LVIS-like counts: about a third of the classes below the 0.0011 drop threshold."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 2000, (num_classes,), generator=g)
    counts[torch.randperm(num_classes, generator=g)[: num_classes // 3]] %= 100
    return counts.tolist()


COUNTS = _image_counts()
DROP = gk.drop_classes_from_frequency(COUNTS, NUM_IMAGES)

# type, extra options, (mode, activation) of the equivalent gk.gol_loss call
LOSS_CASES = {
    "gol": (dict(type="GOLLoss", image_counts=COUNTS, num_images=NUM_IMAGES),
            ("droploss", "gumbel")),
    "droploss_sigmoid": (dict(type="GOLLoss", image_counts=COUNTS, num_images=NUM_IMAGES,
                              activation="sigmoid"), ("droploss", "sigmoid")),
    "eql": (dict(type="GumbelEQLLoss", image_counts=COUNTS, num_images=NUM_IMAGES),
            ("eql", "gumbel")),
    "eql_sigmoid": (dict(type="GumbelEQLLoss", image_counts=COUNTS, num_images=NUM_IMAGES,
                         activation="sigmoid"), ("eql", "sigmoid")),
    "bce": (dict(type="GumbelBCELoss"), ("bce", "gumbel")),
    "bce_sigmoid": (dict(type="GumbelBCELoss", activation="sigmoid"), ("bce", "sigmoid")),
    "ce": (dict(type="GumbelCELoss"), ("bce", "gumbel")),
    "federated": (dict(type="GumbelFederatedLoss", image_counts=COUNTS), ("bce", "gumbel")),
    "federated_sigmoid": (dict(type="GumbelFederatedLoss", image_counts=COUNTS,
                               activation="sigmoid"), ("bce", "sigmoid")),
    "eqlv2": (dict(type="GumbelEQLv2Loss"), ("bce", "gumbel")),
    "eqlv2_sigmoid": (dict(type="GumbelEQLv2Loss", activation="sigmoid"), ("bce", "sigmoid")),
}


def _head(mm, loss_cls, num_classes=C, **kwargs):
    cfg = dict(type="Shared2FCBBoxHead", in_channels=4, fc_out_channels=16, roi_feat_size=7,
               num_classes=num_classes, loss_cls=loss_cls, **kwargs)
    return mm.MODELS.build(cfg)


def _batch(n=64, num_classes=C, seed=1):
    """(N, C + 1) logits of a half-trained head (negatives N(-3.5, 1.2), the label's column
    N(0.5, 1); mean losses about 7, below GumbelCE's clamp) and labels: rare and frequent
    classes and background."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    labels[n // 2:] = num_classes  # background
    rare = torch.nonzero(DROP[:num_classes]).flatten()
    labels[:4] = rare[:4]
    logits = torch.randn(n, num_classes + 1, generator=g) * 1.2 - 3.5
    logits[torch.arange(n), labels] = torch.randn(n, generator=g) + 0.5
    return logits, labels


def _expected(mm, head, case, logits, labels):
    """The same loss from gk.gol_loss (GOL's mean: sum / N), for the seed already set."""
    cfg, (mode, activation) = LOSS_CASES[case]
    loss_cls = head.loss_cls
    if cfg["type"] == "GumbelFederatedLoss":
        selected = loss_cls.criterion.select_classes(labels)
        mask = torch.zeros(C)
        mask[selected] = 1.0
        return gk.gol_loss(logits, labels, None, mode="bce", activation=activation,
                           clamp=(-4.0, 10.0) if activation == "gumbel" else None,
                           class_weight=mask)
    drop = DROP if mode != "bce" else None
    loss = gk.gol_loss(logits, labels, drop, mode=mode, activation=activation,
                       clamp=(-4.0, 10.0) if activation == "gumbel" else None)
    return loss.clamp(0.0, 20.0) if cfg["type"] == "GumbelCELoss" else loss


def _loss_inputs(head, logits, labels):
    n = logits.shape[0]
    bbox_pred = torch.zeros(n, head.num_classes * 4, requires_grad=True)
    rois = torch.cat([torch.zeros(n, 1), torch.tensor([[0.0, 0.0, 10.0, 10.0]]).repeat(n, 1)], 1)
    return dict(cls_score=logits, bbox_pred=bbox_pred, rois=rois, labels=labels,
                label_weights=torch.ones(n), bbox_targets=torch.zeros(n, 4),
                bbox_weights=torch.ones(n, 4))


# ----------------------------------------------------------------------------------------------
# Import cost and registration
# ----------------------------------------------------------------------------------------------

def test_import_gumbel_kernels_does_not_import_mmdet():
    code = ("import sys, gumbel_kernels, gumbel_kernels.losses, gumbel_kernels.integrations; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('mmdet', 'mmengine', 'mmcv')]; "
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_every_loss_is_registered(mm):
    for name in ("GOLLoss", "GumbelEQLLoss", "GumbelBCELoss", "GumbelCELoss",
                 "GumbelFederatedLoss", "GumbelEQLv2Loss"):
        assert mm.MODELS.get(name) is getattr(mm.adapter, name)


# ----------------------------------------------------------------------------------------------
# A real Shared2FCBBoxHead with each loss
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(LOSS_CASES))
def test_bbox_head_loss_equals_gol_loss(mm, case):
    cfg, _ = LOSS_CASES[case]
    head = _head(mm, dict(cfg))
    width = C + 1 if cfg["type"] == "GumbelCELoss" else C
    assert head.fc_cls.out_features == width
    cls_score, bbox_pred = head(torch.randn(8, 4, 7, 7))
    assert cls_score.shape == (8, width) and bbox_pred.shape == (8, 4 * C)

    logits, labels = _batch()
    logits = logits[:, :width].clone().requires_grad_()
    torch.manual_seed(11)
    losses = head.loss(**_loss_inputs(head, logits, labels))
    losses["loss_cls"].backward()

    reference_logits = logits.detach().clone().requires_grad_()
    torch.manual_seed(11)
    expected = _expected(mm, head, case, reference_logits, labels)
    expected.backward()
    torch.testing.assert_close(losses["loss_cls"], expected.float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(logits.grad, reference_logits.grad, rtol=1e-5, atol=1e-9)

    foreground = labels < C
    top1 = (logits.detach()[foreground, :C].argmax(1) == labels[foreground]).float().mean() * 100
    torch.testing.assert_close(losses["acc_classes"], top1.reshape(1))
    expected_keys = {"loss_cls", "acc_classes", "loss_bbox"}
    if cfg["type"] == "GumbelCELoss":
        expected_keys.add("acc")
        everything = (logits.detach().argmax(1) == labels).float().mean() * 100
        torch.testing.assert_close(losses["acc"], everything.reshape(1))
    assert set(losses) == expected_keys


def test_seed_none_draws_from_torchs_generator(mm):
    head = _head(mm, dict(LOSS_CASES["gol"][0]))
    logits, labels = _batch()
    logits = logits[:, :C]
    values = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        values.append(head.loss_cls(logits, labels).item())
    assert values[0] == values[1] and values[0] != values[2]


def test_eqlv2_statistics_accumulate_as_the_module(mm):
    head = _head(mm, dict(type="GumbelEQLv2Loss"))
    module = EQLv2Loss(C, activation="gumbel", reduction="sum")
    logits, labels = _batch()
    logits = logits[:, :C]
    for _ in range(3):
        got = head.loss_cls(logits, labels, torch.ones(64), avg_factor=64.0)
        expected = module(logits, labels) / (64.0 + torch.finfo(torch.float32).eps)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(head.loss_cls.criterion.pos_grad, module.pos_grad)
    assert int(head.loss_cls.criterion.num_updates) == 3
    assert "loss_cls.criterion.pos_grad" in head.state_dict()


# ----------------------------------------------------------------------------------------------
# mmdet's label weights, avg_factor, reductions, loss_weight, AMP
# ----------------------------------------------------------------------------------------------

def _row_losses(logits, labels, mode="droploss", seed=3):
    """(N,) per-RoI losses from gk.gol_loss's element losses, the seed fixed."""
    torch.manual_seed(seed)
    return gk.gol_loss(logits, labels, DROP, mode=mode, reduction="none").sum(1)


def test_label_weights_and_avg_factor_mean_what_mmdet_means(mm):
    loss_cls = mm.MODELS.build(dict(type="GOLLoss", image_counts=COUNTS, num_images=NUM_IMAGES,
                                    loss_weight=2.0))
    logits, labels = _batch()
    logits = logits[:, :C]
    weight = torch.ones(64)
    weight[:10] = 0.0
    weight[10:20] = 3.0
    rows = _row_losses(logits, labels)
    eps = torch.finfo(torch.float32).eps

    torch.manual_seed(3)
    got = loss_cls(logits, labels, weight, avg_factor=40.0)
    torch.testing.assert_close(got, 2.0 * (rows * weight).sum() / (40.0 + eps), rtol=1e-5, atol=0)
    torch.manual_seed(3)
    got = loss_cls(logits, labels, weight)  # mean without avg_factor: over the rows
    torch.testing.assert_close(got, 2.0 * (rows * weight).sum() / 64, rtol=1e-5, atol=0)
    torch.manual_seed(3)
    got = loss_cls(logits, labels, weight, reduction_override="sum")
    torch.testing.assert_close(got, 2.0 * (rows * weight).sum(), rtol=1e-5, atol=0)
    torch.manual_seed(3)
    got = loss_cls(logits, labels, weight, avg_factor=40.0, reduction_override="none")
    assert got.shape == (64,) and got.dtype == torch.float32
    torch.testing.assert_close(got, 2.0 * rows * weight, rtol=1e-5, atol=1e-7)
    assert bool((got[:10] == 0).all())
    with pytest.raises(ValueError, match="avg_factor can not be used"):
        loss_cls(logits, labels, weight, avg_factor=40.0, reduction_override="sum")


def test_zero_weight_rows_get_no_gradient(mm):
    for cfg in (LOSS_CASES["gol"][0], LOSS_CASES["eqlv2"][0], LOSS_CASES["federated"][0]):
        loss_cls = mm.MODELS.build(dict(cfg))
        logits, labels = _batch()
        logits = logits[:, :C].clone().requires_grad_()
        weight = torch.ones(64)
        weight[::3] = 0.0
        loss_cls(logits, labels, weight, avg_factor=float((weight > 0).sum())).backward()
        assert bool((logits.grad[::3] == 0).all()), cfg["type"]
        assert bool((logits.grad[1::3] != 0).any()), cfg["type"]


def test_eqlv2_rejects_non_binary_label_weights(mm):
    loss_cls = mm.MODELS.build(dict(type="GumbelEQLv2Loss"))
    logits, labels = _batch()
    with pytest.raises(ValueError, match=r"GumbelEQLv2Loss: weight \(label_weights\) must be 0 or 1"):
        loss_cls(logits[:, :C], labels, torch.full((64,), 2.0), avg_factor=64.0)
    with pytest.raises(ValueError, match="reduction_override must be one of 'mean', 'sum'"):
        loss_cls(logits[:, :C], labels, reduction_override="none")


def test_gumbel_ce_clamps_the_reduced_loss_to_0_20(mm):
    loss_cls = mm.MODELS.build(dict(type="GumbelCELoss"))
    logits, labels = _batch()
    # Positives at the clamp's low end: t = e^4 per positive row, far above 20 in the mean.
    high = torch.full((64, C + 1), -4.0 + 1e-3)
    high[:, -1] = 5.0
    high.requires_grad_()
    loss = loss_cls(high, labels, torch.ones(64), avg_factor=64.0)
    assert loss.item() == 20.0
    loss.backward()
    assert bool((high.grad == 0).all())  # the official clamp: no gradient above 20
    low = logits.clone().requires_grad_()
    loss = loss_cls(low, labels, torch.ones(64), avg_factor=64.0)
    assert 0.0 < loss.item() < 20.0
    loss.backward()
    assert bool((low.grad != 0).any())
    rows = loss_cls(high.detach(), labels, reduction_override="none")
    assert rows.shape == (64,) and float(rows.max()) == 20.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(LOSS_CASES))
def test_half_logits(mm, case, dtype):
    head = _head(mm, dict(LOSS_CASES[case][0]))
    logits, labels = _batch()
    half = logits[:, :head.fc_cls.out_features].to(dtype).requires_grad_()
    torch.manual_seed(2)
    loss = head.loss(**_loss_inputs(head, half, labels))["loss_cls"]
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    loss.backward()
    assert half.grad.dtype == dtype and bool(torch.isfinite(half.grad).all())
    torch.manual_seed(2)
    expected = _expected(mm, head, case, half.detach(), labels)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)


def test_autocast_head_forward_and_loss(mm):
    head = _head(mm, dict(LOSS_CASES["gol"][0]))
    logits, labels = _batch(n=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cls_score, bbox_pred = head(torch.randn(16, 4, 7, 7))
        assert cls_score.dtype == torch.bfloat16
        losses = head.loss(**{**_loss_inputs(head, cls_score, labels[:16]),
                              "bbox_pred": bbox_pred})
    (losses["loss_cls"] + losses["loss_bbox"]).backward()
    assert math.isfinite(losses["loss_cls"].item())
    assert head.fc_cls.weight.grad is not None and bool(torch.isfinite(head.fc_cls.weight.grad).all())


# ----------------------------------------------------------------------------------------------
# Inference: Gumbel scores, the background column dropped
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_type,activation", [("GumbelBCELoss", "gumbel"),
                                                   ("GumbelBCELoss", "sigmoid"),
                                                   ("GumbelCELoss", "gumbel")])
def test_predict_by_feat_scores_and_drops_background(mm, loss_type, activation):
    from mmengine.config import ConfigDict
    num_classes = 5
    loss_cfg = dict(type=loss_type, num_classes=num_classes)
    if loss_type == "GumbelBCELoss":
        loss_cfg["activation"] = activation
    head = _head(mm, loss_cfg, num_classes=num_classes)
    width = head.fc_cls.out_features
    # Three far-apart RoIs (so per-class NMS keeps every box); logits on both sides of the
    # 1e-4 score threshold; a confident background column where there is one.
    rois = torch.tensor([[0, 0, 0, 20, 20], [0, 100, 100, 130, 140], [0, 200, 10, 260, 50.0]])
    cls_score = torch.tensor([[2.0, -3.0, 0.5, -9.0, 1.0],
                              [-1.0, 3.0, -12.0, 0.0, -2.0],
                              [-3.5, -2.5, 4.0, -1.5, 0.2]])
    if width == num_classes + 1:
        cls_score = torch.cat([cls_score, torch.full((3, 1), 8.0)], 1)
    bbox_pred = torch.zeros(3, 4 * num_classes)
    test_cfg = ConfigDict(score_thr=1e-4, nms=dict(type="nms", iou_threshold=0.3),
                          max_per_img=300)
    meta = [dict(img_shape=(300, 300))]
    result = head.predict_by_feat((rois,), (cls_score,), (bbox_pred,), meta, test_cfg)[0]

    q = cls_score[:, :num_classes]
    scores = gk.gumbel_activation(q) if activation == "gumbel" else torch.sigmoid(q)
    keep = scores > 1e-4
    order = torch.argsort(scores[keep], descending=True)
    expected_scores = scores[keep][order]
    expected_labels = torch.nonzero(keep)[:, 1][order]
    expected_boxes = rois[:, 1:][torch.nonzero(keep)[:, 0][order]]
    assert int((~keep).sum()) > 0  # the threshold has something to drop
    assert bool((result.labels < num_classes).all())
    torch.testing.assert_close(result.scores, expected_scores)
    assert result.labels.tolist() == expected_labels.tolist()
    torch.testing.assert_close(result.bboxes, expected_boxes)

    activation_scores = head.loss_cls.get_activation(cls_score)
    assert activation_scores.shape == (3, num_classes + 1)
    if loss_type != "GumbelCELoss":
        assert bool((activation_scores[:, -1] == 0).all())


# ----------------------------------------------------------------------------------------------
# Class frequencies from an LVIS json (ann_file)
# ----------------------------------------------------------------------------------------------

def _write_lvis(path, num_classes, seed=0, unannotated_images=3):
    """A small LVIS-format json: category ids not contiguous nor in order (mmdet numbers the
    classes in the file's order), some images without annotations (not in num_images)."""
    g = torch.Generator().manual_seed(seed)
    ids = (torch.randperm(num_classes, generator=g) * 2 + 1).tolist()
    counts = torch.randint(0, 40, (num_classes,), generator=g).tolist()
    categories = [{"id": i, "name": f"c{i}", "image_count": n, "frequency": "r"}
                  for i, n in zip(ids, counts)]
    annotated = 50
    images = [{"id": k + 1, "height": 32, "width": 32, "coco_url": f"x/{k + 1}.jpg"}
              for k in range(annotated + unannotated_images)]
    annotations = [{"id": k + 1, "image_id": (k % annotated) + 1, "category_id": ids[k % num_classes],
                    "bbox": [1.0, 1.0, 5.0, 5.0], "area": 25.0} for k in range(2 * annotated)]
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": categories}))
    return counts, annotated


def test_ann_file_gives_counts_in_mmdets_class_order(mm, tmp_path):
    ann = tmp_path / "lvis_train.json"
    counts, annotated = _write_lvis(ann, num_classes=30)
    assert mm.adapter.lvis_class_frequencies(ann) == (tuple(counts), annotated)
    loss_cls = mm.MODELS.build(dict(type="GOLLoss", num_classes=30, ann_file=str(ann),
                                    lambda_=0.3))
    expected = gk.drop_classes_from_frequency(counts, annotated, 0.3)
    assert 0 < int(expected.sum()) < 30
    assert torch.equal(loss_cls.criterion.drop_classes, expected)
    federated = mm.MODELS.build(dict(type="GumbelFederatedLoss", num_classes=30,
                                     ann_file=str(ann)))
    torch.testing.assert_close(federated.criterion.sample_weights,
                               torch.tensor(counts, dtype=torch.float64).sqrt())


def test_bad_ann_file_names_file_and_field(mm, tmp_path):
    with pytest.raises(FileNotFoundError, match="ann_file 'nowhere.json' does not exist"):
        mm.adapter.lvis_class_frequencies("nowhere.json")
    ann = tmp_path / "bad.json"
    ann.write_text(json.dumps({"images": [], "annotations": [{"image_id": 1}],
                               "categories": [{"id": 1, "name": "a"}]}))
    with pytest.raises(ValueError, match=r"bad.json: categories\[0\] needs 'id' and 'image_count'"):
        mm.adapter.lvis_class_frequencies(ann)
    ann.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid json"):
        mm.adapter.lvis_class_frequencies(ann)


# ----------------------------------------------------------------------------------------------
# The shipped mmdet config
# ----------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:pkg_resources is deprecated")  # mmengine's, not ours
def test_shipped_config_parses_and_builds(mm, tmp_path):
    config_module = require("mmengine.config")
    try:
        importlib.import_module("pkg_resources")
    except ImportError:
        if os.environ.get("GUMBEL_REQUIRE_MMDET") == "1":
            raise
        pytest.skip("mmengine 0.10 resolves 'mmdet::' base configs with pkg_resources, which "
                    "setuptools >= 82 no longer ships (requirements.txt pins setuptools<82)")
    cfg = config_module.Config.fromfile(str(CONFIG))
    assert cfg.custom_imports.imports == ["gumbel_kernels.integrations.mmdet"]
    bbox_head = cfg.model.roi_head.bbox_head
    assert bbox_head.loss_cls.type == "GOLLoss" and bbox_head.loss_cls.lambda_ == 0.0011
    assert bbox_head.loss_cls.ann_file == "data/lvis_v1/annotations/lvis_v1_train.json"
    assert bbox_head.init_cfg == dict(type="Constant", val=0.001, bias=-2,
                                      override=dict(name="fc_cls"))
    assert cfg.model.roi_head.mask_head.predictor_cfg == dict(type="NormedConv2d",
                                                              tempearture=20)
    rcnn = cfg.model.test_cfg.rcnn
    assert (rcnn.score_thr, rcnn.nms.iou_threshold, rcnn.max_per_img) == (1e-4, 0.3, 300)
    train = cfg.train_dataloader.dataset
    assert train.type == "ClassBalancedDataset" and train.oversample_thr == 1e-3
    assert train.dataset.type == "LVISV1Dataset"
    assert cfg.train_cfg.max_epochs == 24 and cfg.param_scheduler[1].milestones == [16, 22]

    ann = tmp_path / "lvis_v1_train.json"
    counts, annotated = _write_lvis(ann, num_classes=C)
    cfg.model.roi_head.bbox_head.loss_cls.ann_file = str(ann)
    cfg.model.backbone.init_cfg = None  # no pretrained weights here
    model = mm.MODELS.build(cfg.model)
    head = model.roi_head.bbox_head
    assert type(head.loss_cls) is mm.adapter.GOLLoss
    assert head.fc_cls.out_features == C and head.num_classes == C
    assert torch.equal(head.loss_cls.criterion.drop_classes,
                       gk.drop_classes_from_frequency(counts, annotated, 0.0011))
    head.init_weights()
    assert bool((head.fc_cls.weight == 0.001).all()) and bool((head.fc_cls.bias == -2).all())
    predictor = model.roi_head.mask_head.conv_logits
    assert type(predictor).__name__ == "NormedConv2d" and predictor.tempearture == 20
    assert predictor.out_channels == C


# ----------------------------------------------------------------------------------------------
# Bad input: clear errors naming the option
# ----------------------------------------------------------------------------------------------

def test_unknown_option_is_named(mm):
    with pytest.raises(TypeError, match=r"GOLLoss: unknown option\(s\) lamda; the options are "
                                        r"num_classes, image_counts"):
        mm.MODELS.build(dict(type="GOLLoss", image_counts=COUNTS, num_images=NUM_IMAGES,
                             lamda=0.001))
    with pytest.raises(TypeError, match=r"GumbelCELoss: unknown option\(s\) activation"):
        mm.MODELS.build(dict(type="GumbelCELoss", activation="sigmoid"))
    # mmdet's base configs leave use_sigmoid in loss_cls: accepted, ignored.
    mm.MODELS.build(dict(type="GumbelBCELoss", use_sigmoid=False))


def test_head_num_classes_must_match_the_loss(mm):
    with pytest.raises(ValueError, match="the bbox head has num_classes=80 but loss_cls has "
                                         "num_classes=1203"):
        _head(mm, dict(type="GumbelBCELoss"), num_classes=80)


def test_frequency_vector_of_the_wrong_length(mm, tmp_path):
    with pytest.raises(ValueError, match="GOLLoss: image_counts has 80 entries, but "
                                         "num_classes=1203"):
        mm.MODELS.build(dict(type="GOLLoss", image_counts=COUNTS[:80], num_images=NUM_IMAGES))
    with pytest.raises(ValueError, match="GumbelFederatedLoss: image_counts has 1202 entries"):
        mm.MODELS.build(dict(type="GumbelFederatedLoss", image_counts=COUNTS[:-1]))
    ann = tmp_path / "small.json"
    _write_lvis(ann, num_classes=30)
    with pytest.raises(ValueError, match=r"GumbelEQLLoss: ann_file '.*small.json' has 30 "
                                         r"categories, but num_classes=1203"):
        mm.MODELS.build(dict(type="GumbelEQLLoss", ann_file=str(ann)))


def test_other_bad_options(mm, tmp_path):
    with pytest.raises(ValueError, match="GOLLoss: needs the training set's class frequencies"):
        mm.MODELS.build(dict(type="GOLLoss"))
    ann = tmp_path / "lvis.json"
    _write_lvis(ann, num_classes=C)
    with pytest.raises(ValueError, match="either ann_file or image_counts"):
        mm.MODELS.build(dict(type="GOLLoss", ann_file=str(ann), image_counts=COUNTS,
                             num_images=NUM_IMAGES))
    with pytest.raises(ValueError, match="GumbelBCELoss: activation must be one of"):
        mm.MODELS.build(dict(type="GumbelBCELoss", activation="softmax"))
    with pytest.raises(ValueError, match="GumbelEQLv2Loss: reduction must be one of"):
        mm.MODELS.build(dict(type="GumbelEQLv2Loss", reduction="none"))
    with pytest.raises(ValueError, match="GumbelBCELoss: backend must be one of"):
        mm.MODELS.build(dict(type="GumbelBCELoss", backend="tpu"))
    loss_cls = mm.MODELS.build(dict(type="GumbelCELoss"))
    with pytest.raises(ValueError, match=r"GumbelCELoss: cls_score must have shape \(N, 1204\)"):
        loss_cls(torch.zeros(4, C), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"weight \(label_weights\) must have shape \(N,\)"):
        loss_cls(torch.zeros(4, C + 1), torch.zeros(4, dtype=torch.long), torch.ones(4, 2))
