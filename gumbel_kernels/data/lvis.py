"""LVIS (v1 and v0.5) annotation files as a torch Dataset for torchvision's Mask R-CNN.

The json is validated once, up front, so that a broken file fails at start-up with a message
naming the file and the offending field ("ann.json: annotations[3].category_id=999 is not a
category id") instead of deep inside a data-loader worker.

Conventions (what the rest of the harness relies on):
- Categories are sorted by LVIS id and mapped to contiguous indices 0..C-1 (`cat_ids[k]` is the
  LVIS id of class k). Targets carry contiguous labels; background is *not* a label here.
- Image file: `image_root` is the COCO root (the folder holding train2017/ and val2017/).
  The path follows `coco_url`'s folder: ".../train2017/000000391895.jpg" is
  `image_root/train2017/000000391895.jpg` -- LVIS v1 val takes most of its images from COCO
  *train2017*, so a split is not a folder. Then `image_root/<name>` (a flat folder), then
  `file_name` (v0.5 and COCO-style files) the same two ways; a COCO-2014 style
  "COCO_val2014_<12 digits>.jpg" is also tried under its 2017 name in image_root, train2017/
  and val2017/ (detectron2's rule). `check_image_files()` resolves every item's path once, at
  start-up, and fails naming the json, the image id and every path it tried.
- `num_images` is the number of images in the file; `num_images_with_annotations` the number
  with at least one annotation: the denominator of the category frequencies of GOL's official
  DropLoss/EQL (f_c = image_count_c / 99,388 on LVIS v1 train, giving 815 rare classes at
  lambda 0.0011) and of mmdetection's repeat-factor sampling (which counts the images left
  after `filter_empty`). `len(dataset)` is the number of items, smaller only with
  `filter_empty=True`.
- Masks: `mask_format="bitmap"` gives `masks` uint8 (K, H, W); `"cropped"` gives
  `mask_crops`, the same bitmaps each kept only inside its own box (a
  gumbel_kernels.data.masks.CroppedMasks: what training uses, as a few hundred full-image
  bitmaps would cost gigabytes once resized); `"polygon"` gives `polygons`,
  one entry per instance: its polygons as float64 numpy arrays [x0, y0, x1, y1, ...] in image
  pixels (the box itself when the annotation has no segmentation), or, for an RLE
  annotation, its decoded uint8 (H, W) tensor -- mmdetection's PolygonMasks, which the
  polygon mask targets of `gumbel_kernels.detection` rasterise per RoI.
- Boxes are clipped to the image; annotations whose box then has no area, and crowd
  annotations (`iscrowd=1`, COCO-style files only; LVIS has none), are left out of the target.
"""
from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from typing import Any, Callable, Optional

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from .masks import CroppedMasks
from .validation import rle_problem

__all__ = ["LVISDataset", "MASK_FORMATS", "collate_fn", "frequency_from_image_count"]

MASK_FORMATS = ("bitmap", "polygon", "cropped")


def frequency_from_image_count(image_count: int) -> str:
    """LVIS frequency group of a category from its number of training images.

    rare: at most 10 images, common: 11 to 100, frequent: more than 100.
    """
    if image_count <= 10:
        return "r"
    if image_count <= 100:
        return "c"
    return "f"


def collate_fn(batch):
    """Batch of (image, target) pairs -> (images tuple, targets tuple), as torchvision's detection
    models take lists of variable-size images."""
    return tuple(zip(*batch))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class _Validator:
    """Checks the parts of an LVIS json this dataset reads; every error names file and field."""

    def __init__(self, name: str):
        self.name = name

    def fail(self, field: str, problem: str):
        sep = "" if problem.startswith("=") else " "
        raise ValueError(f"{self.name}: {field}{sep}{problem}")

    def top_level(self, data: Any):
        if not isinstance(data, dict):
            self.fail("top level", f"must be a json object, got {type(data).__name__}")
        for key in ("images", "annotations", "categories"):
            if key not in data:
                self.fail(f"'{key}'", "is missing (an LVIS file needs images, annotations and categories)")
            if not isinstance(data[key], list):
                self.fail(f"'{key}'", f"must be a list, got {type(data[key]).__name__}")

    def record(self, field: str, rec: Any, required: tuple):
        if not isinstance(rec, dict):
            self.fail(field, f"must be an object, got {type(rec).__name__}")
        for key in required:
            if key not in rec:
                self.fail(f"{field}.{key}", "is missing")

    def int_field(self, field: str, value: Any, minimum: Optional[int] = None):
        if not _is_int(value):
            self.fail(field, f"={value!r} must be an integer")
        if minimum is not None and value < minimum:
            self.fail(field, f"={value!r} must be >= {minimum}")

    def categories(self, cats: list) -> dict:
        seen = {}
        for i, cat in enumerate(cats):
            field = f"categories[{i}]"
            self.record(field, cat, ("id",))
            self.int_field(f"{field}.id", cat["id"])
            if cat["id"] in seen:
                self.fail(f"{field}.id", f"={cat['id']} repeats categories[{seen[cat['id']]}].id")
            seen[cat["id"]] = i
            if "image_count" in cat:
                self.int_field(f"{field}.image_count", cat["image_count"], minimum=0)
            if "frequency" in cat and cat["frequency"] not in ("r", "c", "f"):
                self.fail(f"{field}.frequency", f"={cat['frequency']!r} must be one of 'r', 'c', 'f'")
        return seen

    def images(self, imgs: list, cat_ids: dict) -> dict:
        seen = {}
        for i, img in enumerate(imgs):
            field = f"images[{i}]"
            self.record(field, img, ("id", "height", "width"))
            self.int_field(f"{field}.id", img["id"])
            if img["id"] in seen:
                self.fail(f"{field}.id", f"={img['id']} repeats images[{seen[img['id']]}].id")
            seen[img["id"]] = i
            self.int_field(f"{field}.height", img["height"], minimum=1)
            self.int_field(f"{field}.width", img["width"], minimum=1)
            location = img.get("coco_url", img.get("file_name"))
            if not isinstance(location, str) or not location.strip("/"):
                self.fail(field, "needs a 'coco_url' (LVIS v1) or 'file_name' (v0.5) string")
            for key in ("neg_category_ids", "not_exhaustive_category_ids"):
                ids = img.get(key, [])
                if not isinstance(ids, list):
                    self.fail(f"{field}.{key}", f"must be a list, got {type(ids).__name__}")
                for cid in ids:
                    if cid not in cat_ids:
                        self.fail(f"{field}.{key}", f"contains {cid!r}, which is not a category id")
        return seen

    def annotation(self, i: int, ann: Any, img_ids: dict, cat_ids: dict, images: list):
        field = f"annotations[{i}]"
        self.record(field, ann, ("image_id", "category_id", "bbox"))
        if not _is_int(ann["image_id"]) or ann["image_id"] not in img_ids:
            self.fail(f"{field}.image_id", f"={ann['image_id']!r} is not an image id")
        if not _is_int(ann["category_id"]) or ann["category_id"] not in cat_ids:
            self.fail(f"{field}.category_id", f"={ann['category_id']!r} is not a category id")
        bbox = ann["bbox"]
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            self.fail(f"{field}.bbox", f"={bbox!r} must be a list of 4 finite numbers [x, y, w, h]")
        if bbox[2] < 0 or bbox[3] < 0:
            self.fail(f"{field}.bbox", f"={bbox!r} has a negative width or height")
        if "segmentation" in ann:
            seg = ann["segmentation"]
            self.segmentation(f"{field}.segmentation", seg)
            img = images[img_ids[ann["image_id"]]]
            if isinstance(seg, dict) and seg["size"] != [img["height"], img["width"]]:
                self.fail(f"{field}.segmentation.size", f"={seg['size']!r} differs from image "
                          f"{img['id']}'s [height, width] = [{img['height']}, {img['width']}]")
            if isinstance(seg, dict):
                problem = rle_problem(seg)
                if problem:
                    self.fail(f"{field}.segmentation.counts", problem)

    def segmentation(self, field: str, seg: Any):
        if isinstance(seg, list):
            if not seg:
                self.fail(field, "is an empty polygon list")
            for j, poly in enumerate(seg):
                if (not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2
                        or not all(_is_number(v) for v in poly)):
                    self.fail(f"{field}[{j}]", "must be a polygon: an even-length list of >= 6 numbers")
        elif isinstance(seg, dict):
            if "counts" not in seg or "size" not in seg:
                self.fail(field, "is an RLE object without 'counts' and 'size'")
            size = seg["size"]
            if not isinstance(size, list) or len(size) != 2 or not all(_is_int(v) for v in size):
                self.fail(f"{field}.size", f"={size!r} must be [height, width]")
            if not isinstance(seg["counts"], (str, list)):
                self.fail(f"{field}.counts", "must be a string (compressed RLE) or a list of ints")
        else:
            self.fail(field, f"must be polygons (list) or RLE (object), got {type(seg).__name__}")


class LVISDataset(torch.utils.data.Dataset):
    """Images and instance targets of an LVIS-format json.

    Args:
        ann_file: path of the LVIS json (v1 or v0.5).
        image_root: folder holding the images (see the module docstring for the lookup).
        transforms: callable (image, target) -> (image, target), e.g. from
            `gumbel_kernels.data.transforms.build_transforms`.
        filter_empty: leave out images with no usable annotation (for training; mmdetection's
            filter_empty_gt).
        with_masks: build mask targets (False skips them, e.g. for evaluation).
        mask_format: "bitmap" (`masks`), "cropped" (`mask_crops`) or "polygon" (`polygons`),
            see the module docstring.

    Item i is `(image, target)`: image float32 (3, H, W) in [0, 1]; target has `boxes` float32
    (K, 4) xyxy in pixels, `labels` int64 contiguous class indices, `masks` uint8 (K, H, W),
    `mask_crops` or `polygons`, `image_id` int (LVIS id), `orig_size` int64 tensor (H, W).
    """

    def __init__(self, ann_file, image_root, transforms: Optional[Callable] = None, *,
                 filter_empty: bool = False, with_masks: bool = True,
                 mask_format: str = "bitmap"):
        if mask_format not in MASK_FORMATS:
            raise ValueError(f"mask_format={mask_format!r} must be one of {MASK_FORMATS}")
        self.ann_file = os.fspath(ann_file)
        self.image_root = os.fspath(image_root)
        self.transforms = transforms
        self.with_masks = with_masks
        self.mask_format = mask_format
        self._paths: Optional[list] = None
        name = self.ann_file
        try:
            with open(self.ann_file) as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name}: not valid json ({e})") from e

        check = _Validator(name)
        check.top_level(data)
        cat_index = check.categories(data["categories"])
        img_index = check.images(data["images"], cat_index)

        self.categories = sorted(data["categories"], key=lambda c: c["id"])
        self.cat_ids = [c["id"] for c in self.categories]
        self.num_classes = len(self.cat_ids)
        self._contiguous = {cid: k for k, cid in enumerate(self.cat_ids)}

        # Per image: list of (contiguous label, xywh box, segmentation or None), validated.
        per_image = defaultdict(list)
        images_with_class = [set() for _ in range(self.num_classes)]
        annotated = set()
        for i, ann in enumerate(data["annotations"]):
            check.annotation(i, ann, img_index, cat_index, data["images"])
            annotated.add(ann["image_id"])
            if ann.get("iscrowd", 0):
                continue
            label = self._contiguous[ann["category_id"]]
            per_image[ann["image_id"]].append((label, ann["bbox"], ann.get("segmentation")))
            images_with_class[label].add(ann["image_id"])

        self.images = sorted(data["images"], key=lambda im: im["id"])
        self.num_images = len(self.images)
        self.num_images_with_annotations = len(annotated)
        counted = [len(s) for s in images_with_class]
        if self.categories and all("image_count" in c for c in self.categories):
            counts = [c["image_count"] for c in self.categories]
        else:
            counts = counted
        self.image_counts = torch.tensor(counts, dtype=torch.int64)
        if self.categories and all("frequency" in c for c in self.categories):
            self.frequencies = [c["frequency"] for c in self.categories]
        else:
            self.frequencies = [frequency_from_image_count(n) for n in counts]

        self._anns = [per_image.get(im["id"], []) for im in self.images]
        if filter_empty:
            keep = [k for k, anns in enumerate(self._anns) if self._has_usable_box(k, anns)]
            self.images = [self.images[k] for k in keep]
            self._anns = [self._anns[k] for k in keep]
        self.image_ids = [im["id"] for im in self.images]

    # ------------------------------------------------------------------ metadata
    def __len__(self) -> int:
        return len(self.images)

    def image_info(self, i: int) -> dict:
        """The json record of item i (id, height, width, neg_category_ids, ...)."""
        return self.images[i]

    def image_class_indices(self, i: int) -> set:
        """Contiguous class indices annotated in item i (no image is read; used by RFS)."""
        return {label for label, _, _ in self._anns[i]}

    def candidate_paths(self, i: int) -> list:
        """Where item i's image may be, in the order they are tried (module docstring)."""
        img = self.images[i]
        candidates = []

        def add(path):
            if path not in candidates:
                candidates.append(path)

        for key in ("coco_url", "file_name"):
            location = img.get(key)
            if not isinstance(location, str):
                continue
            parts = [p for p in location.replace("\\", "/").split("/") if p]
            if not parts:
                continue
            name = parts[-1]
            if len(parts) >= 2:
                add(os.path.join(self.image_root, parts[-2], name))
            add(os.path.join(self.image_root, name))
            if key == "file_name" and name.startswith("COCO_") and len(name) > 16:
                for folder in ("", "train2017", "val2017"):
                    add(os.path.join(self.image_root, folder, name[-16:]))
        return candidates

    def image_path(self, i: int) -> str:
        """Path of item i's image: the first of `candidate_paths(i)` that exists (resolved
        once by `check_image_files()`)."""
        if self._paths is not None:
            return self._paths[i]
        path, candidates = self._find(i)
        if path is None:
            raise FileNotFoundError(self._missing_message(i, candidates))
        return path

    def _find(self, i: int):
        """(the first of `candidate_paths(i)` that exists, or None; the candidates tried)."""
        candidates = self.candidate_paths(i)
        return next((p for p in candidates if os.path.isfile(p)), None), candidates

    def _missing_message(self, i: int, candidates: list) -> str:
        return (f"{self.ann_file}: image id {self.images[i]['id']} not found; tried "
                + ", ".join(candidates) + f" (image_root={self.image_root}: the COCO root "
                "holding train2017/ and val2017/, see the README's data layout)")

    def check_image_files(self) -> None:
        """Resolves the image path of every item now, so that a missing file fails at start-up
        (naming the json, the first missing image id and the paths tried, and how many are
        missing) rather than at the end of a training run."""
        paths, first_missing, missing = [], None, 0
        for i in range(len(self.images)):
            found, candidates = self._find(i)
            if found is None:
                missing += 1
                if first_missing is None:
                    first_missing = self._missing_message(i, candidates)
            paths.append(found)
        if missing:
            raise FileNotFoundError(f"{first_missing}; {missing} of {len(self.images)} images "
                                    "of this file are missing")
        self._paths = paths

    def _has_usable_box(self, i: int, anns) -> bool:
        h, w = self.images[i]["height"], self.images[i]["width"]
        return any(self._clipped_box(b, h, w) is not None for _, b, _ in anns)

    @staticmethod
    def _clipped_box(bbox, h: int, w: int):
        x, y, bw, bh = bbox
        x1, y1 = min(max(x, 0.0), w), min(max(y, 0.0), h)
        x2, y2 = min(max(x + bw, 0.0), w), min(max(y + bh, 0.0), h)
        if x2 <= x1 or y2 <= y1:
            return None
        return [x1, y1, x2, y2]

    # ------------------------------------------------------------------ items
    def _read_image(self, i: int) -> torch.Tensor:
        # PIL rather than torchvision.io, whose image decoding is deprecated from 0.29 on.
        path = self.image_path(i)
        with Image.open(path) as im:
            pixels = np.array(im.convert("RGB"))  # a writable copy for torch
        info = self.images[i]
        if pixels.shape[:2] != (info["height"], info["width"]):
            raise ValueError(
                f"{self.ann_file}: images[id={info['id']}] says height={info['height']}, "
                f"width={info['width']} but {path} is {pixels.shape[0]}x{pixels.shape[1]}")
        return torch.from_numpy(pixels).permute(2, 0, 1).to(torch.float32).div_(255.0)

    @staticmethod
    def _segmentation(seg, bbox):
        """The annotation's segmentation; the box as a polygon when it has none."""
        if seg is None:
            return [[bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1], bbox[0] + bbox[2],
                     bbox[1] + bbox[3], bbox[0], bbox[1] + bbox[3]]]
        return seg

    @staticmethod
    def _to_rle(seg, h: int, w: int) -> dict:
        if isinstance(seg, list):  # polygons
            return mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
        if isinstance(seg["counts"], list):  # uncompressed RLE
            return mask_utils.frPyObjects(seg, h, w)
        return {"size": seg["size"], "counts": seg["counts"].encode("ascii")}  # compressed RLE

    def _polygon_entry(self, seg, h: int, w: int):
        if isinstance(seg, list):
            return [np.asarray(poly, dtype=np.float64) for poly in seg]
        return torch.from_numpy(np.ascontiguousarray(mask_utils.decode(self._to_rle(seg, h, w))))

    def get_target(self, i: int) -> dict:
        """The target of item i without reading its image."""
        info = self.images[i]
        h, w = info["height"], info["width"]
        boxes, labels, segments = [], [], []
        for label, bbox, seg in self._anns[i]:
            box = self._clipped_box(bbox, h, w)
            if box is None:
                continue
            boxes.append(box)
            labels.append(label)
            if self.with_masks:
                segments.append(self._segmentation(seg, bbox))
        target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "image_id": int(info["id"]),
            "orig_size": torch.tensor([h, w], dtype=torch.int64),
        }
        if self.with_masks and self.mask_format == "polygon":
            target["polygons"] = [self._polygon_entry(seg, h, w) for seg in segments]
        elif self.with_masks and self.mask_format == "cropped":
            target["mask_crops"] = CroppedMasks.from_bitmaps(
                (mask_utils.decode(self._to_rle(seg, h, w)) for seg in segments), (h, w))
        elif self.with_masks:
            if segments:  # decoded together: (H, W, K) -> (K, H, W)
                rles = [self._to_rle(seg, h, w) for seg in segments]
                masks = np.ascontiguousarray(mask_utils.decode(rles).transpose(2, 0, 1))
                target["masks"] = torch.from_numpy(masks)
            else:
                target["masks"] = torch.zeros((0, h, w), dtype=torch.uint8)
        return target

    def __getitem__(self, i: int):
        image = self._read_image(i)
        target = self.get_target(i)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __repr__(self) -> str:
        groups = {g: self.frequencies.count(g) for g in "rcf"}
        return (f"LVISDataset({self.ann_file!r}, items={len(self)}, num_images={self.num_images}, "
                f"num_classes={self.num_classes}, r/c/f={groups['r']}/{groups['c']}/{groups['f']})")
