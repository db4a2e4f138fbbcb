"""LVIS metrics (AP, APr, APc, APf, box AP) of torchvision-style detections.

Evaluation runs on faster-coco-eval's C++ evaluator in LVIS mode (`lvis_style=True`): federated
ground truth (a detection of a class neither annotated nor in the image's `neg_category_ids` is
dropped; an unmatched detection of a class in `not_exhaustive_category_ids` is ignored) and
the r/c/f groups from the categories' `frequency` field. To match the official LVIS API
(lvis 0.5.3, checked against it in tests/test_evaluation.py) it is also given
- at most `max_dets` (300) detections per *image*, over all classes, highest scores first
  (LVISResults.limit_dets_per_image; ties keep their input order), and `maxDets=[max_dets]`;
- result areas from the boxes (w*h) for both bbox and segm, as LVIS does.

Metrics are in percent. -1 means "undefined": no ground truth in that group (e.g. APr on a
split without rare classes) -- reported as given, never averaged in. With no detections at
all every defined AP is 0.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from .rle import encode_binary_masks

__all__ = ["detections_to_lvis_results", "image_results", "limit_dets_per_image",
           "evaluate_lvis", "format_metrics_table"]

logger = logging.getLogger(__name__)


def image_results(image_id: int, boxes: torch.Tensor, scores: torch.Tensor,
                  labels: torch.Tensor, cat_ids: Sequence[int],
                  segmentations: Optional[Sequence[dict]] = None) -> List[dict]:
    """One image's detections (in the order given) as LVIS results.

    boxes (K, 4) xyxy in original image pixels, scores (K,), labels (K,) contiguous class
    indices (`cat_ids[label]` is the LVIS id), segmentations: K RLEs or None (boxes only)."""
    boxes = boxes.detach().float().cpu()
    labels = labels.detach().cpu().to(torch.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= len(cat_ids)):
        raise ValueError(f"image {int(image_id)}: labels must be in [0, {len(cat_ids)}), got "
                         f"{labels.min().item()}..{labels.max().item()}")
    if segmentations is not None and len(segmentations) != len(labels):
        raise ValueError(f"image {int(image_id)}: {len(segmentations)} masks for "
                         f"{len(labels)} detections")
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    results = []
    for k, (box, score, label) in enumerate(zip(xywh, scores.detach().float().cpu().tolist(),
                                                labels.tolist())):
        res = {"image_id": int(image_id), "category_id": cat_ids[label], "bbox": box,
               "score": score}
        if segmentations is not None:
            res["segmentation"] = segmentations[k]
        results.append(res)
    return results


def detections_to_lvis_results(outputs: Sequence[dict], image_ids: Sequence[int],
                               cat_ids: Sequence[int], with_masks: bool = True, *,
                               max_dets_per_image: int = 300, mask_threshold: float = 0.5,
                               label_offset: int = 0) -> List[dict]:
    """torchvision detection outputs -> LVIS results (list of dicts).

    Args:
        outputs: one dict per image with `boxes` (K, 4) xyxy in original image pixels, `scores`
            (K,), `labels` (K,) contiguous class indices and, for masks, `masks` (K, 1, H, W)
            (or (K, H, W)) probabilities, as Mask R-CNN returns in eval mode.
        image_ids: the LVIS image id of each output (target["image_id"]).
        cat_ids: contiguous index -> LVIS category id (`LVISDataset.cat_ids`).
        with_masks: add `segmentation` (RLE of masks > mask_threshold, counts as str).
        max_dets_per_image: keep the highest-scoring this many per image (LVIS: 300).
        label_offset: subtracted from labels first (1 for a torchvision head whose label 0 is
            background).

    Returns dicts with image_id, category_id, bbox [x, y, w, h], score (and segmentation).
    The evaluator (gumbel_kernels.engine.evaluator) encodes masks on the device instead.
    """
    if len(outputs) != len(image_ids):
        raise ValueError(f"{len(outputs)} outputs but {len(image_ids)} image_ids")
    cat_ids = list(cat_ids)
    results = []
    for out, image_id in zip(outputs, image_ids):
        order = torch.argsort(out["scores"].detach().float(), descending=True,
                              stable=True)[:max_dets_per_image]
        rles = None
        if with_masks:
            if "masks" not in out:
                raise ValueError(f"image {int(image_id)}: with_masks=True but the output has no 'masks'")
            masks = out["masks"].detach()[order]
            if masks.dim() == 4:
                masks = masks[:, 0]
            rles = encode_binary_masks(masks > mask_threshold)
        try:
            results += image_results(image_id, out["boxes"][order], out["scores"][order],
                                     out["labels"][order].to(torch.int64) - label_offset,
                                     cat_ids, rles)
        except ValueError as error:
            raise ValueError(f"{error} (after label offset {label_offset})") from None
    return results


def limit_dets_per_image(results: Iterable[dict], max_dets: int) -> List[dict]:
    """At most max_dets results per image, highest scores first, ties in input order; the
    output is grouped by image in order of first appearance (as the LVIS API does)."""
    per_image: Dict[int, List[dict]] = {}
    for res in results:
        per_image.setdefault(res["image_id"], []).append(res)
    out = []
    for anns in per_image.values():
        if max_dets >= 0 and len(anns) > max_dets:
            anns = sorted(anns, key=lambda a: a["score"], reverse=True)[:max_dets]
        out.extend(anns)
    return out


_SUMMARY_KEYS = {  # faster-coco-eval stats_as_dict name -> our name
    "AP_all": "AP", "AP_50": "AP50", "AP_75": "AP75", "AP_small": "APs", "AP_medium": "APm",
    "AP_large": "APl", "APr": "APr", "APc": "APc", "APf": "APf", "AR_all": "AR",
    "AR_small": "ARs", "AR_medium": "ARm", "AR_large": "ARl",
}


def _percent(value: float) -> float:
    value = float(value)
    return value if value < 0 else 100.0 * value


def _read_results(path) -> List[dict]:
    """The results list of an LVIS results json file."""
    with open(path) as f:
        loaded = json.load(f)
    if not isinstance(loaded, list):
        raise ValueError(f"{os.fspath(path)}: an LVIS results file is a json list")
    return loaded


def _check_segmentation(results: List[dict], iou_types: Sequence[str]) -> None:
    if "segm" in iou_types and any("segmentation" not in r for r in results):
        raise ValueError("segm evaluation needs a 'segmentation' in every result "
                         "(detections_to_lvis_results(..., with_masks=True)); "
                         "evaluate box-only results with iou_types=('bbox',)")


def evaluate_lvis(gt_ann_file, results, iou_types: Sequence[str] = ("segm", "bbox"),
                  max_dets: int = 300, *, image_ids: Optional[Iterable[int]] = None,
                  verbose: bool = False) -> Dict[str, float]:
    """LVIS AP of `results` against the LVIS json `gt_ann_file` (a path, or the loaded dict).

    `results`: a list of result dicts, or the path of a results json. A path is read again for
    each IoU type and nothing else is kept, which is what keeps rank 0's memory down at LVIS
    scale (19,809 images x 300 detections).

    `image_ids` restricts the evaluation to those images (e.g. a quick look at part of val);
    by default every image of the file counts, detected or not. `verbose` prints the summaries.

    Returns, in percent (-1: undefined, see the module docstring):
    - "AP", "APr", "APc", "APf": mask AP (box AP if "segm" is not in iou_types);
    - "APb": box AP, when "bbox" is in iou_types;
    - "<type>/<metric>" for each evaluated type: AP, AP50, AP75, APs, APm, APl, APr, APc, APf,
      AR, ARs, ARm, ARl (AR at max_dets).
    """
    from faster_coco_eval import COCO, COCOeval_faster

    iou_types = tuple(iou_types)
    unknown = [t for t in iou_types if t not in ("segm", "bbox")]
    if not iou_types or unknown:
        raise ValueError(f"iou_types={iou_types!r} must be a non-empty subset of ('segm', 'bbox')")
    if not isinstance(gt_ann_file, dict):
        gt_ann_file = os.fspath(gt_ann_file)
    if image_ids is not None:
        image_ids = list(image_ids)
        if not image_ids:
            raise ValueError("image_ids is empty")
    source = results if isinstance(results, (str, os.PathLike)) else None
    given = None if source is not None else limit_dets_per_image(list(results), max_dets)

    def fresh_results() -> List[dict]:
        # loadRes annotates the dicts it is given (id, area, rle): a fresh list each time.
        if source is None:
            return [dict(r) for r in given]
        out = limit_dets_per_image(_read_results(source), max_dets)
        _check_segmentation(out, iou_types)
        return out

    if given is not None:
        _check_segmentation(given, iou_types)  # a bad list fails before anything is evaluated
    say = print if verbose else (lambda *a, **k: None)
    quiet = say if verbose else logger.debug
    gt = COCO(gt_ann_file, print_function=quiet)
    if any("frequency" not in c for c in gt.dataset.get("categories", [])):
        raise ValueError(f"{gt_ann_file if isinstance(gt_ann_file, str) else 'ground truth'}: every "
                         "category needs a 'frequency' ('r'/'c'/'f') for APr/APc/APf")

    metrics: Dict[str, float] = {}
    for iou_type in iou_types:
        dt = gt.loadRes(fresh_results())
        dt.print_function = quiet
        ev = COCOeval_faster(gt, dt, iouType=iou_type, lvis_style=True, print_function=say)
        ev.params.maxDets = [max_dets]
        if image_ids is not None:
            ev.params.imgIds = sorted({int(i) for i in image_ids})
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        stats = ev.stats_as_dict
        for src, name in _SUMMARY_KEYS.items():
            if src in stats:
                metrics[f"{iou_type}/{name}"] = _percent(stats[src])
    main = "segm" if "segm" in iou_types else "bbox"
    for name in ("AP", "APr", "APc", "APf"):
        metrics[name] = metrics[f"{main}/{name}"]
    if "bbox" in iou_types:
        metrics["APb"] = metrics["bbox/AP"]
    return dict(sorted(metrics.items(), key=lambda kv: ("/" in kv[0], kv[0])))


def format_metrics_table(metrics: Dict[str, float]) -> str:
    """A fixed-width table: one row per evaluated type (segm, bbox) with AP, AP50, AP75, APs,
    APm, APl, APr, APc, APf, AR; '-' for undefined (-1) or missing values."""
    columns = ["AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf", "AR"]
    types = [t for t in ("segm", "bbox") if f"{t}/AP" in metrics]

    def cell(value: Optional[float]) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)) or value < 0:
            return "-"
        return f"{value:.2f}"

    if not types:  # only the headline keys
        return "\n".join(f"{k:>5}: {cell(v)}" for k, v in metrics.items())
    lines = ["type | " + " | ".join(f"{c:>6}" for c in columns)]
    lines.append("-" * len(lines[0]))
    for t in types:
        lines.append(f"{t:<4} | " + " | ".join(f"{cell(metrics.get(f'{t}/{c}')):>6}" for c in columns))
    return "\n".join(lines)
