"""Instance masks kept inside their own boxes: the training targets of mask_format="cropped".

A full-resolution bitmap per instance costs K x H x W bytes in the data-loader worker and, once
torchvision's transform resizes it as float, 4 x K x H' x W' bytes on the GPU: an LVIS image
with 300 instances resized to 800 x 1067 is about 1 GB. Most LVIS instances are small, so
each mask here is stored only inside its own bounding box (all crops in one flat uint8 buffer,
one host-to-device copy), flipped with the image, and never resized: the mask targets
(gumbel_kernels.detection.mask_targets) rebuild, for the few instances that positive RoIs
match, exactly the bitmap torchvision's nearest resize would have produced, a chunk of
instances at a time.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CroppedMasks", "nearest_source_indices"]


def nearest_source_indices(size: int, new_size: int, device=None) -> Tensor:
    """For each of `new_size` output pixels, the input pixel that torch's nearest interpolation
    (torchvision's mask resize) reads: found by resizing an index ramp, so it is the same
    float rule bit for bit."""
    ramp = torch.arange(size, dtype=torch.float32, device=device).view(1, 1, size)
    return F.interpolate(ramp, size=int(new_size), mode="nearest").view(-1).to(torch.int64)


class CroppedMasks:
    """K binary masks of an image of `image_size` (H, W), each stored in its box.

    Attributes:
        boxes: (K, 4) int64 crop boxes [x0, y0, x1, y1) in pixels (x1 - x0 = crop width; an
            empty mask has an empty box).
        data: uint8, every crop's pixels, row-major, one after the other.
        image_size: (H, W).
    """

    def __init__(self, boxes: Tensor, data: Tensor, image_size: Sequence[int]):
        self.boxes = boxes.to(torch.int64).reshape(-1, 4)
        self.data = data.to(torch.uint8).reshape(-1)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        areas = (self.boxes[:, 2] - self.boxes[:, 0]) * (self.boxes[:, 3] - self.boxes[:, 1])
        self.offsets = torch.cat([areas.new_zeros(1), torch.cumsum(areas, 0)]).tolist()
        if self.offsets[-1] != self.data.numel():
            raise ValueError(f"CroppedMasks: the boxes cover {self.offsets[-1]} pixels, the data "
                             f"holds {self.data.numel()}")

    # ------------------------------------------------------------------------- building --
    @classmethod
    def from_bitmaps(cls, bitmaps: Iterable[np.ndarray],
                     image_size: Sequence[int]) -> "CroppedMasks":
        """From (H, W) 0/1 arrays, one instance at a time (never K x H x W at once)."""
        boxes, crops = [], []
        for bitmap in bitmaps:
            rows = np.flatnonzero(bitmap.any(axis=1))
            if rows.size == 0:
                boxes.append((0, 0, 0, 0))
                continue
            cols = np.flatnonzero(bitmap.any(axis=0))
            y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
            boxes.append((x0, y0, x1, y1))
            crops.append(np.ascontiguousarray(bitmap[y0:y1, x0:x1], dtype=np.uint8).ravel())
        data = np.concatenate(crops) if crops else np.zeros(0, np.uint8)
        return cls(torch.tensor(boxes, dtype=torch.int64).reshape(-1, 4),
                   torch.from_numpy(data), image_size)

    def __len__(self) -> int:
        return self.boxes.shape[0]

    def crop(self, k: int) -> Tensor:
        return self._crop(k, self.boxes[k].tolist())

    def _crop(self, k: int, box: Sequence[int]) -> Tensor:
        """Crop k given its box already on the host (reading boxes[k] would sync the device)."""
        x0, y0, x1, y1 = box
        return self.data[self.offsets[k]:self.offsets[k + 1]].view(y1 - y0, x1 - x0)

    def to(self, device) -> "CroppedMasks":
        return CroppedMasks(self.boxes.to(device), self.data.to(device, non_blocking=True),
                            self.image_size)

    def flip(self) -> "CroppedMasks":
        """Mirrored left-right, as the image."""
        width = self.image_size[1]
        boxes = self.boxes.clone()
        boxes[:, 0], boxes[:, 2] = width - self.boxes[:, 2], width - self.boxes[:, 0]
        data = torch.cat([self.crop(k).flip(-1).reshape(-1) for k in range(len(self))]) \
            if len(self) else self.data
        return CroppedMasks(boxes, data, self.image_size)

    # ----------------------------------------------------------------------- read back --
    def bitmaps(self, indices: Sequence[int], size: Optional[Tuple[int, int]] = None) -> Tensor:
        """(len(indices), h, w) uint8 full-image bitmaps of those instances, at the image's
        size or nearest-resized to `size` = (h, w) exactly as torchvision's transform resizes
        masks."""
        height, width = self.image_size
        h, w = (height, width) if size is None else (int(size[0]), int(size[1]))
        device = self.data.device
        rows = nearest_source_indices(height, h, device)
        cols = nearest_source_indices(width, w, device)
        out = torch.zeros((len(indices), h, w), dtype=torch.uint8, device=device)
        # This runs every training step for every matched instance: the boxes and the sample
        # indices come to the host once, so the per-instance bounds below cost no device sync.
        indices = list(indices)
        picked = self.boxes[indices].cpu().tolist()
        rows_host, cols_host = rows.cpu().numpy(), cols.cpu().numpy()
        for slot, (k, box) in enumerate(zip(indices, picked)):
            x0, y0, x1, y1 = box
            if x1 <= x0 or y1 <= y0:
                continue
            # the output rows / columns whose source pixel lies in the crop (a contiguous run;
            # numpy's side="left" is torch.searchsorted's default right=False)
            r0, r1 = np.searchsorted(rows_host, [y0, y1]).tolist()
            c0, c1 = np.searchsorted(cols_host, [x0, x1]).tolist()
            if r1 > r0 and c1 > c0:
                crop = self._crop(k, box)
                out[slot, r0:r1, c0:c1] = crop[rows[r0:r1] - y0][:, cols[c0:c1] - x0]
        return out

    def nbytes(self) -> int:
        return self.data.numel() + self.boxes.numel() * 8

    def __repr__(self) -> str:
        return (f"CroppedMasks({len(self)} masks, image {self.image_size[0]}x{self.image_size[1]}"
                f", {self.data.numel()} pixels stored)")
