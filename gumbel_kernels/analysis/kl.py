"""KL divergence between predicted and ground-truth spatial distributions (GOL paper, Fig. 5).

    python -m gumbel_kernels.analysis kl --results RESULTS.json [MORE.json ...] [--names ...]
        --ann FILE [--grid 20] [--eps 1e-6] --out DIR

The paper shows that Gumbel-trained detectors match the ground-truth object distribution better
than sigmoid-trained ones, above all for rare classes. Per class y, both distributions are
normalised histograms over the G x G grid of the `distributions` analysis (object centre ->
cell, same cell rule):
- ground truth: g_y(u) = #{annotations of y centred in u} / #{annotations of y};
- prediction:   p_y(u) = sum of the scores of the detections of y centred in u
                         / sum of the scores of all detections of y
                (uniform, 1/K, when the class has no detection), K = G*G cells;
- smoothing: x~(u) = (x(u) + eps) / (1 + K * eps) for both (so both still sum to 1);
- KL(g || p) = sum_u g~(u) * log(g~(u) / p~(u))   (natural log, nats).
Identical histograms give exactly 0. Classes without ground truth in --ann get no value (NaN).
Detections on images or categories absent from --ann are ignored (counted and reported).
Results are LVIS/COCO result lists (dicts with image_id, category_id, bbox [x, y, w, h], score),
as `gumbel_kernels.evaluation.detections_to_lvis_results` writes them.

Outputs in --out: kl.png (per-class KL with classes sorted by training image count, most
frequent left, coloured by r/c/f, one marker per results file, plus a running mean), kl_groups.png
(mean KL per group and results file), kl.csv (one row per class: ids, name, frequency,
image_count, num_gt and per results file num_dets_<name>, score_sum_<name>, kl_<name>) and
kl_summary.json (mean KL per group).
"""
from __future__ import annotations

import csv
import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from .distributions import (GROUP_COLOURS, GROUP_NAMES, GROUPS, CategoryTable,
                            _image_sizes, _pyplot, annotation_centres, category_table,
                            grid_cells, load_json)

__all__ = ["spatial_histograms", "smoothed", "kl_divergence", "per_class_kl", "add_arguments",
           "run"]


def spatial_histograms(records: Sequence[dict], data: dict, grid: int = 20,
                       weight_key: Optional[str] = None, cats: Optional[CategoryTable] = None):
    """(C, G*G) histogram of object centres per class (weighted by rec[weight_key] if given),
    and the number of records skipped (unknown image or category)."""
    cats = cats or category_table(data)
    sizes = _image_sizes(data)
    _, classes, cx, cy, weights, skipped = annotation_centres(records, sizes, cats.index,
                                                              weight_key)
    hist = np.zeros((len(cats), grid * grid))
    np.add.at(hist, (classes, grid_cells(cx, cy, grid)), weights)
    return hist, skipped


def smoothed(hist: np.ndarray, eps: float) -> np.ndarray:
    """Normalise each row (uniform for an empty row), then (x + eps) / (1 + K eps)."""
    hist = np.asarray(hist, dtype=np.float64)
    k = hist.shape[-1]
    total = hist.sum(axis=-1, keepdims=True)
    normalised = np.where(total > 0, hist / np.where(total > 0, total, 1.0), 1.0 / k)
    return (normalised + eps) / (1.0 + k * eps)


def kl_divergence(gt_hist: np.ndarray, pred_hist: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """KL(g~ || p~) per row of two (..., K) histograms (rows of gt_hist with no mass: NaN)."""
    g = smoothed(gt_hist, eps)
    p = smoothed(pred_hist, eps)
    kl = np.sum(g * (np.log(g) - np.log(p)), axis=-1)
    has_gt = np.asarray(gt_hist).sum(axis=-1) > 0
    return np.where(has_gt, np.maximum(kl, 0.0), np.nan)


def per_class_kl(results: Sequence[dict], data: dict, grid: int = 20, eps: float = 1e-6):
    """dict with kl (C,), num_gt (C,), num_dets (C,), score_sum (C,), skipped (int)."""
    cats = category_table(data)
    gt, _ = spatial_histograms(data.get("annotations", []), data, grid, cats=cats)
    pred, skipped = spatial_histograms(results, data, grid, weight_key="score", cats=cats)
    counts, _ = spatial_histograms(results, data, grid, cats=cats)
    return {"kl": kl_divergence(gt, pred, eps), "num_gt": gt.sum(axis=1),
            "num_dets": counts.sum(axis=1), "score_sum": pred.sum(axis=1), "skipped": skipped}


def _load_results(path: str) -> List[dict]:
    results = load_json(path)
    if isinstance(results, dict) and "annotations" in results:
        results = results["annotations"]
    if not isinstance(results, list):
        raise ValueError(f"{path}: expected a list of detections (LVIS results format)")
    return results


def _running_mean(values: np.ndarray, window: int) -> np.ndarray:
    out = np.full(values.shape, np.nan)
    for i in range(len(values)):
        chunk = values[max(0, i - window // 2): i + window // 2 + 1]
        chunk = chunk[~np.isnan(chunk)]
        if chunk.size:
            out[i] = chunk.mean()
    return out


def _plot(out: str, cats: CategoryTable, names: List[str], kls: List[np.ndarray]) -> None:
    plt = _pyplot()
    order = cats.frequency_order(descending=True)
    markers = "o^sDvP*X"
    fig, ax = plt.subplots(figsize=(9, 4.5))
    x = np.arange(len(order))
    colours = [GROUP_COLOURS[cats.frequencies[k]] for k in order]
    for i, (name, kl) in enumerate(zip(names, kls)):
        values = kl[order]
        ax.scatter(x, values, c=colours, s=12, marker=markers[i % len(markers)], alpha=0.6,
                   label=name, linewidths=0)
        ax.plot(x, _running_mean(values, max(3, len(order) // 25)), linewidth=1.5,
                label=f"{name} (running mean)")
    for group in GROUPS:
        ax.scatter([], [], c=GROUP_COLOURS[group], s=12, label=GROUP_NAMES[group])
    ax.set_xlabel("classes sorted by training image count (frequent -> rare)")
    ax.set_ylabel("KL(gt || predicted)  [nats]")
    ax.set_title("per-class KL divergence of the spatial score distribution", fontsize=10)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "kl.png"), dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / max(1, len(names))
    groups = cats.group_indices()
    for i, (name, kl) in enumerate(zip(names, kls)):
        means = [np.nanmean(kl[groups[g]]) if groups[g] and not np.all(np.isnan(kl[groups[g]]))
                 else np.nan for g in GROUPS]
        ax.bar(np.arange(3) + (i - (len(names) - 1) / 2) * width, means, width, label=name)
    ax.set_xticks(np.arange(3), [GROUP_NAMES[g] for g in GROUPS])
    ax.set_ylabel("mean KL(gt || predicted)  [nats]")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "kl_groups.png"), dpi=120)
    plt.close(fig)


def add_arguments(parser) -> None:
    parser.add_argument("--results", nargs="+", required=True,
                        help="LVIS results json file(s) (list of detections)")
    parser.add_argument("--names", nargs="+", help="a label per results file (default: stems)")
    parser.add_argument("--ann", required=True, help="LVIS-format ground-truth json")
    parser.add_argument("--grid", type=int, default=20, help="cells per side")
    parser.add_argument("--eps", type=float, default=1e-6, help="smoothing")
    parser.add_argument("--out", required=True, help="output folder")


def run(args) -> Dict:
    names = args.names or [os.path.splitext(os.path.basename(p))[0] for p in args.results]
    if len(names) != len(args.results):
        raise SystemExit(f"error: {len(args.results)} results files but {len(names)} names")
    if len(set(names)) != len(names):
        raise SystemExit(f"error: the names must be distinct, got {names}")
    data = load_json(args.ann)
    cats = category_table(data)
    outputs = [per_class_kl(_load_results(path), data, args.grid, args.eps)
               for path in args.results]
    os.makedirs(args.out, exist_ok=True)
    _plot(args.out, cats, names, [o["kl"] for o in outputs])
    with open(os.path.join(args.out, "kl.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        header = ["index", "category_id", "name", "frequency", "image_count", "num_gt"]
        for name in names:
            header += [f"num_dets_{name}", f"score_sum_{name}", f"kl_{name}"]
        writer.writerow(header)
        for k in cats.frequency_order(descending=True):
            row = [k, cats.ids[k], cats.names[k], cats.frequencies[k], cats.image_counts[k],
                   int(outputs[0]["num_gt"][k])]
            for o in outputs:
                kl = o["kl"][k]
                row += [int(o["num_dets"][k]), f"{o['score_sum'][k]:.8g}",
                        "" if np.isnan(kl) else f"{kl:.8g}"]
            writer.writerow(row)
    groups = cats.group_indices()
    summary = {}
    for name, o in zip(names, outputs):
        entry = {}
        for g in ("all",) + GROUPS:
            members = list(range(len(cats))) if g == "all" else groups[g]
            values = o["kl"][members] if members else np.array([])
            values = values[~np.isnan(values)]
            entry[GROUP_NAMES.get(g, g)] = float(values.mean()) if values.size else None
        entry["skipped_detections"] = int(o["skipped"])
        summary[name] = entry
    with open(os.path.join(args.out, "kl_summary.json"), "w") as f:
        json.dump({"grid": args.grid, "eps": args.eps, "mean_kl": summary}, f, indent=2)
    print(f"mean KL(gt || predicted) [nats], {args.grid}x{args.grid} grid:")
    print(f"{'results':<20} {'all':>8} {'rare':>8} {'common':>8} {'frequent':>8}")
    for name, entry in summary.items():
        cells = ["       -" if entry[c] is None else f"{entry[c]:8.4f}"
                 for c in ("all", "rare", "common", "frequent")]
        print(f"{name:<20} " + " ".join(cells))
        if entry["skipped_detections"]:
            print(f"  ({entry['skipped_detections']} detections on images/categories not in "
                  f"--ann were ignored)")
    print(f"wrote {args.out}/kl.png, kl_groups.png, kl.csv, kl_summary.json")
    return summary
