"""YAML experiment configs with `_base_` inheritance.

A config may name a `_base_` file (relative to itself, or a list of them); its own keys are
merged over the base's recursively. DEFAULTS below fill in everything a config leaves out, so a
config only says what differs. See configs/README.md for the keys.
"""
from __future__ import annotations

import copy
import os
from typing import Any, Dict

import yaml

DEFAULTS: Dict[str, Any] = {
    "seed": 0,
    "output_dir": "runs/default",
    # Model defaults are torchvision's Mask R-CNN; configs/lvis_v1_r50_base.yaml switches the
    # paper rows to the official (mmdetection 2.21) recipe.
    "model": {
        "backbone": "resnet50", "weights": None, "trainable_layers": 3,
        "min_size": [640, 672, 704, 736, 768, 800], "max_size": 1333,
        "normalized_mask": False, "mask_temperature": 20.0, "nms": 0.5, "score_thresh": 1e-4,
        "detections_per_img": 300, "box_batch_size_per_image": 512,
        "box_positive_fraction": 0.25, "norm": None,
        "rpn_pre_nms_top_n": [2000, 1000], "rpn_post_nms_top_n": [2000, 1000],
        "roi_sampling_ratio": 2, "roi_aligned": False, "box_loss": "smooth_l1",
        "mask_target": "roi_align", "mask_paste": "torchvision", "score_activation": None,
        "cls_init": "auto", "cls_init_weight": None, "cls_init_bias": None,
    },
    "data": {
        "root": "data/coco", "train_json": "annotations/lvis_v1_train.json",
        "val_json": "annotations/lvis_v1_val.json", "train_images": ".", "val_images": ".",
        "synthetic": None, "filter_empty": True,
        "sampler": "random", "rfs_threshold": 0.001, "rfs_mode": "deterministic",
        "flip_prob": 0.5, "num_workers": 4, "aspect_ratio_grouping": False,
    },
    "method": {"loss": "softmax", "lambda_": 0.0011, "activation": None},
    "solver": {
        "base_lr": 0.02, "base_batch_size": 16, "batch_size": 2, "schedule": "1x",
        "epochs": None, "max_iters": None, "warmup_iters": 500, "warmup_factor": 0.001,
        "momentum": 0.9, "weight_decay": 1e-4, "amp": False, "checkpoint_every": 1000,
        "clip_grad_norm": None,
    },
    "eval": {"max_dets": 300, "batch_size": 1, "max_images": None},
}

# Epochs and learning-rate steps (x0.1) of the standard schedules.
SCHEDULES = {"1x": (12, (8, 11)), "2x": (24, (16, 22))}


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read(path: str, seen: tuple) -> dict:
    path = os.path.abspath(path)
    if path in seen:
        raise ValueError(f"config {path}: `_base_` cycle through {' -> '.join(seen)}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config {path}: expected a mapping at the top level")
    bases = data.pop("_base_", [])
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = _merge(merged, _read(os.path.join(os.path.dirname(path), base), seen + (path,)))
    return _merge(merged, data)


def load_config(path: str, overrides: Dict[str, Any] | None = None) -> dict:
    """DEFAULTS <- the `_base_` chain <- the file <- overrides ({"solver.max_iters": 10, ...})."""
    cfg = _merge(DEFAULTS, _read(path, ()))
    for dotted, value in (overrides or {}).items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    unknown = set(cfg) - set(DEFAULTS) - {"name", "description"}
    if unknown:
        raise ValueError(f"config {path}: unknown top-level keys {sorted(unknown)}")
    if cfg["solver"]["schedule"] not in SCHEDULES:
        raise ValueError(f"config {path}: solver.schedule must be one of {sorted(SCHEDULES)}")
    return cfg
