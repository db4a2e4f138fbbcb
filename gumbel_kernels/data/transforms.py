"""Training / test transforms on (image, target) pairs, and the image sizes of a run.

Where resizing happens (the one decision to know): **in the model, not here.** torchvision's
`GeneralizedRCNNTransform` resizes every image anyway, and it maps the predictions back to the
size of the image it was given; resizing here as well would resize twice and leave predictions
in the resized frame. So:

- the dataset transforms only flip (training) -- `build_transforms(train=True)`;
  test images pass unchanged -- `build_transforms(train=False)`;
- the sizes live in `ResizeConfig`, and the model builder passes `ResizeConfig.model_kwargs()`
  (`min_size=<tuple of shorter sides>, max_size=...`) to torchvision's Mask R-CNN. In training
  torchvision picks a random shorter side from that tuple per image (GOL / detectron2's
  multi-scale training, range(640, 801, 32) with the longer side <= 1333); in eval it uses the
  tuple's *last* entry, so `ResizeConfig` requires `train_min_sizes[-1] == test_min_size`.

`ResizeShorterSide` is here too for pipelines that must resize before the model (e.g. to cut
data-loader memory); predictions are then in the resized frame and must be scaled back to
`target["orig_size"]` before evaluation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "ResizeConfig", "Compose", "RandomHorizontalFlip", "ResizeShorterSide", "build_transforms",
    "flip_polygon_entry", "resize_polygon_entry",
]


@dataclass(frozen=True)
class ResizeConfig:
    """Shorter-side sizes for training (one picked at random per image) and test, and the cap
    on the longer side. Defaults: the LVIS / GOL schedule."""

    train_min_sizes: tuple = tuple(range(640, 801, 32))
    test_min_size: int = 800
    max_size: int = 1333

    def __post_init__(self):
        sizes = tuple(int(s) for s in self.train_min_sizes)
        if not sizes or any(s <= 0 for s in sizes):
            raise ValueError(f"train_min_sizes={self.train_min_sizes!r} must be positive sizes")
        if sizes[-1] != self.test_min_size:
            raise ValueError(
                f"train_min_sizes[-1]={sizes[-1]} must equal test_min_size={self.test_min_size}: "
                "torchvision's GeneralizedRCNNTransform evaluates at min_size[-1]")
        if self.max_size < max(sizes):
            raise ValueError(f"max_size={self.max_size} is smaller than the shorter sides {sizes}")
        object.__setattr__(self, "train_min_sizes", sizes)

    @classmethod
    def lvis(cls) -> "ResizeConfig":
        return cls()

    @classmethod
    def cpu_demo(cls) -> "ResizeConfig":
        """Small images for the CPU demo on the synthetic 256 px data set."""
        return cls(train_min_sizes=(256, 288, 320), test_min_size=320, max_size=512)

    def model_kwargs(self) -> dict:
        """Keyword arguments for torchvision's MaskRCNN / GeneralizedRCNNTransform."""
        return {"min_size": self.train_min_sizes, "max_size": self.max_size}


class Compose:
    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, image, target):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self):
        return f"Compose({self.transforms!r})"


class RandomHorizontalFlip:
    """Flips image, boxes (x -> W - x) and masks together with probability p.

    Draws from torch's default generator (so `torch.manual_seed` reproduces a run; data-loader
    workers are seeded by PyTorch) unless a `torch.Generator` is given.
    """

    def __init__(self, p: float = 0.5, generator: Optional[torch.Generator] = None):
        self.p = p
        self.generator = generator

    def __call__(self, image: torch.Tensor, target: Optional[dict]):
        if torch.rand((), generator=self.generator).item() >= self.p:
            return image, target
        image = image.flip(-1)
        if target is not None:
            target = dict(target)
            width = image.shape[-1]
            if "boxes" in target:
                boxes = target["boxes"].clone()
                boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
                target["boxes"] = boxes
            if "masks" in target:
                target["masks"] = target["masks"].flip(-1)
            if "mask_crops" in target:
                target["mask_crops"] = target["mask_crops"].flip()
            if "polygons" in target:
                target["polygons"] = [flip_polygon_entry(entry, width)
                                      for entry in target["polygons"]]
        return image, target

    def __repr__(self):
        return f"RandomHorizontalFlip(p={self.p})"


def resize_polygon_entry(entry, old_size, new_size):
    """One instance of a `polygons` target in an image resized from old_size (h, w) to new_size:
    coordinates scaled per axis (mmdetection's PolygonMasks.resize), a bitmap resized nearest
    (its BitmapMasks.rescale)."""
    (old_h, old_w), (new_h, new_w) = old_size, new_size
    if isinstance(entry, torch.Tensor):
        return F.interpolate(entry[None, None].float(), size=(int(new_h), int(new_w)),
                             mode="nearest")[0, 0].to(entry.dtype)
    scale_x, scale_y = float(new_w) / float(old_w), float(new_h) / float(old_h)
    resized = []
    for poly in entry:
        poly = poly.copy()
        poly[0::2] *= scale_x
        poly[1::2] *= scale_y
        resized.append(poly)
    return resized


def flip_polygon_entry(entry, width: int):
    """One instance of a `polygons` target mirrored left-right in an image `width` pixels wide:
    x -> width - x for polygons (mmdetection's PolygonMasks.flip), a flipped bitmap otherwise."""
    if isinstance(entry, torch.Tensor):
        return entry.flip(-1)
    flipped = []
    for poly in entry:
        poly = poly.copy()
        poly[0::2] = width - poly[0::2]
        flipped.append(poly)
    return flipped


class ResizeShorterSide:
    """Resizes so the shorter side is a random choice of `min_sizes` (the longer one at most
    `max_size`); scales boxes and masks (nearest) to match. Not used by `build_transforms`."""

    def __init__(self, min_sizes, max_size: int, generator: Optional[torch.Generator] = None):
        self.min_sizes = (min_sizes,) if isinstance(min_sizes, int) else tuple(min_sizes)
        self.max_size = max_size
        self.generator = generator

    def __call__(self, image: torch.Tensor, target: Optional[dict]):
        h, w = image.shape[-2:]
        pick = torch.randint(len(self.min_sizes), (), generator=self.generator).item()
        size = self.min_sizes[pick]
        scale = min(size / min(h, w), self.max_size / max(h, w))
        new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
        image = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear",
                              align_corners=False)[0]
        if target is not None:
            target = dict(target)
            if "mask_crops" in target:
                raise ValueError("ResizeShorterSide: `mask_crops` targets are resized by the "
                                 "mask targets, not here (use mask_format='bitmap')")
            if "boxes" in target:
                factors = torch.tensor([new_w / w, new_h / h, new_w / w, new_h / h])
                target["boxes"] = target["boxes"] * factors
            if "masks" in target and target["masks"].numel() > 0:
                masks = target["masks"][:, None].float()
                target["masks"] = F.interpolate(masks, size=(new_h, new_w),
                                                mode="nearest")[:, 0].to(target["masks"].dtype)
            elif "masks" in target:
                target["masks"] = target["masks"].new_zeros((0, new_h, new_w))
            if "polygons" in target:
                target["polygons"] = [resize_polygon_entry(entry, (h, w), (new_h, new_w))
                                      for entry in target["polygons"]]
        return image, target

    def __repr__(self):
        return f"ResizeShorterSide(min_sizes={self.min_sizes}, max_size={self.max_size})"


def build_transforms(train: bool, flip_prob: float = 0.5) -> Optional[Compose]:
    """Dataset transforms: random horizontal flip for training, none for test (the model's
    transform resizes; pass `ResizeConfig.model_kwargs()` to the model builder)."""
    if train and flip_prob > 0:
        return Compose([RandomHorizontalFlip(flip_prob)])
    return None
