"""torchvision's GeneralizedRCNNTransform with polygon targets and a choice of mask pasting.

- Training: `polygons` targets (gumbel_kernels.data, mask_format="polygon") are resized with
  the image, as mmdetection resizes its PolygonMasks, for the polygon mask targets.
- Inference, `mask_paste`:
  "torchvision": torchvision's legacy paste (the 28 x 28 mask padded by one pixel, the box
  rounded to integers, resized with interpolate);
  "grid_sample": mmdetection 2.x / detectron2's paste: every image pixel centre (x + 0.5,
  y + 0.5) inside the float box is sampled bilinearly from the mask with grid_sample
  (about +0.5 mask AP by mmdetection's notes).
  With `paste_masks = False` the masks stay the (K, 1, M, M) probabilities of the mask head
  (boxes still in the original image): the evaluator pastes, binarises and run-length encodes
  them in chunks on the device, never holding K full-resolution float masks at once.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes

from ..data.transforms import resize_polygon_entry

MASK_PASTES = ("torchvision", "grid_sample")


# A chunk's sampling grid stays under this many bytes on a GPU; a CPU pastes mask by mask,
# each on its own box only (mmdetection's GPU_MEM_LIMIT and skip_empty rule).
_GPU_CHUNK_BYTES = 1 << 30


def paste_masks_grid_sample(masks: Tensor, boxes: Tensor, image_size: Tuple[int, int]) -> Tensor:
    """(N, 1, M, M) mask probabilities -> (N, 1, H, W) in the image, by the float boxes (N, 4).

    Pixel (x, y) of the image samples the mask at ((x + 0.5 - x1) / (x2 - x1)) * 2 - 1 in
    grid_sample's [-1, 1] coordinates (align_corners=False, zero outside the mask)."""
    height, width = int(image_size[0]), int(image_size[1])
    n = masks.shape[0]
    out = masks.new_zeros((n, 1, height, width), dtype=torch.float32)
    if n == 0:
        return out
    if masks.device.type == "cpu":
        chunk = 1
    else:
        chunk = max(1, _GPU_CHUNK_BYTES // (height * width * 4 * 3))
    boxes = boxes.to(torch.float32)
    for start in range(0, n, chunk):
        _paste_chunk(masks[start:start + chunk], boxes[start:start + chunk],
                     out[start:start + chunk], height, width)
    return out


def paste_masks(masks: Tensor, boxes: Tensor, image_size: Tuple[int, int], kind: str) -> Tensor:
    """(N, 1, M, M) mask probabilities -> (N, 1, H, W) in the image by `kind` (MASK_PASTES)."""
    if kind == "grid_sample":
        return paste_masks_grid_sample(masks, boxes, image_size)
    if kind == "torchvision":
        return paste_masks_in_image(masks, boxes, (int(image_size[0]), int(image_size[1])))
    raise ValueError(f"model.mask_paste={kind!r} must be one of {', '.join(MASK_PASTES)}")


def _paste_chunk(masks: Tensor, boxes: Tensor, out: Tensor, height: int, width: int) -> None:
    # Only the rows and columns the chunk's boxes cover (one pixel of margin) are sampled.
    x_lo = int(max(torch.floor(boxes[:, 0].min()).item() - 1, 0))
    y_lo = int(max(torch.floor(boxes[:, 1].min()).item() - 1, 0))
    x_hi = int(min(torch.ceil(boxes[:, 2].max()).item() + 1, width))
    y_hi = int(min(torch.ceil(boxes[:, 3].max()).item() + 1, height))
    if x_hi <= x_lo or y_hi <= y_lo:
        return
    n = masks.shape[0]
    x1, y1, x2, y2 = boxes.unbind(dim=1)
    xs = torch.arange(x_lo, x_hi, device=masks.device, dtype=torch.float32) + 0.5
    ys = torch.arange(y_lo, y_hi, device=masks.device, dtype=torch.float32) + 0.5
    gx = (xs[None, :] - x1[:, None]) / (x2 - x1)[:, None] * 2 - 1
    gy = (ys[None, :] - y1[:, None]) / (y2 - y1)[:, None] * 2 - 1
    gx = torch.where(torch.isfinite(gx), gx, torch.zeros_like(gx))  # zero-width boxes
    gy = torch.where(torch.isfinite(gy), gy, torch.zeros_like(gy))
    grid = torch.stack([gx[:, None, :].expand(n, ys.numel(), xs.numel()),
                        gy[:, :, None].expand(n, ys.numel(), xs.numel())], dim=3)
    out[:, :, y_lo:y_hi, x_lo:x_hi] = F.grid_sample(masks.to(torch.float32), grid,
                                                    align_corners=False)


class GOLTransform(GeneralizedRCNNTransform):
    """GeneralizedRCNNTransform + polygon targets + `mask_paste` + `paste_masks` (see the
    module docstring)."""

    def __init__(self, *args, mask_paste: str = "torchvision", **kwargs):
        super().__init__(*args, **kwargs)
        if mask_paste not in MASK_PASTES:
            raise ValueError(f"model.mask_paste={mask_paste!r} must be one of "
                             f"{', '.join(MASK_PASTES)}")
        self.mask_paste = mask_paste
        self.paste_masks = True

    def resize(self, image: Tensor, target: Optional[Dict[str, Tensor]] = None):
        old_size = tuple(image.shape[-2:])
        image, target = super().resize(image, target)
        if target is not None and "polygons" in target:
            new_size = tuple(image.shape[-2:])
            target["polygons"] = [resize_polygon_entry(entry, old_size, new_size)
                                  for entry in target["polygons"]]
        return image, target

    def postprocess(self, result: List[Dict[str, Tensor]], image_shapes: List[Tuple[int, int]],
                    original_image_sizes: List[Tuple[int, int]]) -> List[Dict[str, Tensor]]:
        if self.training:
            return result
        for pred, image_shape, original_size in zip(result, image_shapes, original_image_sizes):
            pred["boxes"] = resize_boxes(pred["boxes"], image_shape, original_size)
            if "masks" in pred and self.paste_masks:
                pred["masks"] = paste_masks(pred["masks"], pred["boxes"], original_size,
                                            self.mask_paste)
        return result
