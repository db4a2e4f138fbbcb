"""Memory and time of the harness at LVIS scale, on generated data (no LVIS, no model needed).

    python -m gumbel_kernels.tools.scale_check eval [--images 2000] [--dets 300]
        [--postprocess-images 40] [--device cpu|cuda] [--out DIR]
    python -m gumbel_kernels.tools.scale_check train-masks [--instances 300] [--device cpu|cuda]

`eval` generates an LVIS v1-like val json (1203 categories, 337/461/405 rare/common/frequent,
COCO-sized images with ~12 polygon instances, neg / not-exhaustive lists) and synthetic
detections of a Mask R-CNN (300 per image: boxes near the objects and elsewhere, 28 x 28 mask
probabilities, Gumbel-like scores), then measures, each step in a fresh process (peak RSS is
per process):
  1. post-processing of --postprocess-images images as the evaluator does it (masks pasted in
     chunks, binarised and run-length encoded on --device) against the previous way (every
     mask pasted at full resolution as float, copied to the host, encoded by pycocotools);
  2. rank 0's part for all --images: the per-rank result shards (written by the generator)
     merged into results.json, then LVIS mask + box AP by faster-coco-eval.
`train-masks` measures the ground-truth masks of one LVIS-like training image (640 x 480,
--instances objects, resized to 800 x 1067 by the model): full-resolution bitmaps resized as
float (torchvision's transform), against the cropped bitmaps of mask_format="cropped" with the
same RoIAlign targets (gumbel_kernels.detection.mask_targets).
Each prints a table and a json line with the numbers.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

NUM_CLASSES = 1203
GROUPS = (("r", 337), ("c", 461), ("f", 405))  # LVIS v1's rare / common / frequent classes
IMAGE_SIZES = ((480, 640), (640, 480), (427, 640), (640, 427), (512, 640), (612, 612))
MASK_SIZE = 28


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ------------------------------------------------------------------------ generated data --

def _ellipse(cx, cy, rx, ry, vertices=16) -> List[float]:
    angles = np.linspace(0, 2 * math.pi, vertices, endpoint=False)
    return np.stack([cx + rx * np.cos(angles), cy + ry * np.sin(angles)], 1).ravel().tolist()


def lvis_like_val(num_images: int, seed: int = 0) -> dict:
    """An LVIS v1-format val json with the real set's shape (module docstring)."""
    rng = np.random.default_rng(seed)
    categories, weights = [], []
    for group, count in GROUPS:
        for _ in range(count):
            image_count = {"r": rng.integers(1, 11), "c": rng.integers(11, 101),
                           "f": rng.integers(101, 5000)}[group]
            categories.append({"id": len(categories) + 1, "name": f"c{len(categories) + 1}",
                               "frequency": group, "image_count": int(image_count)})
            weights.append(float(image_count))
    weights = np.asarray(weights) / sum(weights)
    images, annotations = [], []
    for index in range(num_images):
        height, width = IMAGE_SIZES[index % len(IMAGE_SIZES)]
        image_id = 100000 + index
        present = set()
        for _ in range(max(1, int(rng.poisson(12.4)))):
            category = int(rng.choice(NUM_CLASSES, p=weights)) + 1
            rx, ry = rng.uniform(6, width / 4), rng.uniform(6, height / 4)
            cx, cy = rng.uniform(rx, width - rx), rng.uniform(ry, height - ry)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": category,
                                "bbox": [cx - rx, cy - ry, 2 * rx, 2 * ry],
                                "area": math.pi * rx * ry,
                                "segmentation": [_ellipse(cx, cy, rx, ry)]})
            present.add(category)
        absent = [c for c in rng.choice(NUM_CLASSES, 12, replace=False) + 1 if c not in present]
        images.append({"id": image_id, "height": height, "width": width,
                       "coco_url": f"http://images.cocodataset.org/val2017/{image_id:012d}.jpg",
                       "neg_category_ids": [int(c) for c in absent[:8]],
                       "not_exhaustive_category_ids": [int(c) for c in list(present)[:1]]
                       if rng.random() < 0.3 else []})
    return {"info": {}, "licenses": [], "images": images, "annotations": annotations,
            "categories": categories}


def synthetic_detections(image: dict, anns: List[dict], dets: int, rng) -> Dict[str, torch.Tensor]:
    """A Mask R-CNN's output for one image before pasting: boxes (a third near the objects, with
    their class half the time), descending Gumbel-like scores, contiguous labels, and (K, 1,
    28, 28) blob-shaped mask probabilities."""
    height, width = image["height"], image["width"]
    boxes = np.empty((dets, 4))
    labels = rng.integers(0, NUM_CLASSES, dets)
    near = min(dets, max(1, dets // 3))
    for k in range(dets):
        if k < near and anns:
            ann = anns[k % len(anns)]
            x, y, w, h = ann["bbox"]
            jitter = rng.normal(0, 0.1, 4) * [w, h, w, h]
            boxes[k] = [x + jitter[0], y + jitter[1], x + w + jitter[2], y + h + jitter[3]]
            if rng.random() < 0.5:
                labels[k] = ann["category_id"] - 1
        else:
            w, h = rng.uniform(8, width / 2), rng.uniform(8, height / 2)
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            boxes[k] = [x, y, x + w, y + h]
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    grid = (np.arange(MASK_SIZE) + 0.5) / MASK_SIZE * 2 - 1
    centre = rng.normal(0, 0.1, (dets, 2))
    radius = rng.uniform(0.5, 0.95, (dets, 2))
    r2 = ((grid[None, None, :] - centre[:, 0, None, None]) / radius[:, 0, None, None]) ** 2 + \
         ((grid[None, :, None] - centre[:, 1, None, None]) / radius[:, 1, None, None]) ** 2
    masks = 1 / (1 + np.exp(-(1 - r2) * 6))
    scores = np.sort(np.exp(-np.exp(-rng.normal(-1.5, 1.2, dets))))[::-1].copy()
    return {"boxes": torch.tensor(boxes, dtype=torch.float32),
            "scores": torch.tensor(scores, dtype=torch.float32),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": torch.tensor(masks, dtype=torch.float32)[:, None]}


def _per_image(data: dict) -> Dict[int, List[dict]]:
    out: Dict[int, List[dict]] = {im["id"]: [] for im in data["images"]}
    for ann in data["annotations"]:
        out[ann["image_id"]].append(ann)
    return out


def write_result_shards(data: dict, dets: int, out_dir: str, ranks: int, seed: int = 1) -> int:
    """The evaluator's per-rank shards (OUT/eval_shards/) for every image, with each detection's
    mask as the RLE of an ellipse in its box (pycocotools; what pasting a blob gives, without a
    model)."""
    from pycocotools import mask as mask_utils

    from ..engine.evaluator import shard_path
    from ..evaluation import image_results

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.dirname(shard_path(out_dir, 0)), exist_ok=True)
    shards = [open(shard_path(out_dir, r), "w") for r in range(ranks)]
    anns = _per_image(data)
    cat_ids = [c["id"] for c in data["categories"]]
    total = 0
    for index, image in enumerate(data["images"]):
        out = synthetic_detections(image, anns[image["id"]], dets, rng)
        polygons = [_ellipse((x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) * 0.4, (y2 - y1) * 0.4)
                    for x1, y1, x2, y2 in out["boxes"].tolist()]
        rles = mask_utils.frPyObjects(polygons, image["height"], image["width"])
        for rle in rles:
            rle["counts"] = rle["counts"].decode("ascii")
        records = image_results(image["id"], out["boxes"], out["scores"], out["labels"], cat_ids,
                                rles)
        shards[index % ranks].write(f"{image['id']}\t{json.dumps(records)}\n")
        total += len(records)
    for shard in shards:
        shard.close()
    return total


# ------------------------------------------------------------------------------- phases --

def phase_postprocess(gt_json: str, images: int, dets: int, device: str, way: str) -> dict:
    """Post-processing of `images` images, the evaluator's way ("chunked") or the old one."""
    from ..engine.evaluator import paste_and_encode
    from ..evaluation import detections_to_lvis_results, image_results
    from ..detection.transform import paste_masks

    with open(gt_json) as f:
        data = json.load(f)
    anns = _per_image(data)
    cat_ids = [c["id"] for c in data["categories"]]
    rng = np.random.default_rng(2)
    target = torch.device(device)
    work = [(image, synthetic_detections(image, anns[image["id"]], dets, rng))
            for image in data["images"][:images]]
    del data, anns
    base = peak_rss_mib()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start, cpu_start = time.perf_counter(), time.process_time()
    count = 0
    for image, out in work:
        out = {k: v.to(target) for k, v in out.items()}
        size = (image["height"], image["width"])
        if way == "chunked":
            rles = paste_and_encode(out["masks"], out["boxes"], size, "grid_sample")
            records = image_results(image["id"], out["boxes"], out["scores"], out["labels"],
                                    cat_ids, rles)
        else:  # the model pasted every mask, the evaluator moved them to the host
            out["masks"] = paste_masks(out["masks"], out["boxes"], size, "grid_sample")
            host = {k: v.cpu() for k, v in out.items()}
            records = detections_to_lvis_results([host], [image["id"]], cat_ids)
        count += len(records)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    result = {"way": way, "images": images, "detections": count, "device": device,
              "seconds_per_image": seconds / images, "cpu_seconds_per_image": cpu_seconds / images,
              "peak_rss_mib": peak_rss_mib(),
              "rss_before_mib": base}
    if device == "cuda":
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return result


def phase_evaluate(gt_json: str, out_dir: str, ranks: int) -> dict:
    """Rank 0's part: merge the shards, evaluate masks and boxes."""
    from ..engine.evaluator import merge_shards
    from ..evaluation import evaluate_lvis

    base = peak_rss_mib()
    start, cpu_start = time.perf_counter(), time.process_time()
    results_json, image_ids, count = merge_shards(out_dir, ranks)
    merged, cpu_merged = time.perf_counter(), time.process_time()
    after_merge = peak_rss_mib()
    metrics = evaluate_lvis(gt_json, results_json, iou_types=("segm", "bbox"), max_dets=300)
    done, cpu_done = time.perf_counter(), time.process_time()
    return {"images": len(set(image_ids)), "detections": count,
            "merge_seconds": merged - start, "eval_seconds": done - merged,
            "merge_cpu_seconds": cpu_merged - cpu_start, "eval_cpu_seconds": cpu_done - cpu_merged,
            "rss_at_start_mib": base, "peak_rss_after_merge_mib": after_merge,
            "peak_rss_mib": peak_rss_mib(), "AP": metrics["AP"], "APb": metrics["APb"],
            "results_json_mib": os.path.getsize(os.path.join(out_dir, "results.json")) / 2 ** 20}


def _run_phase(args: List[str]) -> dict:
    """A phase in a fresh interpreter (so that its peak RSS is its own)."""
    command = [sys.executable, "-m", "gumbel_kernels.tools.scale_check", "_phase"] + args
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_eval(images: int, dets: int, postprocess_images: int, device: str, out: str,
               ranks: int = 8, run_phase=_run_phase) -> dict:
    os.makedirs(out, exist_ok=True)
    gt_json = os.path.join(out, "val.json")
    start = time.perf_counter()
    data = lvis_like_val(images)
    with open(gt_json, "w") as f:
        json.dump(data, f)
    written = write_result_shards(data, dets, out, ranks)
    del data
    generated = time.perf_counter() - start
    report = {"generated": {"images": images, "detections": written, "seconds": generated},
              "idle_rss_mib": run_phase(["idle"])["peak_rss_mib"]}
    for way in ("chunked", "full_float_to_host"):
        report[way] = run_phase(["postprocess", gt_json, str(postprocess_images), str(dets),
                                 device, way])
    report["rank0_merge_and_eval"] = run_phase(["evaluate", gt_json, out, str(ranks)])
    return report


def format_eval(report: dict) -> str:
    e = report["rank0_merge_and_eval"]
    lines = [f"generated {report['generated']['images']} images x "
             f"{report['generated']['detections'] // report['generated']['images']} detections "
             f"in {report['generated']['seconds']:.0f} s; idle interpreter "
             f"{report['idle_rss_mib']:.0f} MiB"]
    for way in ("chunked", "full_float_to_host"):
        p = report[way]
        gpu = f", peak GPU {p['peak_gpu_mib']:.0f} MiB" if "peak_gpu_mib" in p else ""
        lines.append(f"post-process ({way}, {p['device']}, {p['images']} images): "
                     f"{p['seconds_per_image'] * 1000:.0f} ms/image (CPU time "
                     f"{p['cpu_seconds_per_image'] * 1000:.0f} ms), peak RSS "
                     f"{p['peak_rss_mib']:.0f} MiB (inputs {p['rss_before_mib']:.0f}){gpu}")
    lines.append(f"rank 0: merge {e['detections']} results of {e['images']} images "
                 f"{e['merge_seconds']:.1f} s (CPU {e['merge_cpu_seconds']:.1f} s; results.json "
                 f"{e['results_json_mib']:.0f} MiB), LVIS segm + bbox eval "
                 f"{e['eval_seconds']:.1f} s (CPU {e['eval_cpu_seconds']:.1f} s), peak RSS "
                 f"{e['peak_rss_mib']:.0f} MiB (after merge {e['peak_rss_after_merge_mib']:.0f}); "
                 f"AP {e['AP']:.2f}, APb {e['APb']:.2f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------ training masks --

def lvis_like_train_image(instances: int, seed: int = 0) -> dict:
    """One 480 x 640 training image with `instances` polygon objects of LVIS-like sizes (most
    small), as an LVIS json."""
    rng = np.random.default_rng(seed)
    height, width = 480, 640
    annotations = []
    for k in range(instances):
        side = float(rng.choice([12, 24, 48, 96, 200, 400], p=[0.35, 0.3, 0.15, 0.1, 0.07, 0.03]))
        rx, ry = side / 2 * rng.uniform(0.6, 1.0), side / 2 * rng.uniform(0.6, 1.0)
        cx, cy = rng.uniform(rx, width - rx), rng.uniform(ry, height - ry)
        annotations.append({"id": k + 1, "image_id": 1, "category_id": 1 + k % 10,
                            "bbox": [cx - rx, cy - ry, 2 * rx, 2 * ry], "area": math.pi * rx * ry,
                            "segmentation": [_ellipse(cx, cy, rx, ry)]})
    return {"images": [{"id": 1, "height": height, "width": width, "file_name": "1.jpg"}],
            "annotations": annotations,
            "categories": [{"id": c, "name": f"c{c}", "image_count": 1, "frequency": "r"}
                           for c in range(1, 11)]}


def phase_train_masks(ann_file: str, mask_format: str, device: str) -> dict:
    """The ground-truth masks of one image from the dataset to the mask targets of 128
    positive RoIs (512 sampled x 0.25), with the model's resize to 800 x 1067."""
    from ..data import LVISDataset
    from ..detection.mask_targets import mask_targets
    from ..detection.transform import GOLTransform
    from ..engine.trainer import _to_torchvision_target

    target_device = torch.device(device)
    dataset = LVISDataset(ann_file, os.path.dirname(ann_file), mask_format=mask_format)
    image = torch.rand(3, 480, 640)
    transform = GOLTransform((800,), 1333, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]).train()
    base = peak_rss_mib()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start, cpu_start = time.perf_counter(), time.process_time()
    target = dataset.get_target(0)  # in a data-loader worker
    stored = target["masks"].numel() if mask_format == "bitmap" else target["mask_crops"].nbytes()
    target = _to_torchvision_target(target, target_device)
    images, targets = transform([image.to(target_device)], [target])
    shape = images.image_sizes[0]
    g = torch.Generator().manual_seed(0)
    matched = torch.randint(0, len(targets[0]["boxes"]), (128,), generator=g).to(target_device)
    gt = targets[0]["boxes"][matched]
    size = (gt[:, 2:] - gt[:, :2]).repeat(1, 2)
    proposals = gt + (torch.rand(gt.shape, generator=g).to(target_device) - 0.5) * 0.2 * size
    result = mask_targets("bitmap", [proposals], [matched], targets, [shape], 28)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    out = {"mask_format": mask_format, "instances": len(target["labels"]),
           "device": device, "model_size": list(shape), "stored_mib": stored / 2 ** 20,
           "seconds": seconds, "cpu_seconds": cpu_seconds, "peak_rss_mib": peak_rss_mib(),
           "rss_before_mib": base,
           "targets": list(result.shape), "target_checksum": float(result.sum())}
    if device == "cuda":
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


def check_train_masks(instances: int, device: str, out: str, run_phase=_run_phase) -> dict:
    os.makedirs(out, exist_ok=True)
    ann_file = os.path.join(out, "train_image.json")
    with open(ann_file, "w") as f:
        json.dump(lvis_like_train_image(instances), f)
    return {way: run_phase(["train_masks", ann_file, way, device])
            for way in ("bitmap", "cropped")}


def format_train_masks(report: dict) -> str:
    lines = []
    for way, p in report.items():
        gpu = f", peak GPU {p['peak_gpu_mib']:.0f} MiB" if "peak_gpu_mib" in p else ""
        lines.append(f"{way}: {p['instances']} instances, stored {p['stored_mib']:.1f} MiB, "
                     f"peak RSS {p['peak_rss_mib'] - p['rss_before_mib']:.0f} MiB above the "
                     f"start{gpu}, {p['seconds'] * 1000:.0f} ms (CPU "
                     f"{p['cpu_seconds'] * 1000:.0f} ms; model size "
                     f"{p['model_size'][0]}x{p['model_size'][1]}); targets sum "
                     f"{p['target_checksum']:.1f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gumbel_kernels.tools.scale_check",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("eval", help="post-processing and rank-0 evaluation at LVIS scale")
    ev.add_argument("--images", type=int, default=2000)
    ev.add_argument("--dets", type=int, default=300)
    ev.add_argument("--postprocess-images", type=int, default=40)
    ev.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ev.add_argument("--out", help="work folder (default: a temporary one)")
    tm = sub.add_parser("train-masks", help="ground-truth mask memory of one training image")
    tm.add_argument("--instances", type=int, default=300)
    tm.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    tm.add_argument("--out", help="work folder (default: a temporary one)")
    hidden = sub.add_parser("_phase")
    hidden.add_argument("phase_args", nargs="+")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.command == "_phase":
        name, *rest = args.phase_args
        if name == "idle":
            import gumbel_kernels.engine.evaluator  # noqa: F401 (what every phase imports)
            result = {"peak_rss_mib": peak_rss_mib()}
        elif name == "postprocess":
            result = phase_postprocess(rest[0], int(rest[1]), int(rest[2]), rest[3], rest[4])
        elif name == "train_masks":
            result = phase_train_masks(rest[0], rest[1], rest[2])
        else:
            result = phase_evaluate(rest[0], rest[1], int(rest[2]))
        print(json.dumps(result))
        return result
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or scratch
        if args.command == "eval":
            report = check_eval(args.images, args.dets, args.postprocess_images, args.device, out)
            print(format_eval(report))
        else:
            report = check_train_masks(args.instances, args.device, out)
            print(format_train_masks(report))
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
