"""Train and evaluate torchvision Mask R-CNN with GOL (or a baseline) on LVIS.

    python -m gumbel_kernels.train --config configs/demo_cpu.yaml --out runs/demo
    torchrun --nproc_per_node=8 -m gumbel_kernels.train --config configs/r50_2x_gol.yaml \
        --data-root data/coco --device cuda
    python -m gumbel_kernels.train --config ... --eval-only --checkpoint runs/x/checkpoint.pt

Writes OUT/log.jsonl (one line per iteration), OUT/checkpoint.pt (atomically, every
solver.checkpoint_every iterations, at the end and on Ctrl-C), OUT/results.json (LVIS results
format) and OUT/metrics.json (AP, APr, APc, APf, APb in percent), and prints the metric table.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
from typing import Optional, Sequence

import numpy as np
import torch

from .data import LVISDataset, build_train_sampler, build_transforms
from .data.synthetic import generate
from .detection import build_model
from .engine import distributed as dist_utils
from .engine.checkpoint import load_checkpoint
from .engine.config import load_config
from .engine.evaluator import evaluate
from .engine.trainer import train
from .losses import build_classification_loss

log = logging.getLogger("gumbel_kernels.train")

# --method presets: GOL is the whole recipe, the others only change the classification loss.
METHOD_PRESETS = {
    "gol": {"method.loss": "gol", "data.sampler": "rfs", "model.normalized_mask": True,
            "model.nms": 0.3},
}
FREQUENCY_LOSSES = ("eql", "droploss", "gol")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m gumbel_kernels.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (see configs/README.md)")
    parser.add_argument("--data-root", help="overrides data.root")
    parser.add_argument("--out", help="output folder (overrides output_dir)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--max-iters", type=int, help="stop after this many iterations")
    length.add_argument("--epochs", type=int, help="train this many epochs (schedule scaled)")
    parser.add_argument("--method", help="softmax | sigmoid | sigmoid_ce | gumbel | eql | "
                        "droploss | gol | gumbel_ce | federated[_gumbel] | eqlv2[_gumbel]; gol "
                        "also sets RFS, the normalized mask head and NMS 0.3")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--eval-only", action="store_true", help="only evaluate --checkpoint")
    parser.add_argument("--checkpoint", help="checkpoint to evaluate with --eval-only")
    parser.add_argument("--seed", type=int, help="overrides seed")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="more overrides, YAML values, e.g. solver.batch_size=4")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--no-eval", action="store_true", help="train only, skip evaluation")
    args = parser.parse_args(argv)
    if args.eval_only and not args.checkpoint:
        parser.error("--eval-only needs --checkpoint PATH")
    return args


def _overrides(args: argparse.Namespace) -> dict:
    import yaml
    out = {}
    if args.method:
        out.update(METHOD_PRESETS.get(args.method, {"method.loss": args.method}))
    if args.data_root:
        out["data.root"] = args.data_root
    if args.out:
        out["output_dir"] = args.out
    if args.max_iters is not None:
        out["solver.max_iters"] = args.max_iters
    if args.epochs is not None:
        out["solver.epochs"] = args.epochs
    if args.seed is not None:
        out["seed"] = args.seed
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        out[key] = yaml.safe_load(value)
    return out


def prepare_data(cfg: dict) -> dict:
    """Paths of the train/val json and image folders; generates the synthetic set if asked."""
    data = cfg["data"]
    root = data["root"]
    if data.get("synthetic"):
        train_json = os.path.join(root, "train.json")
        if dist_utils.is_main() and not os.path.exists(train_json):
            log.info("generating the synthetic LVIS-format dataset in %s", root)
            generate(root, **data["synthetic"])
        dist_utils.barrier()
        images = os.path.join(root, "images")
        return {"train_json": train_json, "val_json": os.path.join(root, "val.json"),
                "train_images": images, "val_images": images}
    paths = {key: os.path.normpath(os.path.join(root, data[key]))
             for key in ("train_json", "val_json", "train_images", "val_images")}
    for key, path in paths.items():
        if not os.path.exists(path):
            raise FileNotFoundError(f"data.{key}: {path} does not exist (data.root={root}; see "
                                    "the README for the LVIS layout)")
    return paths


def build_loss(cfg: dict, train_set: LVISDataset):
    """The config's classification loss; its class frequencies count the training images with
    annotations (GOL's official denominator). `method` keys left null take the loss's default."""
    method = {key: value for key, value in cfg["method"].items() if value is not None}
    name = method.pop("loss")
    if name not in FREQUENCY_LOSSES:
        method.pop("lambda_", None)
    return build_classification_loss(name, train_set.image_counts.tolist(),
                                     train_set.num_images_with_annotations, **method)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = load_config(args.config, _overrides(args))
    device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    distributed = dist_utils.init_distributed(device_name)
    device = torch.device(device_name, int(os.environ.get("LOCAL_RANK", 0))) \
        if device_name == "cuda" else torch.device("cpu")
    out_dir = cfg["output_dir"]
    os.makedirs(out_dir, exist_ok=True)
    _seed_everything(int(cfg["seed"]) + dist_utils.rank())
    if dist_utils.is_main():
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)

    paths = prepare_data(cfg)
    # Bitmap targets from masks cropped to their boxes: LVIS images with hundreds of instances
    # would cost gigabytes as full-resolution bitmaps resized as float.
    mask_format = "polygon" if cfg["model"]["mask_target"] == "polygon" else "cropped"
    train_set = LVISDataset(paths["train_json"], paths["train_images"],
                            transforms=build_transforms(True, cfg["data"]["flip_prob"]),
                            filter_empty=bool(cfg["data"]["filter_empty"]),
                            mask_format=mask_format)
    val_set = LVISDataset(paths["val_json"], paths["val_images"], with_masks=False)
    # Every image the run will read is looked up now, before the model is built.
    for needed, dataset in ((not args.eval_only, train_set), (not args.no_eval, val_set)):
        if needed:
            dataset.check_image_files()
    loss = build_loss(cfg, train_set)
    model = build_model(cfg["model"], train_set.num_classes, loss,
                        load_weights=not args.eval_only).to(device)
    log.info("%s: %d classes, %d training images, loss %s", args.config, train_set.num_classes,
             len(train_set), loss)

    if args.eval_only:
        state = load_checkpoint(args.checkpoint)
        model.load_state_dict(state["model"] if "model" in state else state)
    else:
        sampler = build_train_sampler(
            train_set, cfg["data"]["sampler"], threshold=cfg["data"]["rfs_threshold"],
            mode=cfg["data"]["rfs_mode"], seed=int(cfg["seed"]),
            num_replicas=dist_utils.world_size(), rank=dist_utils.rank())
        trained = model
        if distributed:
            trained = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        train(cfg, trained, train_set, sampler, device, out_dir, resume=args.resume,
              progress=not args.no_progress)
    if args.no_eval:
        dist_utils.cleanup()
        return {}
    metrics = evaluate(model, val_set, paths["val_json"], device, out_dir,
                       max_dets=int(cfg["eval"]["max_dets"]),
                       batch_size=int(cfg["eval"]["batch_size"]),
                       max_images=cfg["eval"]["max_images"], progress=not args.no_progress,
                       num_workers=int(cfg["data"]["num_workers"]))
    dist_utils.cleanup()
    return metrics


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt as stop:
        print(f"interrupted: {stop}", file=sys.stderr)
        sys.exit(130)
