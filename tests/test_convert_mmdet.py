"""tools.convert_mmdet on generated checkpoints with the official (mmdetection 2.x) names and
shapes: the generator agrees with mmdetection's own modules; a converted R50 GOL model computes
what mmdetection's ResNet, FPN, RPNHead, Shared2FCBBoxHead and FCNMaskHead (NormedConv2d,
temperature 20) compute, 1203-way; a converted checkpoint evaluates with --eval-only (strict
load); and every wrong input is a ConversionError that says what is wrong."""
import json
import pathlib
from collections import OrderedDict

import pytest
import torch

from gumbel_kernels import train as train_cli
from gumbel_kernels.engine.checkpoint import load_checkpoint
from gumbel_kernels.engine.config import load_config
from gumbel_kernels.tools import convert_mmdet
from gumbel_kernels.tools.convert_mmdet import ConversionError, build_harness_model, convert

from mmdet_support import mmdet_modules  # noqa: I001 (tests/, on pytest's path)
from test_train import tiny_config  # noqa: F401 (a fixture)

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOL_R50 = ROOT / "configs" / "r50_2x_gol.yaml"

# ResNet depth -> (bottleneck blocks?, blocks per stage), as mmdetection's ResNet.arch_settings.
ARCH = {18: (False, (2, 2, 2, 2)), 50: (True, (3, 4, 6, 3)), 101: (True, (3, 4, 23, 3))}


def official_state_dict(depth: int, num_classes: int, cls_channels: int, seed: int = 0):
    """A Mask R-CNN state dict in mmdetection 2.x's names and shapes, random values (every bias
    and BatchNorm statistic nonzero, so that a swapped or dropped tensor shows)."""
    g = torch.Generator().manual_seed(seed)
    sd = OrderedDict()

    def conv(name, out_c, in_c, k, bias=False):
        sd[f"{name}.weight"] = torch.randn(out_c, in_c, k, k, generator=g) / (in_c * k * k) ** 0.5
        if bias:
            sd[f"{name}.bias"] = torch.randn(out_c, generator=g) * 0.1

    def linear(name, out_f, in_f):
        sd[f"{name}.weight"] = torch.randn(out_f, in_f, generator=g) / in_f ** 0.5
        sd[f"{name}.bias"] = torch.randn(out_f, generator=g) * 0.1

    def bn(name, c):
        sd[f"{name}.weight"] = 0.5 + torch.rand(c, generator=g)
        sd[f"{name}.bias"] = torch.randn(c, generator=g) * 0.1
        sd[f"{name}.running_mean"] = torch.randn(c, generator=g) * 0.1
        sd[f"{name}.running_var"] = 0.5 + torch.rand(c, generator=g)
        sd[f"{name}.num_batches_tracked"] = torch.tensor(1000)

    bottleneck, blocks = ARCH[depth]
    conv("backbone.conv1", 64, 3, 7)
    bn("backbone.bn1", 64)
    in_c, outs = 64, []
    for stage, count in enumerate(blocks):
        planes = 64 * 2 ** stage
        out_c = planes * (4 if bottleneck else 1)
        for b in range(count):
            p = f"backbone.layer{stage + 1}.{b}"
            if bottleneck:
                conv(f"{p}.conv1", planes, in_c, 1)
                bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3)
                bn(f"{p}.bn2", planes)
                conv(f"{p}.conv3", out_c, planes, 1)
                bn(f"{p}.bn3", out_c)
            else:
                conv(f"{p}.conv1", planes, in_c, 3)
                bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3)
                bn(f"{p}.bn2", planes)
            if b == 0 and (stage > 0 or in_c != out_c):
                conv(f"{p}.downsample.0", out_c, in_c, 1)
                bn(f"{p}.downsample.1", out_c)
            in_c = out_c
        outs.append(out_c)
    for i, c in enumerate(outs):
        conv(f"neck.lateral_convs.{i}.conv", 256, c, 1, bias=True)
    for i in range(len(outs)):
        conv(f"neck.fpn_convs.{i}.conv", 256, 256, 3, bias=True)
    conv("rpn_head.rpn_conv", 256, 256, 3, bias=True)
    conv("rpn_head.rpn_cls", 3, 256, 1, bias=True)
    conv("rpn_head.rpn_reg", 12, 256, 1, bias=True)
    linear("roi_head.bbox_head.fc_cls", cls_channels, 1024)
    linear("roi_head.bbox_head.fc_reg", 4 * num_classes, 1024)
    linear("roi_head.bbox_head.shared_fcs.0", 1024, 256 * 7 * 7)
    linear("roi_head.bbox_head.shared_fcs.1", 1024, 1024)
    for i in range(4):
        conv(f"roi_head.mask_head.convs.{i}.conv", 256, 256, 3, bias=True)
    sd["roi_head.mask_head.upsample.weight"] = torch.randn(256, 256, 2, 2, generator=g) / 32
    sd["roi_head.mask_head.upsample.bias"] = torch.randn(256, generator=g) * 0.1
    conv("roi_head.mask_head.conv_logits", num_classes, 256, 1, bias=True)
    return sd


def save_mmdet(path, state, num_classes=None):
    """As mmcv's save_checkpoint lays it out."""
    meta = {"epoch": 24, "mmdet_version": "2.21.0"}
    if num_classes is not None:
        meta["CLASSES"] = tuple(f"class{k}" for k in range(num_classes))
    torch.save({"meta": meta, "state_dict": state}, path)
    return path


# ----------------------------------------------------------------------------------------------
# Against mmdetection's own modules (1203 classes, R50, the GOL row)
# ----------------------------------------------------------------------------------------------

C = 1203


@pytest.fixture(scope="module")
def mmdet_gol():
    """mmdetection's R50-FPN Mask R-CNN modules of the GOL row with the generated weights."""
    with mmdet_modules() as mm:
        from mmdet.models.layers import NormedConv2d
        build = mm.MODELS.build
        modules = OrderedDict(
            backbone=build(dict(type="ResNet", depth=50, num_stages=4, out_indices=(0, 1, 2, 3),
                                frozen_stages=1, norm_cfg=dict(type="BN", requires_grad=True),
                                norm_eval=True, style="pytorch")),
            neck=build(dict(type="FPN", in_channels=[256, 512, 1024, 2048], out_channels=256,
                            num_outs=5)),
            rpn_head=build(dict(
                type="RPNHead", in_channels=256, feat_channels=256,
                anchor_generator=dict(type="AnchorGenerator", scales=[8], ratios=[0.5, 1.0, 2.0],
                                      strides=[4, 8, 16, 32, 64]),
                bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4,
                                target_stds=[1.0] * 4))),
            bbox_head=build(dict(
                type="Shared2FCBBoxHead", in_channels=256, fc_out_channels=1024, roi_feat_size=7,
                num_classes=C, reg_class_agnostic=False,
                bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4,
                                target_stds=[0.1, 0.1, 0.2, 0.2]),
                loss_cls=dict(type="GOLLoss", image_counts=[50] * C, num_images=1000))),
            mask_head=build(dict(type="FCNMaskHead", num_convs=4, in_channels=256,
                                 conv_out_channels=256, num_classes=C)),
        )
        # GOL's predictor_cfg=dict(type='NormedConv2d', tempearture=20), set directly (mmcv's
        # build_conv_layer looks in mmengine's scope, not mmdet's registry).
        modules["mask_head"].conv_logits = NormedConv2d(256, C, 1, tempearture=20)
        state = official_state_dict(50, C, C, seed=3)
        prefix = {"backbone": "backbone.", "neck": "neck.", "rpn_head": "rpn_head.",
                  "bbox_head": "roi_head.bbox_head.", "mask_head": "roi_head.mask_head."}
        for name, module in modules.items():
            mine = {k[len(prefix[name]):]: v for k, v in state.items()
                    if k.startswith(prefix[name])}
            theirs = module.state_dict()
            assert {k: tuple(v.shape) for k, v in mine.items()} == \
                {k: tuple(v.shape) for k, v in theirs.items()}, name  # the generator is right
            module.load_state_dict(mine, strict=True)
            module.eval()
        yield modules, state


@pytest.fixture(scope="module")
def converted_gol(mmdet_gol, tmp_path_factory):
    _, state = mmdet_gol
    folder = tmp_path_factory.mktemp("gol")
    record = convert(str(save_mmdet(folder / "gol.pth", state, C)), str(folder / "gol.pt"),
                     str(GOL_R50))
    model = build_harness_model(load_config(str(GOL_R50)), C)
    model.load_state_dict(load_checkpoint(str(folder / "gol.pt"))["model"], strict=True)
    assert record["converted_from"]["num_classes"] == C
    return model.eval()


def _close(ours, theirs):
    scale = float(theirs.abs().max()) or 1.0
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * scale)


@torch.no_grad()
def test_trunk_fpn_and_rpn_compute_what_mmdet_computes(mmdet_gol, converted_gol):
    modules, _ = mmdet_gol
    x = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    theirs = modules["neck"](modules["backbone"](x))
    ours = list(converted_gol.backbone(x).values())
    assert len(ours) == len(theirs) == 5
    for a, b in zip(ours, theirs):
        _close(a, b)
    their_cls, their_reg = modules["rpn_head"](theirs)
    our_cls, our_reg = converted_gol.rpn.head(ours)
    for a, b in zip(our_cls + our_reg, their_cls + their_reg):
        _close(a, b)


@torch.no_grad()
def test_box_head_logits_deltas_and_detections(mmdet_gol, converted_gol):
    modules, _ = mmdet_gol
    head = modules["bbox_head"]
    g = torch.Generator().manual_seed(1)
    features = torch.randn(6, 256, 7, 7, generator=g)
    their_cls, their_reg = head(features)
    heads = converted_gol.roi_heads
    our_cls, our_reg = heads.box_predictor(heads.box_head(features))
    assert our_cls.shape == (6, C) and our_reg.shape == (6, (C + 1) * 4)
    _close(our_cls, their_cls)
    _close(our_reg[:, 4:], their_reg)  # class k of mmdetection is torchvision's k + 1
    assert bool((our_reg[:, :4] == 0).all())  # the background slot, never read

    corners = torch.rand(6, 2, generator=g) * 150
    rois = torch.cat([corners, corners + 20 + torch.rand(6, 2, generator=g) * 80], 1)
    their_boxes = head.bbox_coder.decode(rois, their_reg).view(6, C, 4)
    our_boxes = heads.box_coder.decode(our_reg, [rois])[:, 1:]
    _close(our_boxes, their_boxes)

    # The detections: Gumbel scores, strict 1e-4 threshold, per-class NMS, clipping to the image.
    from mmengine.config import ConfigDict
    cls_score = their_cls * 3 - 2  # a few confident classes
    test_cfg = ConfigDict(score_thr=1e-4, nms=dict(type="nms", iou_threshold=0.3),
                          max_per_img=300)
    image = (256, 320)
    theirs = head.predict_by_feat((torch.cat([torch.zeros(6, 1), rois], 1),), (cls_score,),
                                  (their_reg,), [dict(img_shape=image)], test_cfg)[0]
    boxes, scores, labels = heads.postprocess_detections(cls_score, our_reg, [rois], [image])
    assert 0 < len(scores[0]) <= 300
    assert len(scores[0]) == len(theirs.scores)
    _close(scores[0], theirs.scores)
    assert (labels[0] - 1).tolist() == theirs.labels.tolist()  # torchvision labels are 1..C
    _close(boxes[0], theirs.bboxes)


@torch.no_grad()
def test_normed_mask_logits_with_temperature_and_bias(mmdet_gol, converted_gol):
    modules, _ = mmdet_gol
    features = torch.randn(5, 256, 14, 14, generator=torch.Generator().manual_seed(2))
    theirs = modules["mask_head"](features)
    heads = converted_gol.roi_heads
    ours = heads.mask_predictor(heads.mask_head(features))
    assert theirs.shape == (5, C, 28, 28) and ours.shape == (5, C + 1, 28, 28)
    _close(ours[:, 1:], theirs)
    assert heads.mask_predictor.temperature == 20.0
    assert bool((ours[:, 0] == 0).all())  # zero row, zero bias: no NaN from the normalisation


# ----------------------------------------------------------------------------------------------
# Without mmdetection: the CLI, --eval-only, and the errors
# ----------------------------------------------------------------------------------------------

TINY_CLASSES = 4  # test_train's tiny config: the generated set's classes


def test_cli_output_evaluates_with_eval_only(tiny_config, tmp_path, capsys):  # noqa: F811
    source = save_mmdet(tmp_path / "tiny.pth", official_state_dict(18, TINY_CLASSES, TINY_CLASSES),
                        TINY_CLASSES)
    out = tmp_path / "tiny.pt"
    convert_mmdet.main([str(source), str(out), "--config", str(tiny_config)])
    assert "--eval-only" in capsys.readouterr().out
    state = load_checkpoint(str(out))["model"]
    metrics = train_cli.main(["--config", str(tiny_config), "--out", str(tmp_path / "eval"),
                              "--eval-only", "--checkpoint", str(out), "--no-progress"])
    assert set(metrics) >= {"AP", "APr", "APc", "APf", "APb"}
    assert json.load(open(tmp_path / "eval" / "metrics.json"))["AP"] == metrics["AP"]
    original = official_state_dict(18, TINY_CLASSES, TINY_CLASSES)
    assert torch.equal(state["backbone.body.layer2.0.downsample.0.weight"],
                       original["backbone.layer2.0.downsample.0.weight"])
    assert torch.equal(state["roi_heads.box_predictor.bbox_pred.bias"][4:],
                       original["roi_head.bbox_head.fc_reg.bias"])


def test_class_agnostic_heads_repeat_for_every_class(tiny_config, tmp_path):  # noqa: F811
    state = official_state_dict(18, TINY_CLASSES, TINY_CLASSES)
    state["roi_head.bbox_head.fc_reg.weight"] = state["roi_head.bbox_head.fc_reg.weight"][:4]
    state["roi_head.bbox_head.fc_reg.bias"] = state["roi_head.bbox_head.fc_reg.bias"][:4]
    record = convert(str(save_mmdet(tmp_path / "a.pth", state)), str(tmp_path / "a.pt"),
                     str(tiny_config))
    bias = record["model"]["roi_heads.box_predictor.bbox_pred.bias"].view(TINY_CLASSES + 1, 4)
    assert bool((bias[0] == 0).all())
    for k in range(1, TINY_CLASSES + 1):
        assert torch.equal(bias[k], state["roi_head.bbox_head.fc_reg.bias"])


def _fails(tmp_path, config, state, *needles, **kwargs):
    path = tmp_path / "bad.pth"
    if isinstance(state, dict):
        torch.save(state, path)
    else:
        path.write_bytes(state)
    with pytest.raises(ConversionError) as info:
        convert(str(path), str(tmp_path / "out.pt"), str(config), **kwargs)
    for needle in needles:
        assert needle in str(info.value), str(info.value)
    assert not (tmp_path / "out.pt").exists()


def test_a_different_class_count_is_named(tiny_config, tmp_path):  # noqa: F811
    state = official_state_dict(18, 5, 5)
    _fails(tmp_path, tiny_config, {"state_dict": state}, "5 classes", "needs 4",
           "data.synthetic.num_classes")
    _fails(tmp_path, tiny_config, {"state_dict": state}, "needs 7", "--num-classes",
           num_classes=7)
    # The paper's config: LVIS v1's 1203 classes from the json's name (no data here).
    _fails(tmp_path, GOL_R50, {"state_dict": state}, "needs 1203", "lvis v1")
    ok = official_state_dict(18, TINY_CLASSES, TINY_CLASSES)
    _fails(tmp_path, tiny_config, {"meta": {"CLASSES": ("a", "b")}, "state_dict": ok},
           "meta.CLASSES lists 2")


def test_a_classifier_of_the_other_width_is_named(tiny_config, tmp_path):  # noqa: F811
    state = official_state_dict(18, TINY_CLASSES, TINY_CLASSES + 1)  # softmax / GumbelCE head
    _fails(tmp_path, tiny_config, {"state_dict": state}, "fc_cls has 5 outputs",
           "background column", "method.loss='gol' takes 4")


def test_other_layouts_are_named(tiny_config, tmp_path):  # noqa: F811
    state = official_state_dict(18, TINY_CLASSES, TINY_CLASSES)
    faster = {k: v for k, v in state.items() if not k.startswith("roi_head.mask_head.")}
    _fails(tmp_path, tiny_config, {"state_dict": faster}, "no roi_head.mask_head.* keys")
    harness = {"model": {"backbone.body.conv1.weight": torch.zeros(1)}}
    _fails(tmp_path, tiny_config, harness, "a checkpoint of this harness already")
    detectron2 = {"model": {"backbone.bottom_up.stem.conv1.weight": torch.zeros(1)}}
    _fails(tmp_path, tiny_config, detectron2, "detectron2")
    _fails(tmp_path, tiny_config, b"not a checkpoint at all", "cannot be read")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        convert(str(tmp_path / "missing.pth"), str(tmp_path / "out.pt"), str(tiny_config))
    extra = dict(state, **{"roi_head.mask_iou_head.fc.weight": torch.zeros(2, 2)})
    _fails(tmp_path, tiny_config, {"state_dict": extra}, "roi_head.mask_iou_head.fc.weight",
           "no place in the config's model")


def test_another_resnet_depth_is_named(tiny_config, tmp_path):  # noqa: F811
    state = official_state_dict(50, TINY_CLASSES, TINY_CLASSES)
    _fails(tmp_path, tiny_config, {"state_dict": state}, "6 blocks in stage 3", "model.backbone")
