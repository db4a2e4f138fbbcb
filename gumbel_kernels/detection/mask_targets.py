"""Mask-head training targets (M x M per positive RoI) and loss, three ways.

- "roi_align": torchvision's: RoIAlign (aligned=False) of the full-image 0/1 bitmap, soft.
- "bitmap": mmdetection 2.x with bitmap masks (BitmapMasks.crop_and_resize): RoIAlign with
  aligned=True and adaptive sampling, binarised at >= 0.5 (the official Table 1 configs).
- "polygon": mmdetection 2.x with polygon masks (`poly2mask=False`, the official GOL
  configs, PolygonMasks.crop_and_resize): each polygon is shifted into the RoI, scaled by
  M / max(width, 1) and M / max(height, 1), and rasterised at M x M (pycocotools); needs the
  `polygons` targets of mask_format="polygon" (an RLE instance there is a bitmap and takes the
  "bitmap" rule).
The bitmap kinds take the full-image `masks` of torchvision's transform or, without them, the
`mask_crops` of mask_format="cropped" (gumbel_kernels.data.masks): the matched instances'
bitmaps are then rebuilt at the model's size, exactly as the transform's nearest resize would
have made them, a chunk of instances at a time (_CHUNK_PIXELS), so the targets are the same
and an image with hundreds of instances never holds them all at full resolution.
The loss is the same for all: mean binary cross-entropy with logits of the RoI's class channel.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torch import Tensor
from torchvision.ops import roi_align

from ..data.masks import CroppedMasks

MASK_TARGETS = ("roi_align", "bitmap", "polygon")


def check_mask_target(kind: str) -> str:
    if kind not in MASK_TARGETS:
        raise ValueError(f"model.mask_target={kind!r} must be one of {', '.join(MASK_TARGETS)}")
    return kind


def _bitmap_targets(bitmaps: Tensor, boxes: Tensor, matched: Tensor, size: int,
                    aligned: bool) -> Tensor:
    """RoIAlign of bitmaps[matched[k]] in boxes[k]; binarised when aligned (mmdetection)."""
    rois = torch.cat([matched[:, None].to(boxes.dtype), boxes], dim=1)
    pooled = roi_align(bitmaps[:, None].to(boxes.dtype), rois, (size, size), 1.0,
                       sampling_ratio=0 if aligned else -1, aligned=aligned)[:, 0]
    return (pooled >= 0.5).to(pooled.dtype) if aligned else pooled


# Full-resolution pixels of rebuilt bitmaps alive at once (uint8, then float for RoIAlign).
_CHUNK_PIXELS = 8 << 20


def _cropped_targets(crops: CroppedMasks, boxes: Tensor, matched: Tensor, size: int,
                     aligned: bool, image_shape: Tuple[int, int]) -> Tensor:
    """_bitmap_targets of the bitmaps `crops` stands for, resized to image_shape."""
    out = boxes.new_zeros((boxes.shape[0], size, size))
    instances = torch.unique(matched)  # sorted
    per_chunk = max(1, _CHUNK_PIXELS // max(1, int(image_shape[0]) * int(image_shape[1])))
    for start in range(0, instances.numel(), per_chunk):
        chunk = instances[start:start + per_chunk]
        bitmaps = crops.bitmaps(chunk.tolist(), image_shape)
        rows = torch.isin(matched, chunk)
        out[rows] = _bitmap_targets(bitmaps, boxes[rows], torch.searchsorted(chunk, matched[rows]),
                                    size, aligned)
    return out


def rasterize_polygons_in_box(polygons, box, size: int) -> np.ndarray:
    """The (size, size) uint8 mask of one instance's polygons cropped to `box` (x1, y1, x2, y2)
    and scaled to the grid, as mmdetection's PolygonMasks.crop_and_resize + to_ndarray."""
    x1, y1, x2, y2 = (float(v) for v in box)
    scale_x = size / max(x2 - x1, 1.0)
    scale_y = size / max(y2 - y1, 1.0)
    moved = []
    for poly in polygons:
        poly = np.array(poly, dtype=np.float64)
        poly[0::2] = (poly[0::2] - x1) * scale_x
        poly[1::2] = (poly[1::2] - y1) * scale_y
        moved.append(poly)
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(moved, size, size)))


def _polygon_targets(entries: list, boxes: Tensor, matched: Tensor, size: int) -> Tensor:
    # The polygons are rasterised into one host buffer that goes to the device in one copy, and
    # the RoIs of RLE instances take one batched RoIAlign, not a copy and a call per RoI.
    boxes_cpu, matched_cpu = boxes.detach().cpu(), matched.cpu().tolist()
    host = np.zeros((len(matched_cpu), size, size), dtype=np.uint8)
    rle_rows, rle_slot = [], {}  # RoIs of RLE instances; instance -> its place in the stack
    for k, gt in enumerate(matched_cpu):
        entry = entries[gt]
        if isinstance(entry, Tensor):  # an RLE instance: the bitmap rule
            rle_rows.append(k)
            rle_slot.setdefault(gt, len(rle_slot))
        else:
            host[k] = rasterize_polygons_in_box(entry, boxes_cpu[k], size)
    out = torch.from_numpy(host).to(device=boxes.device, dtype=boxes.dtype)
    if rle_rows:
        rows = torch.tensor(rle_rows, device=boxes.device)
        bitmaps = torch.stack([entries[gt] for gt in rle_slot]).to(boxes.device)
        slots = torch.tensor([rle_slot[matched_cpu[k]] for k in rle_rows], device=boxes.device)
        out[rows] = _bitmap_targets(bitmaps, boxes[rows], slots, size, aligned=True)
    return out


def mask_targets(kind: str, proposals: List[Tensor], matched_idxs: List[Tensor],
                 targets: List[Dict[str, Tensor]], image_shapes: List[Tuple[int, int]],
                 size: int) -> Tensor:
    """(P, size, size) float targets of the positive proposals of every image, in order.

    Args:
        proposals: per image, the positive RoIs (x1, y1, x2, y2) in the model's resized frame.
        matched_idxs: per image, the index of each RoI's ground-truth instance.
        targets: per image, with `masks` (K, H, W) or `mask_crops` ("roi_align", "bitmap"), or
            `polygons` ("polygon").
        image_shapes: per image, (height, width) after resizing.
    """
    out = []
    for boxes, matched, target, (height, width) in zip(proposals, matched_idxs, targets,
                                                       image_shapes):
        if boxes.shape[0] == 0:
            out.append(boxes.new_zeros((0, size, size)))
            continue
        if kind == "polygon":
            if "polygons" not in target:
                raise ValueError("model.mask_target='polygon' needs `polygons` targets "
                                 "(LVISDataset(mask_format='polygon'))")
            limit = boxes.new_tensor([width, height, width, height])
            clipped = torch.minimum(boxes.clamp(min=0), limit)  # mmdetection clips to the image
            out.append(_polygon_targets(target["polygons"], clipped, matched, size))
        elif "masks" in target:
            out.append(_bitmap_targets(target["masks"], boxes, matched, size,
                                       aligned=kind == "bitmap"))
        else:
            out.append(_cropped_targets(target["mask_crops"], boxes, matched, size,
                                        kind == "bitmap", (height, width)))
    return torch.cat(out, dim=0)


def mask_loss(mask_logits: Tensor, targets: Tensor, labels: Tensor) -> Tensor:
    """Mean BCE-with-logits of each positive RoI's own class channel (torchvision's rule)."""
    if targets.numel() == 0:
        return mask_logits.sum() * 0
    chosen = mask_logits[torch.arange(labels.shape[0], device=labels.device), labels]
    return F.binary_cross_entropy_with_logits(chosen, targets.to(chosen.dtype))
