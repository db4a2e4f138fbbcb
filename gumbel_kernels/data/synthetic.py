"""A small long-tailed data set in the LVIS v1 format, generated on the spot.

No LVIS download is possible on the build machines, so tests and the CPU demo train and evaluate
on this: coloured shapes on a noisy background, each class one (shape, colour) combination (so a
detector can learn it), 1-4 objects per image, polygon segmentations.

    python -m gumbel_kernels.data.synthetic --out DIR [--num-classes 30] [--train-images 200]
        [--val-images 50] [--image-size 256] [--seed 0]

writes DIR/train.json, DIR/val.json and DIR/images/<image id, 12 digits>.png (image ids are
unique across both splits, as in LVIS). Load with
`LVISDataset(DIR/"train.json", DIR/"images")`.

The long tail: classes are ranked (the rank -> class id map is shuffled) and each rank gets a
target number of training images, piecewise log-linear in rank like LVIS's rank-frequency
curve: a few head classes in 55-65 % of the images, ~40 % of the classes from 27.5 % of the
images (at most 100) down to 11 images, and the rest from 9 images down to 1. With the defaults
(200 training images, 30 classes) that makes 2 frequent (>100 images), 12 common and 16 rare
(<= 10 images) classes; `image_count`, `instance_count` and `frequency` are then counted from
the generated train split (and copied into val.json, as LVIS does).

Every class occurs in val: class k is placed in val image k mod V first (so V >= C/4 is
needed), then each val image gets more classes, drawn by training frequency, up to 1-4.
`neg_category_ids` lists about half the classes absent from an image (verified absent, as in
LVIS); about 10 % of the images mark one present class `not_exhaustive_category_ids`.
Deterministic given the seed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from typing import Dict, List

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from .._cli import HelpFormatter, add_debug_flag, run

__all__ = ["generate", "SHAPES", "COLOURS", "class_style"]

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 225), "yellow": (235, 215, 40),
    "magenta": (215, 50, 205), "cyan": (40, 205, 215), "orange": (245, 140, 25),
    "purple": (115, 45, 165),
}


def _regular(n: int, start: float = -math.pi / 2, radius: float = 1.0):
    return [(radius * math.cos(start + 2 * math.pi * k / n), radius * math.sin(start + 2 * math.pi * k / n))
            for k in range(n)]


def _star():
    pts = []
    for k in range(10):
        r = 1.0 if k % 2 == 0 else 0.45
        a = -math.pi / 2 + math.pi * k / 5
        pts.append((r * math.cos(a), r * math.sin(a)))
    return pts


_A = 0.35  # half-width of the cross's arms
SHAPES = {  # unit polygons (centre 0, half-size 1), clockwise in image coordinates
    "square": [(-1, -1), (1, -1), (1, 1), (-1, 1)],
    "circle": _regular(24),
    "triangle": [(0, -1), (1, 1), (-1, 1)],
    "diamond": [(0, -1), (1, 0), (0, 1), (-1, 0)],
    "cross": [(-_A, -1), (_A, -1), (_A, -_A), (1, -_A), (1, _A), (_A, _A), (_A, 1), (-_A, 1),
              (-_A, _A), (-1, _A), (-1, -_A), (-_A, -_A)],
    "star": _star(),
}
MAX_CLASSES = len(SHAPES) * len(COLOURS)


def class_style(k: int):
    """(shape name, colour name) of contiguous class k: distinct for k < MAX_CLASSES, and
    neighbouring classes differ in both shape and colour."""
    s, n = len(SHAPES), len(COLOURS)
    assert math.gcd(s + 1, n) == 1  # makes k -> (shape, colour) one-to-one
    q = k // s
    return list(SHAPES)[k % s], list(COLOURS)[(q * (s + 1) + k % s) % n]


def _target_image_counts(num_classes: int, n: int) -> np.ndarray:
    """Training images wanted per frequency rank (see the module docstring)."""
    n_f = max(1, round(num_classes / 15))
    n_c = min(num_classes - n_f, max(1, round(0.4 * num_classes)))
    n_r = num_classes - n_f - n_c
    parts = [np.linspace(0.65 * n, 0.55 * n, n_f),
             np.geomspace(max(min(0.275 * n, 100.0), 11.0), 11.0, n_c),
             np.geomspace(9.0, 1.0, n_r)]
    counts = np.concatenate(parts)
    budget = 3.2 * n  # leaves room below the 4-classes-per-image cap
    if counts.sum() > budget:
        counts = counts * (budget / counts.sum())
    return np.clip(np.round(counts), 1, n).astype(np.int64)


def _assign_train_classes(rng, weights: np.ndarray, n: int, max_per_image: int = 4) -> List[set]:
    classes = [set() for _ in range(n)]
    for c in np.argsort(-weights, kind="stable"):
        open_images = [i for i in range(n) if len(classes[i]) < max_per_image]
        for i in rng.choice(open_images, size=min(int(weights[c]), len(open_images)), replace=False):
            classes[int(i)].add(int(c))
    p = weights / weights.sum()
    for cls in classes:
        if not cls:
            cls.add(int(rng.choice(len(weights), p=p)))
    return classes


def _assign_val_classes(rng, weights: np.ndarray, v: int, max_per_image: int = 4) -> List[set]:
    num_classes = len(weights)
    if num_classes > max_per_image * v:
        need = math.ceil(num_classes / max_per_image)
        raise ValueError(f"val_images={v} is too few to hold all {num_classes} classes "
                         f"(at most {max_per_image} per image): need >= {need}")
    classes = [set() for _ in range(v)]
    for c in range(num_classes):
        classes[c % v].add(c)
    for cls in classes:
        want = min(num_classes, max(len(cls), int(rng.integers(1, max_per_image + 1))))
        while len(cls) < want:
            absent = np.array([c for c in range(num_classes) if c not in cls])
            p = weights[absent] / weights[absent].sum()
            cls.add(int(rng.choice(absent, p=p)))
    return classes


def _instances(rng, classes: set, max_objects: int = 4) -> List[int]:
    """The objects of one image: each class once, then a few duplicates."""
    objs = sorted(classes)
    while len(objs) < max_objects and rng.random() < 0.3:
        objs.append(int(rng.choice(sorted(classes))))
    return objs


def _place(rng, size: int, boxes: list, lo: float, hi: float):
    """A box (x1, y1, x2, y2) not touching `boxes`; shrinks if the image is crowded."""
    scale = 1.0
    for attempt in range(200):
        if attempt and attempt % 20 == 0:
            scale *= 0.85
        side = rng.uniform(lo, hi) * size * scale
        stretch = math.exp(rng.uniform(-0.15, 0.15))
        w, h = side * stretch, side / stretch
        x1 = rng.uniform(2, size - 2 - w)
        y1 = rng.uniform(2, size - 2 - h)
        box = (x1, y1, x1 + w, y1 + h)
        if all(box[2] + 2 < b[0] or b[2] + 2 < box[0] or box[3] + 2 < b[1] or b[3] + 2 < box[1]
               for b in boxes):
            return box
    return box  # overlapping: rare, and only costs some occlusion


def _noise_bank(rng, size: int, sigma: float) -> np.ndarray:
    """One (2*size, 2*size, 3) Gaussian noise tile; images take random windows of it (drawing
    fresh noise per image would take most of the generation time)."""
    return rng.normal(0, sigma, size=(2 * size, 2 * size, 3)).astype(np.float32)


def _window(rng, bank: np.ndarray, size: int) -> np.ndarray:
    y, x = rng.integers(0, bank.shape[0] - size + 1, size=2)
    window = bank[y:y + size, x:x + size]
    return window[:, ::-1] if rng.random() < 0.5 else window


def _render_image(rng, size: int, objects: List[int], banks):
    """Noisy background + shapes. Returns (uint8 HxWx3 array, [(class, polygon), ...])."""
    coarse, fine = banks
    base = rng.uniform(90, 170) + rng.uniform(-12, 12, size=3).astype(np.float32)
    gradient = np.float32(rng.uniform(-20, 20)) * np.linspace(-1, 1, size, dtype=np.float32)[:, None, None]
    background = base + gradient + _window(rng, coarse, size)
    img = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    boxes, placed = [], []
    for c in objects:
        x1, y1, x2, y2 = _place(rng, size, boxes, 0.14, 0.30)
        boxes.append((x1, y1, x2, y2))
        shape, colour = class_style(c)
        cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
        poly = [(round(cx + u * hw, 2), round(cy + v * hh, 2)) for u, v in SHAPES[shape]]
        fill = tuple(int(np.clip(v + rng.integers(-15, 16), 0, 255)) for v in COLOURS[colour])
        draw.polygon(poly, fill=fill)
        placed.append((c, poly))
    pixels = np.asarray(img).astype(np.float32) + _window(rng, fine, size)
    return np.clip(pixels, 0, 255).astype(np.uint8), placed


def _annotation(ann_id: int, image_id: int, cat_id: int, poly, size: int) -> dict:
    flat = [v for xy in poly for v in xy]
    xs, ys = flat[0::2], flat[1::2]
    x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
    area = float(mask_utils.area(mask_utils.frPyObjects([flat], size, size)).sum())
    return {"id": ann_id, "image_id": image_id, "category_id": cat_id, "segmentation": [flat],
            "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
            "area": area}


def _build_split(rng, class_sets, first_image_id, first_ann_id, size, image_dir, cat_of):
    images, anns = [], []
    num_classes = len(cat_of)
    ann_id = first_ann_id
    banks = (_noise_bank(rng, size, 20.0), _noise_bank(rng, size, 6.0))
    for k, classes in enumerate(class_sets):
        image_id = first_image_id + k
        pixels, placed = _render_image(rng, size, _instances(rng, classes), banks)
        fname = f"{image_id:012d}.png"
        Image.fromarray(pixels).save(os.path.join(image_dir, fname), compress_level=1)
        absent = [c for c in range(num_classes) if c not in classes]
        neg = sorted(rng.choice(absent, size=len(absent) // 2, replace=False).tolist()) if absent else []
        not_exhaustive = []
        if rng.random() < 0.1:
            not_exhaustive = [int(rng.choice(sorted(classes)))]
        images.append({
            "id": image_id, "width": size, "height": size, "license": 1,
            "coco_url": f"http://localhost/images/{fname}",
            "flickr_url": f"http://localhost/images/{fname}",
            "date_captured": "2022-10-23 00:00:00",
            "neg_category_ids": [cat_of[c] for c in neg],
            "not_exhaustive_category_ids": [cat_of[c] for c in not_exhaustive],
        })
        for c, poly in placed:
            anns.append(_annotation(ann_id, image_id, cat_of[c], poly, size))
            ann_id += 1
    return images, anns


def _frequency(image_count: int) -> str:
    return "r" if image_count <= 10 else ("c" if image_count <= 100 else "f")


def generate(out_dir, num_classes: int = 30, train_images: int = 200, val_images: int = 50,
             image_size: int = 256, seed: int = 0) -> Dict[str, str]:
    """Writes the data set under out_dir; returns {"root", "train", "val", "images"} paths."""
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes={num_classes} must be in [1, {MAX_CLASSES}] "
                         f"({len(SHAPES)} shapes x {len(COLOURS)} colours)")
    if train_images < 1 or val_images < 1:
        raise ValueError("train_images and val_images must be positive")
    if image_size < 64:
        raise ValueError(f"image_size={image_size} must be >= 64")
    out_dir = os.fspath(out_dir)
    image_dir = os.path.join(out_dir, "images")
    os.makedirs(image_dir, exist_ok=True)
    rng = np.random.default_rng(seed)

    # Frequency rank r -> class index rank_to_class[r], so frequency does not follow the id order.
    rank_to_class = rng.permutation(num_classes)
    weights = np.empty(num_classes, dtype=np.int64)
    weights[rank_to_class] = _target_image_counts(num_classes, train_images)
    cat_of = [k + 1 for k in range(num_classes)]  # LVIS ids are 1-based

    train_sets = _assign_train_classes(rng, weights, train_images)
    val_sets = _assign_val_classes(rng, weights.astype(np.float64), val_images)
    train_imgs, train_anns = _build_split(rng, train_sets, 1, 1, image_size, image_dir, cat_of)
    val_imgs, val_anns = _build_split(rng, val_sets, train_images + 1, len(train_anns) + 1,
                                      image_size, image_dir, cat_of)

    image_count = [0] * num_classes
    instance_count = [0] * num_classes
    for classes in train_sets:
        for c in classes:
            image_count[c] += 1
    for ann in train_anns:
        instance_count[ann["category_id"] - 1] += 1
    categories = []
    for k in range(num_classes):
        shape, colour = class_style(k)
        name = f"{colour}_{shape}"
        categories.append({
            "id": cat_of[k], "name": name, "synset": f"{name}.n.01", "synonyms": [name],
            "def": f"a {colour} {shape}", "image_count": image_count[k],
            "instance_count": instance_count[k], "frequency": _frequency(image_count[k]),
        })

    info = {"description": "gumbel-kernels synthetic long-tailed LVIS-format data set",
            "version": "1.0", "year": 2022, "seed": seed}
    licenses = [{"id": 1, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}]
    paths = {"root": out_dir, "train": os.path.join(out_dir, "train.json"),
             "val": os.path.join(out_dir, "val.json"), "images": image_dir}
    for split, imgs, anns in (("train", train_imgs, train_anns), ("val", val_imgs, val_anns)):
        with open(paths[split], "w") as f:
            json.dump({"info": info, "licenses": licenses, "images": imgs, "annotations": anns,
                       "categories": categories}, f)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m gumbel_kernels.data.synthetic",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-classes", type=int, default=30, help="categories")
    parser.add_argument("--train-images", type=int, default=200, help="training images")
    parser.add_argument("--val-images", type=int, default=50, help="validation images")
    parser.add_argument("--image-size", type=int, default=256, help="side of the square images")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    paths = generate(args.out, args.num_classes, args.train_images, args.val_images,
                     args.image_size, args.seed)
    with open(paths["train"]) as f:
        cats = json.load(f)["categories"]
    groups = {g: sum(c["frequency"] == g for c in cats) for g in "rcf"}
    print(f"wrote {paths['train']}, {paths['val']} and images to {paths['images']} "
          f"(classes r/c/f = {groups['r']}/{groups['c']}/{groups['f']})")


if __name__ == "__main__":
    raise SystemExit(run(main))
