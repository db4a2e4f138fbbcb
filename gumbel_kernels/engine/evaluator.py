"""LVIS evaluation of a detector: inference over the val set (split across ranks), LVIS results
json, and AP / APr / APc / APf (masks) and APb (boxes) by the LVIS rules (300 detections per
image, neg / not-exhaustive categories), computed by faster-coco-eval in LVIS mode.

Built for LVIS v1 val (19,809 images x 300 detections) on 8 GPUs:
- the model returns its 28 x 28 mask probabilities unpasted; each image's masks are pasted in
  chunks (at most `paste_chunk_bytes` of float pixels at a time), binarised (> 0.5) and
  run-length encoded on the model's device (gumbel_kernels.evaluation.rle): no full-resolution
  mask ever reaches the host;
- each rank appends its images' results to its own shard, OUT/eval_shards/rank<r>.jsonl (one
  line per image, written as it goes), so no rank holds its results in memory and nothing
  large passes through the process group; a shared OUT folder is assumed (one machine, or a
  shared file system);
- rank 0 merges the shards into OUT/results.json (the shards' json text copied, not
  parsed), evaluates from that file (read once per IoU type: one copy of the results in
  memory at a time), writes OUT/metrics.json and deletes the shards; the other ranks return
  {} at once instead of waiting for it.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Dict, List, Optional, Tuple

import torch
from tqdm import tqdm

from ..data import collate_fn
from ..detection.transform import paste_masks
from ..evaluation import evaluate_lvis, format_metrics_table, image_results
from ..evaluation.rle import encode_binary_masks
from . import distributed as dist_utils

SHARD_FOLDER = "eval_shards"
MASK_THRESHOLD = 0.5
# Float pixels of pasted masks alive at once: 64 MiB on a CPU, 512 MiB on a GPU.
PASTE_CHUNK_BYTES = {"cpu": 64 << 20, "cuda": 512 << 20}


def paste_and_encode(masks: torch.Tensor, boxes: torch.Tensor, image_size: Tuple[int, int],
                     paste: str, *, threshold: float = MASK_THRESHOLD,
                     chunk_bytes: Optional[int] = None) -> List[dict]:
    """(K, 1, M, M) mask probabilities and their (K, 4) boxes in the original image -> K
    compressed RLEs of the pasted masks > threshold, chunk by chunk on their device."""
    height, width = int(image_size[0]), int(image_size[1])
    budget = chunk_bytes or PASTE_CHUNK_BYTES.get(masks.device.type, PASTE_CHUNK_BYTES["cuda"])
    chunk = max(1, budget // max(1, height * width * 4))
    rles: List[dict] = []
    for start in range(0, masks.shape[0], chunk):
        pasted = paste_masks(masks[start:start + chunk], boxes[start:start + chunk],
                             (height, width), paste)
        rles += encode_binary_masks(pasted[:, 0] > threshold)
        del pasted
    return rles


@contextlib.contextmanager
def _unpasted_masks(model):
    """The model's outputs keep the mask head's M x M probabilities (see GOLTransform)."""
    transform = model.transform
    previous = transform.paste_masks
    transform.paste_masks = False
    try:
        yield transform.mask_paste
    finally:
        transform.paste_masks = previous


def shard_path(out_dir: str, rank: int) -> str:
    return os.path.join(out_dir, SHARD_FOLDER, f"rank{rank}.jsonl")


def merge_shards(out_dir: str, world: int) -> Tuple[str, List[int], int]:
    """Rank 0: every rank's shard -> OUT/results.json, one json list; returns (its path, the
    image ids evaluated, the number of results). No result is parsed: the lines' json text is
    copied."""
    image_ids: List[int] = []
    count = 0
    tmp = os.path.join(out_dir, ".results.json.tmp")
    with open(tmp, "w") as merged:
        merged.write("[")
        first = True
        for rank in range(world):
            path = shard_path(out_dir, rank)
            if not os.path.exists(path):
                raise FileNotFoundError(f"evaluation: rank {rank}'s results {path} are missing "
                                        f"(is OUT on a file system every rank shares?)")
            with open(path) as shard:
                for line in shard:
                    image_id, _, records = line.rstrip("\n").partition("\t")
                    image_ids.append(int(image_id))
                    if records == "[]":
                        continue
                    merged.write(("" if first else ", ") + records[1:-1])
                    first = False
                    count += records.count('"image_id"')  # one per result
        merged.write("]")
    path = os.path.join(out_dir, "results.json")
    os.replace(tmp, path)
    return path, image_ids, count


@torch.no_grad()
def evaluate(model, dataset, val_json: str, device: torch.device, out_dir: str, *,
             max_dets: int = 300, batch_size: int = 1, max_images: Optional[int] = None,
             progress: bool = True, num_workers: int = 0) -> Dict[str, float]:
    """Writes OUT/results.json and OUT/metrics.json (rank 0) and returns the metrics."""
    model.eval()
    indices = list(range(len(dataset)))[: max_images or None]
    mine = indices[dist_utils.rank()::dist_utils.world_size()]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, mine),
                                         batch_size=batch_size, collate_fn=collate_fn,
                                         num_workers=num_workers)
    path = shard_path(out_dir, dist_utils.rank())
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cat_ids = list(dataset.cat_ids)
    with _unpasted_masks(model) as paste, open(path, "w") as shard:
        for images, targets in tqdm(loader, desc="eval", dynamic_ncols=True,
                                    disable=not (progress and dist_utils.is_main())):
            outputs = model([image.to(device) for image in images])
            for image, target, out in zip(images, targets, outputs):
                order = torch.argsort(out["scores"], descending=True, stable=True)[:max_dets]
                boxes = out["boxes"][order]
                rles = paste_and_encode(out["masks"][order], boxes, tuple(image.shape[-2:]),
                                        paste)
                # Labels come out in torchvision's numbering (1..C), 0 being background.
                records = image_results(int(target["image_id"]), boxes, out["scores"][order],
                                        out["labels"][order] - 1, cat_ids, rles)
                shard.write(f"{int(target['image_id'])}\t{json.dumps(records)}\n")
    dist_utils.barrier()
    metrics: Dict[str, float] = {}
    if dist_utils.is_main():
        results_json, image_ids, _ = merge_shards(out_dir, dist_utils.world_size())
        shutil.rmtree(os.path.join(out_dir, SHARD_FOLDER), ignore_errors=True)
        limit = sorted(set(image_ids)) if max_images else None
        # From the file: read once per IoU type, so that rank 0 holds one copy at a time.
        metrics = evaluate_lvis(val_json, results_json, iou_types=("segm", "bbox"),
                                max_dets=max_dets, image_ids=limit)
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        print(format_metrics_table(metrics))
    # No barrier here: rank 0's LVIS evaluation (minutes at full scale) may outlast NCCL's
    # 10-minute collective timeout, and the other ranks have nothing left to wait for.
    return metrics
