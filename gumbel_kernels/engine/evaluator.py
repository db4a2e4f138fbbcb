"""LVIS evaluation of a detector: inference over the val set (split across ranks), LVIS results
json, and AP / APr / APc / APf (masks) and APb (boxes) by the LVIS rules (300 detections per
image, neg / not-exhaustive categories), computed by faster-coco-eval in LVIS mode."""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

import torch
from tqdm import tqdm

from ..data import collate_fn
from ..evaluation import detections_to_lvis_results, evaluate_lvis, format_metrics_table
from . import distributed as dist_utils

METRIC_KEYS = ("AP", "APr", "APc", "APf", "APb")


@torch.no_grad()
def evaluate(model, dataset, val_json: str, device: torch.device, out_dir: str, *,
             max_dets: int = 300, batch_size: int = 1, max_images: Optional[int] = None,
             progress: bool = True) -> Dict[str, float]:
    """Writes OUT/results.json and OUT/metrics.json (rank 0) and returns the metrics."""
    model.eval()
    indices = list(range(len(dataset)))[: max_images or None]
    mine = indices[dist_utils.rank()::dist_utils.world_size()]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, mine),
                                         batch_size=batch_size, collate_fn=collate_fn)
    results = []
    image_ids = []
    for images, targets in tqdm(loader, desc="eval", disable=not (progress and dist_utils.is_main()),
                                dynamic_ncols=True):
        outputs = model([image.to(device) for image in images])
        outputs = [{k: v.cpu() for k, v in o.items()} for o in outputs]
        ids = [int(t["image_id"]) for t in targets]
        image_ids += ids
        # Labels come out in torchvision's numbering (1..C): label_offset maps them to cat ids.
        results += detections_to_lvis_results(outputs, ids, dataset.cat_ids, with_masks=True,
                                              max_dets_per_image=max_dets, label_offset=1)
    gathered = dist_utils.gather_objects((results, image_ids))
    metrics: Dict[str, float] = {}
    if dist_utils.is_main():
        all_results = [r for part, _ in gathered for r in part]
        all_ids = sorted({i for _, ids in gathered for i in ids})
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(all_results, f)
        limit = all_ids if max_images else None
        metrics = evaluate_lvis(val_json, all_results, iou_types=("segm", "bbox"),
                                max_dets=max_dets, image_ids=limit)
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        print(format_metrics_table(metrics))
    dist_utils.barrier()
    return metrics
