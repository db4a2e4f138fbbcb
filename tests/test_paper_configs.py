"""Every paper row's config against the official GOL config it reproduces (kostas1515/GOL,
mmdetection 2.21): the shared recipe, and per row what the official file sets."""
import pathlib

import pytest
import torch

from gumbel_kernels import losses
from gumbel_kernels.engine.config import load_config
from gumbel_kernels.train import build_loss

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# What every official LVIS v1 R50 file shares (configs/_base_ + configs/lvis of kostas1515/GOL).
SHARED = {
    "model.weights": "ResNet50_Weights.IMAGENET1K_V1", "model.trainable_layers": 3,
    "model.norm": "eval_bn", "model.min_size": [640, 672, 704, 736, 768, 800],
    "model.max_size": 1333, "model.rpn_pre_nms_top_n": [2000, 1000],
    "model.rpn_post_nms_top_n": [1000, 1000], "model.roi_sampling_ratio": 0,
    "model.roi_aligned": True, "model.box_loss": "l1", "model.mask_paste": "grid_sample",
    "model.score_thresh": 0.0001, "model.detections_per_img": 300,
    "model.box_batch_size_per_image": 512, "model.box_positive_fraction": 0.25,
    "data.root": "data/coco", "data.train_images": ".", "data.val_images": ".",
    "data.filter_empty": True, "data.rfs_threshold": 0.001, "data.rfs_mode": "deterministic",
    "solver.base_lr": 0.02, "solver.base_batch_size": 16, "solver.warmup_iters": 500,
    "solver.warmup_factor": 0.001, "solver.weight_decay": 0.0001, "eval.max_dets": 300,
}

CONSTANT_SOFTMAX = ("constant", 0.001, -6.5)
CONSTANT_GUMBEL = ("constant", 0.001, -2.0)
MMDET_DEFAULT = ("normal", None, None)
AUTO = ("auto", None, None)

# config: (paper row, loss, activation, sampler, schedule, nms, normalized mask, head init,
#          mask target, score activation, backbone, lambda_)
ROWS = {
    "r50_1x_softmax_random": ("Table 1 Softmax random", "softmax", None, "random", "1x", 0.5,
                              False, CONSTANT_SOFTMAX, "bitmap", None, "resnet50", 0.0011),
    "r50_1x_softmax_rfs": ("Table 1 Softmax RFS", "softmax", None, "rfs", "1x", 0.5, False,
                           CONSTANT_SOFTMAX, "bitmap", None, "resnet50", 0.0011),
    "r50_1x_sigmoid_random": ("Table 1 Sigmoid random", "sigmoid_ce", None, "random", "1x", 0.5,
                              False, CONSTANT_SOFTMAX, "bitmap", "softmax", "resnet50", 0.0011),
    "r50_1x_sigmoid_rfs": ("Table 1 Sigmoid RFS", "sigmoid_ce", None, "rfs", "1x", 0.5, False,
                           CONSTANT_SOFTMAX, "bitmap", "softmax", "resnet50", 0.0011),
    "r50_1x_gumbel_random": ("Table 1 Gumbel random", "gumbel_ce", None, "random", "1x", 0.5,
                             False, CONSTANT_GUMBEL, "bitmap", None, "resnet50", 0.0011),
    "r50_1x_gumbel_rfs": ("Table 1 Gumbel RFS", "gumbel_ce", None, "rfs", "1x", 0.5, False,
                          CONSTANT_GUMBEL, "bitmap", None, "resnet50", 0.0011),
    "r50_2x_softmax_random": ("Table 2 row 1", "softmax", None, "random", "2x", 0.5, False,
                              CONSTANT_SOFTMAX, "bitmap", None, "resnet50", 0.0011),
    "r50_2x_softmax_rfs": ("Table 2 row 2", "softmax", None, "rfs", "2x", 0.5, False,
                           CONSTANT_SOFTMAX, "bitmap", None, "resnet50", 0.0011),
    "r50_2x_eql_sigmoid_rfs": ("Table 2 row 3", "eql", "sigmoid", "rfs", "2x", 0.5, False,
                               MMDET_DEFAULT, "polygon", None, "resnet50", 0.0011),
    "r50_2x_eql_gumbel_rfs": ("Table 2 row 4", "eql", "gumbel", "rfs", "2x", 0.3, False,
                              CONSTANT_GUMBEL, "polygon", None, "resnet50", 0.0011),
    "r50_2x_eql_gumbel_rfs_normmask": ("Table 2 row 5", "eql", "gumbel", "rfs", "2x", 0.3, True,
                                       CONSTANT_GUMBEL, "polygon", None, "resnet50", 0.0011),
    "r50_2x_gol": ("Table 2 row 6 = GOL R50", "gol", "gumbel", "rfs", "2x", 0.3, True,
                   CONSTANT_GUMBEL, "polygon", None, "resnet50", 0.0011),
    "r101_2x_gol": ("GOL R101", "gol", "gumbel", "rfs", "2x", 0.3, True, CONSTANT_GUMBEL,
                    "polygon", None, "resnet101", 0.0011),
    "r50_2x_gol_lvis_v05": ("Table 3 GOL R50 LVIS v0.5", "gol", "gumbel", "rfs", "2x", 0.3, True,
                            CONSTANT_GUMBEL, "polygon", None, "resnet50", 0.00177),
    "fig4_eql_sigmoid": ("Fig. 4(ii) EQL sigmoid", "eql", "sigmoid", "random", "1x", 0.5, False,
                         MMDET_DEFAULT, "polygon", None, "resnet50", 0.0011),
    "fig4_eql_gumbel": ("Fig. 4(ii) EQL Gumbel", "eql", "gumbel", "random", "1x", 0.3, False,
                        CONSTANT_GUMBEL, "polygon", None, "resnet50", 0.0011),
    "fig4_droploss_sigmoid": ("Fig. 4(ii) DropLoss sigmoid", "droploss", "sigmoid", "random",
                              "1x", 0.5, False, ("constant", 0.01, -6.9), "polygon", None,
                              "resnet50", 0.0011),
    "fig4_droploss_gumbel": ("Fig. 4(ii) DropLoss Gumbel", "droploss", "gumbel", "random", "1x",
                             0.3, False, CONSTANT_GUMBEL, "polygon", None, "resnet50", 0.0011),
    "fig4_federated_sigmoid": ("Fig. 4(ii) Federated sigmoid", "federated", "sigmoid", "random",
                               "1x", 0.5, False, AUTO, "polygon", None, "resnet50", 0.0011),
    "fig4_federated_gumbel": ("Fig. 4(ii) Federated Gumbel", "federated", "gumbel", "random",
                              "1x", 0.5, False, AUTO, "polygon", None, "resnet50", 0.0011),
}
NOT_ROWS = {"demo_cpu", "lvis_v1_r50_base"}

# Head widths and score activations the official heads have (C = 1203, C + 1 with background).
HEADS = {"softmax": (1, "softmax"), "sigmoid_ce": (1, "sigmoid"), "gumbel_ce": (1, "gumbel"),
         "eql": (0, None), "droploss": (0, None), "gol": (0, "gumbel"), "federated": (0, None)}


def get(cfg, dotted):
    for key in dotted.split("."):
        cfg = cfg[key]
    return cfg


def test_every_config_is_a_paper_row_or_named_otherwise():
    files = {path.stem for path in CONFIGS.glob("*.yaml")}
    assert files == set(ROWS) | NOT_ROWS


@pytest.mark.parametrize("name", sorted(ROWS))
def test_paper_row_config(name):
    cfg = load_config(str(CONFIGS / f"{name}.yaml"))
    for dotted, value in SHARED.items():
        if dotted == "model.weights" and name == "r101_2x_gol":
            value = "ResNet101_Weights.IMAGENET1K_V1"
        assert get(cfg, dotted) == value, (name, dotted)
    (_, loss, activation, sampler, schedule, nms, normalized, init, mask_target, score,
     backbone, lambda_) = ROWS[name]
    assert (cfg["method"]["loss"], cfg["method"]["activation"]) == (loss, activation)
    assert cfg["method"]["lambda_"] == lambda_
    assert (cfg["data"]["sampler"], cfg["solver"]["schedule"]) == (sampler, schedule)
    model = cfg["model"]
    assert (model["nms"], model["normalized_mask"], model["mask_target"]) == (nms, normalized,
                                                                             mask_target)
    assert (model["cls_init"], model["cls_init_weight"], model["cls_init_bias"]) == init
    assert (model["score_activation"], model["backbone"]) == (score, backbone)
    version = "v0.5" if name.endswith("lvis_v05") else "v1"
    assert cfg["data"]["train_json"] == f"annotations/lvis_{version}_train.json"
    assert cfg["data"]["val_json"] == f"annotations/lvis_{version}_val.json"
    assert cfg["output_dir"] == f"runs/{name}"


class _TrainSet:
    image_counts = torch.tensor([1, 5, 50, 300, 2000])
    num_images_with_annotations = 10_000


@pytest.mark.parametrize("name", sorted(ROWS))
def test_paper_row_builds_the_official_head(name):
    cfg = load_config(str(CONFIGS / f"{name}.yaml"))
    module = build_loss(cfg, _TrainSet())
    extra, activation = HEADS[cfg["method"]["loss"]]
    assert module.num_logits(5) == 5 + extra
    assert module.activation == (activation or cfg["method"]["activation"])
    if isinstance(module, losses.GOLLoss):  # frequency f = count / 10,000 < lambda
        assert module.drop_classes.tolist() == [True, True, False, False, False]


def test_readme_table_names_every_paper_row():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| paper row |"):]
    for name in ROWS:
        assert f"`{name}.yaml`" in table, name
