"""Object distributions over image locations (GOL paper, Fig. 2).

    python -m gumbel_kernels.analysis distributions --ann FILE [--grid 20] --out DIR

The paper argues that in instance segmentation the probability of an object of a given class at
a given location is tiny and highly skewed, not a balanced Bernoulli, which suits the Gumbel
(extreme-value) activation. From any LVIS-format json (images with width/height, annotations
with bbox [x, y, w, h], categories) this module measures that on a G x G grid over normalised
image coordinates (G = 20 by default).

Definitions (hand-computable):
- An annotation with bbox [x, y, w, h] in an image of size W x H has the normalised centre
  (cx, cy) = ((x + w/2) / W, (y + h/2) / H) and lies in the cell
  u = (row, col) = (min(G-1, floor(G*cy)), min(G-1, floor(G*cx))) (clipped to [0, G-1]).
- I = the number of images in the file (images without annotations included).
- P(obj, u)     = #{images with at least one annotation centred in u} / I
- P(y | obj, u) = #{annotations of class y centred in u} / #{annotations centred in u}
                  (0 where no annotation is centred in u)
- P(y, u)       = P(y | obj, u) * P(obj, u)
- Group curves (r/c/f): the mean over the classes of a frequency group of P(y | obj, u) resp.
  P(y, u), cell by cell. A class's group is its `frequency` field, else derived from its
  `image_count` (rare <= 10, common 11-100, frequent > 100), else from the number of images of
  this file that contain it.
- Skew: over all (class, cell) pairs the values P(y, u) are summarised by their mean, median,
  the fraction that are exactly 0 and below 0.01, and the sample skewness
  g1 = m3 / m2^(3/2) (m_k the k-th central moment); a balanced Bernoulli view would put the
  probabilities near 0.5 with g1 near 0.

Outputs in --out: p_obj.png (heat map of P(obj, u)), p_y_given_obj.png and p_y.png (group-mean
heat maps), p_y_histogram.png (histogram of the P(y, u) values per group, log counts),
distributions.csv (one row per cell: row, col, p_obj, and the group means of P(y|obj,u) and
P(y,u)), distributions_classes.csv (one row per class: its summary) and summary.json.

The helpers here (LVIS json loading, the category table with frequency groups, object centres
and their grid cells, the plot colours) are shared by the other analyses.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["load_json", "CategoryTable", "category_table", "grid_cells", "annotation_centres",
           "ObjectDistributions", "object_distributions", "skew_summary", "GROUP_COLOURS",
           "GROUP_NAMES", "GROUPS", "add_arguments", "run"]

GROUPS = ("r", "c", "f")
GROUP_NAMES = {"r": "rare", "c": "common", "f": "frequent"}
GROUP_COLOURS = {"r": "#d62728", "c": "#ff7f0e", "f": "#1f77b4"}


def load_json(path: str):
    with open(path) as f:
        return json.load(f)


def _frequency_from_image_count(image_count: int) -> str:
    # LVIS: rare <= 10 training images, common 11-100, frequent > 100.
    return "r" if image_count <= 10 else "c" if image_count <= 100 else "f"


@dataclass
class CategoryTable:
    """Categories sorted by LVIS id, contiguous index k = position (the harness convention)."""
    ids: List[int]
    names: List[str]
    image_counts: List[int]
    frequencies: List[str]

    @property
    def index(self) -> Dict[int, int]:
        return {cat_id: k for k, cat_id in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def group_indices(self) -> Dict[str, List[int]]:
        return {g: [k for k, f in enumerate(self.frequencies) if f == g] for g in GROUPS}

    def frequency_order(self, descending: bool = True) -> List[int]:
        """Class indices sorted by training image count (ties by index)."""
        return sorted(range(len(self.ids)),
                      key=lambda k: ((-1 if descending else 1) * self.image_counts[k], k))


def category_table(data: dict) -> CategoryTable:
    """The categories of an LVIS-format dict with image counts and r/c/f groups."""
    cats = sorted(data.get("categories", []), key=lambda c: c["id"])
    if not cats:
        raise ValueError("the annotation file has no categories")
    counted: Dict[int, set] = {c["id"]: set() for c in cats}
    for ann in data.get("annotations", []):
        if ann["category_id"] in counted:
            counted[ann["category_id"]].add(ann["image_id"])
    image_counts, frequencies = [], []
    for c in cats:
        count = int(c["image_count"]) if "image_count" in c else len(counted[c["id"]])
        image_counts.append(count)
        freq = c.get("frequency")
        frequencies.append(freq if freq in GROUPS else _frequency_from_image_count(count))
    return CategoryTable([c["id"] for c in cats], [str(c.get("name", c["id"])) for c in cats],
                         image_counts, frequencies)


def grid_cells(cx: np.ndarray, cy: np.ndarray, grid: int) -> np.ndarray:
    """Flat cell index row*G + col of normalised centres (clipped to the grid)."""
    col = np.clip(np.floor(np.asarray(cx, dtype=np.float64) * grid), 0, grid - 1).astype(np.int64)
    row = np.clip(np.floor(np.asarray(cy, dtype=np.float64) * grid), 0, grid - 1).astype(np.int64)
    return row * grid + col


def _image_sizes(data: dict) -> Dict[int, Tuple[float, float]]:
    sizes = {}
    for img in data.get("images", []):
        if "width" not in img or "height" not in img:
            raise ValueError(f"image {img.get('id')} has no width/height: they are needed to "
                             f"normalise object centres")
        sizes[img["id"]] = (float(img["width"]), float(img["height"]))
    return sizes


def annotation_centres(records: Sequence[dict], sizes: Dict[int, Tuple[float, float]],
                       cat_index: Dict[int, int], weight_key: Optional[str] = None):
    """(image_ids, class indices, cx, cy, weights) of records with a bbox, on known images and
    categories; records of unknown images/categories are skipped (their number is returned)."""
    image_ids, classes, cxs, cys, weights = [], [], [], [], []
    skipped = 0
    for rec in records:
        size = sizes.get(rec.get("image_id"))
        k = cat_index.get(rec.get("category_id"))
        if size is None or k is None or "bbox" not in rec:
            skipped += 1
            continue
        x, y, w, h = rec["bbox"][:4]
        image_ids.append(rec["image_id"])
        classes.append(k)
        cxs.append((x + w / 2.0) / size[0])
        cys.append((y + h / 2.0) / size[1])
        weights.append(float(rec[weight_key]) if weight_key else 1.0)
    return (np.asarray(image_ids, dtype=np.int64), np.asarray(classes, dtype=np.int64),
            np.asarray(cxs, dtype=np.float64), np.asarray(cys, dtype=np.float64),
            np.asarray(weights, dtype=np.float64), skipped)


@dataclass
class ObjectDistributions:
    grid: int
    num_images: int
    categories: CategoryTable
    p_obj: np.ndarray              # (G, G)
    p_y_given_obj: np.ndarray      # (C, G, G)
    p_y: np.ndarray                # (C, G, G)
    objects_per_cell: np.ndarray   # (G, G) annotation counts
    objects_per_class: np.ndarray  # (C,)

    def group_mean(self, values: np.ndarray, group: str) -> np.ndarray:
        members = self.categories.group_indices()[group]
        if not members:
            return np.full((self.grid, self.grid), np.nan)
        return values[members].mean(axis=0)


def object_distributions(data: dict, grid: int = 20) -> ObjectDistributions:
    """P(obj, u), P(y | obj, u) and P(y, u) of an LVIS-format dict (module docstring)."""
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    cats = category_table(data)
    sizes = _image_sizes(data)
    num_images = len(sizes)
    if num_images == 0:
        raise ValueError("the annotation file has no images")
    image_ids, classes, cx, cy, _, _ = annotation_centres(data.get("annotations", []), sizes,
                                                          cats.index)
    cells = grid_cells(cx, cy, grid)
    num_cells = grid * grid
    per_class_cell = np.zeros((len(cats), num_cells))
    np.add.at(per_class_cell, (classes, cells), 1.0)
    per_cell = per_class_cell.sum(axis=0)
    # images with at least one centre in u: count distinct (image, cell) pairs
    pairs = np.unique(np.stack([image_ids, cells], axis=1), axis=0) if len(cells) else \
        np.zeros((0, 2), dtype=np.int64)
    images_per_cell = np.bincount(pairs[:, 1], minlength=num_cells).astype(np.float64)
    p_obj = images_per_cell / num_images
    p_y_given_obj = np.divide(per_class_cell, per_cell[None, :],
                              out=np.zeros_like(per_class_cell), where=per_cell[None, :] > 0)
    p_y = p_y_given_obj * p_obj[None, :]
    shape = (len(cats), grid, grid)
    return ObjectDistributions(grid, num_images, cats, p_obj.reshape(grid, grid),
                               p_y_given_obj.reshape(shape), p_y.reshape(shape),
                               per_cell.reshape(grid, grid), per_class_cell.sum(axis=1))


def skew_summary(values: np.ndarray) -> Dict[str, float]:
    """Mean, median, max, fraction == 0, fraction < 0.01 and sample skewness g1 of values."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        return {"count": 0}
    centred = values - values.mean()
    m2 = float(np.mean(centred ** 2))
    m3 = float(np.mean(centred ** 3))
    return {"count": int(values.size), "mean": float(values.mean()),
            "median": float(np.median(values)), "max": float(values.max()),
            "fraction_zero": float(np.mean(values == 0)),
            "fraction_below_0.01": float(np.mean(values < 0.01)),
            "skewness": m3 / m2 ** 1.5 if m2 > 0 else 0.0}


# ---------------------------------------------------------------------------------- output --

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _heatmaps(path: str, maps: List[Tuple[str, np.ndarray]], suptitle: str) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(maps), figsize=(4.2 * len(maps), 3.8), squeeze=False)
    for ax, (title, values) in zip(axes[0], maps):
        image = ax.imshow(values, cmap="viridis", origin="upper", extent=(0, 1, 1, 0))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("x (normalised)")
        ax.set_ylabel("y (normalised)")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(suptitle, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _histogram(path: str, dist: ObjectDistributions) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    bins = np.linspace(0.0, max(1e-6, float(dist.p_y.max())), 41)
    for group, members in dist.categories.group_indices().items():
        if members:
            ax.hist(dist.p_y[members].ravel(), bins=bins, histtype="step", linewidth=1.6,
                    color=GROUP_COLOURS[group], label=f"{GROUP_NAMES[group]} ({len(members)})")
    ax.set_yscale("log")
    ax.set_xlabel("P(y, u)")
    ax.set_ylabel("number of (class, cell) pairs")
    summary = skew_summary(dist.p_y)
    ax.set_title(f"P(y, u) over {dist.grid}x{dist.grid} cells: {100 * summary['fraction_zero']:.1f}"
                 f"% zero, skewness {summary['skewness']:.1f}", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(dist: ObjectDistributions, out: str) -> Dict:
    os.makedirs(out, exist_ok=True)
    g = dist.grid
    groups = [grp for grp in GROUPS if dist.categories.group_indices()[grp]]
    _heatmaps(os.path.join(out, "p_obj.png"), [("P(obj, u)", dist.p_obj)],
              f"object-centre probability per cell ({dist.num_images} images)")
    _heatmaps(os.path.join(out, "p_y_given_obj.png"),
              [(f"mean P(y | obj, u), {GROUP_NAMES[grp]}", dist.group_mean(dist.p_y_given_obj, grp))
               for grp in groups], "class probability given an object")
    _heatmaps(os.path.join(out, "p_y.png"),
              [(f"mean P(y, u), {GROUP_NAMES[grp]}", dist.group_mean(dist.p_y, grp))
               for grp in groups], "P(y, u) = P(y | obj, u) P(obj, u)")
    _histogram(os.path.join(out, "p_y_histogram.png"), dist)

    means = {grp: (dist.group_mean(dist.p_y_given_obj, grp), dist.group_mean(dist.p_y, grp))
             for grp in GROUPS}
    with open(os.path.join(out, "distributions.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "col", "p_obj", "num_objects"]
                        + [f"p_y_given_obj_mean_{grp}" for grp in GROUPS]
                        + [f"p_y_mean_{grp}" for grp in GROUPS])
        for r in range(g):
            for c in range(g):
                writer.writerow([r, c, f"{dist.p_obj[r, c]:.8g}", int(dist.objects_per_cell[r, c])]
                                + [f"{means[grp][0][r, c]:.8g}" for grp in GROUPS]
                                + [f"{means[grp][1][r, c]:.8g}" for grp in GROUPS])
    cats = dist.categories
    with open(os.path.join(out, "distributions_classes.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "category_id", "name", "frequency", "image_count",
                         "num_objects", "max_p_y", "mean_p_y", "fraction_zero_cells",
                         "skewness_p_y"])
        for k in range(len(cats)):
            s = skew_summary(dist.p_y[k])
            writer.writerow([k, cats.ids[k], cats.names[k], cats.frequencies[k],
                             cats.image_counts[k], int(dist.objects_per_class[k]),
                             f"{s['max']:.8g}", f"{s['mean']:.8g}", f"{s['fraction_zero']:.6g}",
                             f"{s['skewness']:.6g}"])
    summary = {"grid": g, "num_images": dist.num_images, "num_classes": len(cats),
               "num_objects": int(dist.objects_per_class.sum()),
               "p_obj": skew_summary(dist.p_obj), "p_y": skew_summary(dist.p_y),
               "p_y_by_group": {GROUP_NAMES[grp]: skew_summary(dist.p_y[members])
                                for grp, members in cats.group_indices().items() if members}}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


# ------------------------------------------------------------------------------------- CLI --

def add_arguments(parser) -> None:
    parser.add_argument("--ann", required=True, help="LVIS-format annotation json")
    parser.add_argument("--grid", type=int, default=20, help="cells per side")
    parser.add_argument("--out", required=True, help="output folder")


def run(args) -> Dict:
    dist = object_distributions(load_json(args.ann), args.grid)
    summary = write_outputs(dist, args.out)
    p_y = summary["p_y"]
    print(f"{summary['num_objects']} objects in {summary['num_images']} images, "
          f"{summary['num_classes']} classes, {args.grid}x{args.grid} grid")
    print(f"P(obj, u): mean {summary['p_obj']['mean']:.4f}, max {summary['p_obj']['max']:.4f}")
    print(f"P(y, u): mean {p_y['mean']:.3g}, median {p_y['median']:.3g}, "
          f"{100 * p_y['fraction_zero']:.1f}% zero, {100 * p_y['fraction_below_0.01']:.1f}% "
          f"below 0.01, skewness {p_y['skewness']:.2f}")
    print(f"wrote {args.out}/p_obj.png, p_y_given_obj.png, p_y.png, p_y_histogram.png, "
          f"distributions.csv, distributions_classes.csv, summary.json")
    return summary
