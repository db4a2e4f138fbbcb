"""Official GOL checkpoints (mmdetection 2.x Mask R-CNN) -> checkpoints of this harness.

    python -m gumbel_kernels.tools.convert_mmdet IN.pth OUT.pt --config configs/r50_2x_gol.yaml
        [--num-classes 1203] [--allow-pickle]
    python -m gumbel_kernels.train --config configs/r50_2x_gol.yaml --eval-only --checkpoint OUT.pt

IN.pth is what kostas1515/GOL releases (mmcv's checkpoint: {"meta", "state_dict", ...}, or a bare
state dict), --config the harness config of the same run (its model section decides the
layers: backbone depth, normalized mask predictor, the classifier's width). OUT.pt loads into
that config's model with strict=True, and the converted model computes what mmdetection's
modules compute, name by name:

  backbone.*                        ResNet           -> backbone.body.* (same names)
  neck.lateral_convs.i.conv         FPN              -> backbone.fpn.inner_blocks.i.0
  neck.fpn_convs.i.conv                              -> backbone.fpn.layer_blocks.i.0
  rpn_head.rpn_conv/rpn_cls/rpn_reg RPNHead          -> rpn.head.conv.0.0/cls_logits/bbox_pred
  roi_head.bbox_head.shared_fcs.0/1 Shared2FCBBoxHead -> roi_heads.box_head.fc6/fc7
  roi_head.bbox_head.fc_cls                          -> roi_heads.box_predictor.cls_score
  roi_head.bbox_head.fc_reg                          -> roi_heads.box_predictor.bbox_pred
  roi_head.mask_head.convs.i.conv   FCNMaskHead      -> roi_heads.mask_head.i.0
  roi_head.mask_head.upsample                        -> roi_heads.mask_predictor.conv5_mask
  roi_head.mask_head.conv_logits                     -> roi_heads.mask_predictor.mask_fcn_logits

Two layouts differ: mmdetection numbers classes 0..C-1 with no background slot in fc_reg
(4C rows) and conv_logits (C channels), torchvision's heads have C + 1 with the background
first, which inference never reads: those rows are written as zeros (a zero NormedConv2d row
stays 0, no NaN). fc_cls (C logits for the Gumbel/sigmoid heads, C + 1 with mmdetection's
background last for softmax and GumbelCE) is this harness's own layout already. A
class-agnostic fc_reg or conv_logits is repeated for every class, which is what it computes.
The temperature of a NormedConv2d mask predictor is not a weight: it comes from the config
(model.normalized_mask, model.mask_temperature; 20 in GOL).

The class count the harness model needs: --num-classes, else the config's generated data set
(data.synthetic.num_classes), else the categories of its val json when it exists, else LVIS v1
(1203) or v0.5 (1230) by the json's name. A checkpoint whose class count or classifier width
differs, that is not this layout (a harness or detectron2 checkpoint, another head, another
ResNet depth) is an error that says so.
"""
from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import re
from types import SimpleNamespace
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..data.synthetic import generate
from ..detection import build_model
from ..engine.checkpoint import save_checkpoint
from ..engine.config import load_config

log = logging.getLogger(__name__)

LVIS_NUM_CLASSES = {"lvis_v1": 1203, "lvis_v0.5": 1230}
SECTIONS = ("backbone.", "neck.", "rpn_head.", "roi_head.bbox_head.", "roi_head.mask_head.")
FC_REG, CONV_LOGITS, FC_CLS = ("roi_head.bbox_head.fc_reg", "roi_head.mask_head.conv_logits",
                               "roi_head.bbox_head.fc_cls")


class ConversionError(ValueError):
    """The checkpoint is not an mmdetection 2.x Mask R-CNN that fits the config's model."""


def _with_background(rows_per_class: int) -> Callable[[Tensor, int], Tensor]:
    """mmdetection's per-class rows (class k at k*r .. k*r + r - 1; one block when class-agnostic)
    -> torchvision's, whose block 0 is the background (zeros) and class k is block k + 1."""

    def convert(source: Tensor, num_classes: int) -> Tensor:
        blocks = source.shape[0] // rows_per_class
        if blocks == 1 and num_classes > 1:  # class-agnostic: the same rows for every class
            source = source.repeat(num_classes, *([1] * (source.dim() - 1)))
        return torch.cat([source.new_zeros((rows_per_class,) + source.shape[1:]), source])

    return convert


# (harness key pattern, mmdetection key template, value conversion or None)
RULES: Tuple[Tuple[str, str, Optional[Callable]], ...] = (
    (r"backbone\.body\.(.+)", r"backbone.\1", None),
    (r"backbone\.fpn\.inner_blocks\.(\d+)\.0\.(weight|bias)", r"neck.lateral_convs.\1.conv.\2",
     None),
    (r"backbone\.fpn\.layer_blocks\.(\d+)\.0\.(weight|bias)", r"neck.fpn_convs.\1.conv.\2", None),
    (r"rpn\.head\.conv\.0\.0\.(weight|bias)", r"rpn_head.rpn_conv.\1", None),
    (r"rpn\.head\.cls_logits\.(weight|bias)", r"rpn_head.rpn_cls.\1", None),
    (r"rpn\.head\.bbox_pred\.(weight|bias)", r"rpn_head.rpn_reg.\1", None),
    (r"roi_heads\.box_head\.fc6\.(weight|bias)", r"roi_head.bbox_head.shared_fcs.0.\1", None),
    (r"roi_heads\.box_head\.fc7\.(weight|bias)", r"roi_head.bbox_head.shared_fcs.1.\1", None),
    (r"roi_heads\.box_predictor\.cls_score\.(weight|bias)", FC_CLS + r".\1", None),
    (r"roi_heads\.box_predictor\.bbox_pred\.(weight|bias)", FC_REG + r".\1", _with_background(4)),
    (r"roi_heads\.mask_head\.(\d+)\.0\.(weight|bias)", r"roi_head.mask_head.convs.\1.conv.\2",
     None),
    (r"roi_heads\.mask_predictor\.conv5_mask\.(weight|bias)", r"roi_head.mask_head.upsample.\1",
     None),
    (r"roi_heads\.mask_predictor\.mask_fcn_logits\.(weight|bias)", CONV_LOGITS + r".\1",
     _with_background(1)),
)
# Harness state that no mmdetection weight corresponds to (a loss's training statistics, e.g.
# EQLv2's gradient sums): kept as the freshly built model has it.
OWN_STATE = (r"roi_heads\.classification_loss\..+",)


def read_mmdet_checkpoint(path: str, allow_pickle: bool = False) -> Tuple[Dict[str, Tensor], dict]:
    """(state dict, meta) of an mmcv checkpoint file, after checking its layout."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as error:  # UnpicklingError, RuntimeError, EOFError, ... on a bad file
        text = " ".join(str(error).split())
        hint = (" It holds pickled Python objects: pass --allow-pickle if you trust the file "
                "(unpickling can run code)." if "weights only" in text.lower() else "")
        raise ConversionError(f"{path}: cannot be read as a torch checkpoint "
                              f"({type(error).__name__}: {text[:200]}).{hint}") from None
    if not isinstance(raw, dict):
        raise ConversionError(f"{path}: holds a {type(raw).__name__}, not an mmcv checkpoint dict")
    meta = raw.get("meta") if isinstance(raw.get("meta"), dict) else {}
    state = raw.get("state_dict", raw)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict) \
            and "state_dict" not in raw:
        inner = state["model"]
        kind = ("a checkpoint of this harness already (load it with --eval-only --checkpoint)"
                if any(k.startswith("backbone.body.") for k in inner) else
                "a detectron2 checkpoint" if any(k.startswith("backbone.bottom_up.") for k in inner)
                else "not an mmdetection checkpoint")
        raise ConversionError(f"{path}: {kind}; expected mmdetection 2.x's state_dict with "
                              f"{', '.join(s + '*' for s in SECTIONS)}")
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)} \
        if isinstance(state, dict) else {}
    if not tensors:
        raise ConversionError(f"{path}: no state_dict of tensors in it")
    if all(k.startswith("module.") for k in tensors):  # saved from a DDP wrapper
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    absent = [s + "*" for s in SECTIONS if not any(k.startswith(s) for k in tensors)]
    if absent:
        found = sorted({".".join(k.split(".")[:2]) for k in tensors})[:8]
        raise ConversionError(f"{path}: not an mmdetection 2.x Mask R-CNN checkpoint: no "
                              f"{', '.join(absent)} keys (it has {', '.join(found)}, ...)")
    return tensors, meta


def checkpoint_num_classes(state: Dict[str, Tensor], path: str) -> int:
    """C from the class-specific heads (fc_reg: 4C rows, conv_logits: C channels)."""
    for key in (FC_REG + ".weight", CONV_LOGITS + ".weight", FC_CLS + ".weight"):
        if key not in state:
            raise ConversionError(f"{path}: {key} is missing")
    reg, logits = state[FC_REG + ".weight"].shape[0], state[CONV_LOGITS + ".weight"].shape[0]
    # A class-agnostic head (4 rows, 1 channel) says nothing about C.
    counts = {n for n in (reg // 4 if reg > 4 else None, logits if logits > 1 else None) if n}
    if reg % 4 or len(counts) != 1:
        raise ConversionError(f"{path}: the heads disagree on the class count ({FC_REG}: {reg} "
                              f"rows, {CONV_LOGITS}: {logits} channels)")
    return counts.pop()


def expected_num_classes(cfg: dict) -> Tuple[int, str]:
    """(foreground classes of the config's data, where that number comes from)."""
    data = cfg["data"]
    if data.get("synthetic"):
        default = inspect.signature(generate).parameters["num_classes"].default
        return int(data["synthetic"].get("num_classes", default)), "data.synthetic.num_classes"
    val_json = os.path.join(data["root"], data["val_json"])
    if os.path.isfile(val_json):
        with open(val_json) as f:
            return len(json.load(f)["categories"]), f"the categories of {val_json}"
    name = os.path.basename(data["val_json"])
    for prefix, count in sorted(LVIS_NUM_CLASSES.items(), key=lambda kv: -len(kv[0])):
        if name.startswith(prefix + "_"):
            return count, f"{prefix.replace('_', ' ')} (data.val_json={data['val_json']})"
    raise ConversionError(f"the class count of data.val_json={data['val_json']} is unknown and "
                          f"the file is not there: pass --num-classes")


def build_harness_model(cfg: dict, num_classes: int):
    """The config's model, untrained and without downloading trunk weights (the layers only).

    The classification loss's class frequencies decide nothing that is stored (its drop mask is
    not part of the state dict), so uniform counts stand in for the training set's."""
    from ..train import build_loss  # the config's loss, as training builds it

    stand_in = SimpleNamespace(image_counts=torch.ones(num_classes, dtype=torch.int64),
                               num_images=num_classes, num_images_with_annotations=num_classes)
    return build_model(cfg["model"], num_classes, build_loss(cfg, stand_in), load_weights=False)


def _stage3_blocks(keys) -> int:
    """Residual blocks in ResNet stage 3 (6 in R50, 23 in R101), from trunk key names."""
    return len({m.group(1) for k in keys
                for m in [re.match(r"backbone\.(?:body\.)?layer3\.(\d+)\.", k)] if m})


def _depth_hint(state_keys, target_keys) -> str:
    mine, theirs = _stage3_blocks(target_keys), _stage3_blocks(state_keys)
    if theirs != mine:
        return (f" The checkpoint's ResNet has {theirs} blocks in stage 3, the config's "
                f"{mine}: set model.backbone to its depth (resnet101: 23, resnet50: 6).")
    return ""


def convert_state(state: Dict[str, Tensor], model: torch.nn.Module, num_classes: int,
                  path: str) -> Dict[str, Tensor]:
    """The harness state dict of `model` filled from the mmdetection `state`."""
    target = model.state_dict()
    out: Dict[str, Tensor] = {}
    used = set()
    missing, wrong = [], []
    for key, current in target.items():
        rule = next(((re.fullmatch(p, key), t, f) for p, t, f in RULES if re.fullmatch(p, key)),
                    None)
        if rule is None:
            if any(re.fullmatch(p, key) for p in OWN_STATE):
                out[key] = current.clone()
                continue
            raise AssertionError(f"convert_mmdet has no rule for the harness key {key}")
        match, template, convert = rule
        source_key = match.expand(template)
        if source_key not in state:
            if key.endswith("num_batches_tracked"):  # a counter, not a weight
                out[key] = torch.zeros_like(current)
                continue
            missing.append(source_key)
            continue
        used.add(source_key)
        value = state[source_key]
        if convert is not None:
            value = convert(value, num_classes)
        if tuple(value.shape) != tuple(current.shape):
            wrong.append(f"{source_key} {tuple(state[source_key].shape)} -> {key} needs "
                         f"{tuple(current.shape)}")
            continue
        out[key] = value.to(current.dtype).clone()
    # FrozenBatchNorm2d keeps no counter: the checkpoint's are not needed.
    unused = sorted(k for k in state if k not in used and not k.endswith("num_batches_tracked"))
    problems = []
    if missing:
        problems.append(f"{len(missing)} weights the config's model needs are not in it: "
                        + ", ".join(missing[:6]) + (", ..." if len(missing) > 6 else ""))
    if unused:
        problems.append(f"{len(unused)} of its weights have no place in the config's model: "
                        + ", ".join(unused[:6]) + (", ..." if len(unused) > 6 else ""))
    if wrong:
        problems.append("shapes differ: " + "; ".join(wrong[:4]))
    if problems:
        raise ConversionError(f"{path} does not fit the config's model: " + ". ".join(problems)
                              + "." + _depth_hint(state, target))
    return out


def convert(in_path: str, out_path: str, config: str, num_classes: Optional[int] = None,
            allow_pickle: bool = False) -> dict:
    """Converts `in_path` for `config`; writes `out_path` and returns what it wrote."""
    cfg = load_config(config)
    state, meta = read_mmdet_checkpoint(in_path, allow_pickle)
    found = checkpoint_num_classes(state, in_path)
    if num_classes is not None:
        expected, origin = int(num_classes), "--num-classes"
    else:
        expected, origin = expected_num_classes(cfg)
    if found != expected:
        raise ConversionError(f"{in_path} has {found} classes ({FC_REG}: "
                              f"{state[FC_REG + '.weight'].shape[0]} rows) but the config needs "
                              f"{expected} ({origin})")
    names = meta.get("CLASSES")
    if isinstance(names, (list, tuple)) and len(names) != found:
        raise ConversionError(f"{in_path}: meta.CLASSES lists {len(names)} classes, its heads "
                              f"have {found}")
    model = build_harness_model(cfg, found)
    width = model.roi_heads.box_predictor.cls_score.out_features
    have = state[FC_CLS + ".weight"].shape[0]
    if have != width:
        kind = {found: "C logits (Gumbel/sigmoid heads)",
                found + 1: "C + 1 logits, a background column (softmax, GumbelCE)"}
        raise ConversionError(f"{in_path}: {FC_CLS} has {have} outputs, "
                              f"{kind.get(have, 'neither C nor C + 1')}; "
                              f"the config's loss method.loss={cfg['method']['loss']!r} takes "
                              f"{width}: use the config of the run that trained it")
    converted = convert_state(state, model, found, in_path)
    model.load_state_dict(converted, strict=True)  # what --eval-only will do
    record = {"model": converted,
              "converted_from": {"path": os.path.abspath(in_path), "layout": "mmdetection 2.x",
                                 "config": os.path.abspath(config), "num_classes": found}}
    save_checkpoint(out_path, record)
    return record


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gumbel_kernels.tools.convert_mmdet",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", metavar="IN.pth", help="mmdetection 2.x checkpoint")
    parser.add_argument("output", metavar="OUT.pt", help="harness checkpoint to write")
    parser.add_argument("--config", required=True, help="the harness config of the same run")
    parser.add_argument("--num-classes", type=int,
                        help="foreground classes (default: from the config's data)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="read a checkpoint holding pickled Python objects (meta of some mmcv "
                        "versions). Unpickling can run code: only for files you trust")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    record = convert(args.input, args.output, args.config, args.num_classes, args.allow_pickle)
    info = record["converted_from"]
    print(f"wrote {args.output}: {len(record['model'])} tensors, {info['num_classes']} classes; "
          f"evaluate with: python -m gumbel_kernels.train --config {args.config} --eval-only "
          f"--checkpoint {args.output}")
    return record


if __name__ == "__main__":
    try:
        main()
    except (ConversionError, FileNotFoundError) as error:
        raise SystemExit(f"convert_mmdet: {error}")
