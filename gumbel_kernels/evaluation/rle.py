"""Binary instance masks -> COCO run-length encoding (compressed RLE, counts as str), computed on
the device the masks are on.

A full-resolution mask costs H x W bytes even as a bool, and 300 detections of an LVIS image
(800 x 1333 in the model, ~640 x 480 as evaluated) make hundreds of MB per image; their runs
take a few hundred bytes each. On a GPU the run boundaries are found there (one comparison of
neighbouring pixels in COCO's column-major order and a nonzero), so only the run starts cross
to the host, where pycocotools turns the run lengths into its compressed string. On the CPU
pycocotools encodes the bitmaps directly (its C loop is the fastest there). Both give exactly
pycocotools.mask.encode's result.
"""
from __future__ import annotations

from typing import List

import numpy as np
import torch
from torch import Tensor

__all__ = ["encode_binary_masks", "run_lengths"]


def run_lengths(binary: Tensor) -> List[np.ndarray]:
    """(K, H, W) bool -> K arrays of COCO run lengths (column-major, the first run counts zeros,
    so a mask starting with a 1 starts with a 0 run), computed with torch ops on binary's
    device; only the run boundaries are copied to the host."""
    if binary.dim() != 3:
        raise ValueError(f"binary masks must be (K, H, W), got {tuple(binary.shape)}")
    k, h, w = binary.shape
    if k == 0:
        return []
    n = h * w
    flat = binary.to(torch.bool).transpose(1, 2).reshape(k, n)  # COCO's column-major order
    boundaries = torch.nonzero(flat[:, 1:] != flat[:, :-1])  # (M, 2): mask, pixel before a change
    per_mask = torch.bincount(boundaries[:, 0], minlength=k).cpu().numpy()
    starts = (boundaries[:, 1] + 1).cpu().numpy()
    first = flat[:, 0].cpu().numpy()
    out = []
    offset = 0
    for index in range(k):
        mine = starts[offset:offset + per_mask[index]]
        offset += per_mask[index]
        edges = np.concatenate(([0], mine, [n]))
        counts = np.diff(edges)
        if first[index]:
            counts = np.concatenate(([0], counts))
        out.append(counts)
    return out


def encode_binary_masks(binary: Tensor, method: str = "auto") -> List[dict]:
    """(K, H, W) bool/uint8 masks on any device -> K compressed RLEs {"size": [H, W],
    "counts": str}, equal to pycocotools.mask.encode's (module docstring). `method`: "auto"
    (pycocotools on a CPU, "runs" elsewhere), "runs" (run_lengths on the masks' device) or
    "pycocotools" (the bitmaps copied to the host)."""
    from pycocotools import mask as mask_utils

    if method not in ("auto", "runs", "pycocotools"):
        raise ValueError(f"method={method!r} must be 'auto', 'runs' or 'pycocotools'")
    if binary.dim() != 3:
        raise ValueError(f"binary masks must be (K, H, W), got {tuple(binary.shape)}")
    k, h, w = binary.shape
    if k == 0:
        return []
    if method == "pycocotools" or (method == "auto" and binary.device.type == "cpu"):
        rles = mask_utils.encode(np.asfortranarray(
            binary.to(torch.uint8).cpu().numpy().transpose(1, 2, 0)))
    else:
        rles = mask_utils.frPyObjects([{"size": [h, w], "counts": counts.tolist()}
                                       for counts in run_lengths(binary)], h, w)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles
