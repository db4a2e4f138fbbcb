"""Train and evaluate torchvision Mask R-CNN with GOL (or a baseline) on LVIS.

    python -m gumbel_kernels.train --config configs/demo_cpu.yaml --out runs/demo
    torchrun --nproc_per_node=8 -m gumbel_kernels.train --config configs/r50_2x_gol.yaml \
        --data-root data/coco --device cuda
    python -m gumbel_kernels.train --config ... --eval-only --checkpoint runs/x/checkpoint.pt

Writes OUT/log.jsonl (one line per iteration: losses, lr, times, ETA, GPU memory),
OUT/checkpoint.pt (atomically, every solver.checkpoint_every iterations, at the end and on
Ctrl-C), OUT/snapshots/ (the model at the lr steps and the end, solver.snapshots),
OUT/tensorboard/ (when installed), OUT/results.json (LVIS results format), OUT/metrics.json
(AP, APr, APc, APf, APb in percent), OUT/loss_curve.png and OUT/ap_by_frequency.png, and
prints the metric table. A new run into a folder that holds an earlier run's files stops
unless --overwrite (delete them) or --resume (continue it) is given.

The config, the data (annotations, categories, evaluation fields, every image's size) and a
resumed checkpoint are checked before training starts; an error is one line (--debug: the
traceback). Under torchrun only rank 0 logs (--log-all-ranks: every rank).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import shutil
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from . import _cli
from .data import LVISDataset, build_train_sampler, build_transforms
from .data import validation as data_checks
from .data.synthetic import generate
from .detection import build_model
from .engine import distributed as dist_utils
from .engine.checkpoint import load_checkpoint
from .engine.config import ConfigError, load_config
from .engine.evaluator import SHARD_FOLDER, evaluate
from .engine.plots import AP_CHART, LOSS_CURVE, plot_run
from .engine.run_log import LOG_NAME, TENSORBOARD_DIR
from .engine.trainer import CHECKPOINT_NAME, SNAPSHOT_DIR, load_resume_state, train
from .losses import build_classification_loss

log = logging.getLogger("gumbel_kernels.train")

# --method presets: GOL is the whole recipe, the others only change the classification loss.
METHOD_PRESETS = {
    "gol": {"method.loss": "gol", "data.sampler": "rfs", "model.normalized_mask": True,
            "model.nms": 0.3},
}
FREQUENCY_LOSSES = ("eql", "droploss", "gol")
# What a run writes into OUT: a new run replaces all of them (--overwrite).
RUN_FILES = (CHECKPOINT_NAME, LOG_NAME, "config.json", "results.json", "metrics.json",
             LOSS_CURVE, AP_CHART, SNAPSHOT_DIR + "/", TENSORBOARD_DIR + "/",
             SHARD_FOLDER + "/")
RUN_EVIDENCE = (CHECKPOINT_NAME, LOG_NAME, "results.json", "metrics.json", SNAPSHOT_DIR + "/")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m gumbel_kernels.train", description=__doc__,
                                     formatter_class=_cli.HelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (see configs/README.md)")
    parser.add_argument("--data-root", help="overrides data.root")
    parser.add_argument("--out", help="output folder (overrides output_dir)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--max-iters", type=int, help="stop after this many iterations (a cap "
                        "on the schedule; 0: no training step, e.g. to evaluate the initial "
                        "model); overrides solver.max_iters")
    length.add_argument("--epochs", type=int, help="train this many epochs (schedule scaled)")
    parser.add_argument("--method", help="softmax | sigmoid | sigmoid_ce | gumbel | eql | "
                        "droploss | gol | gumbel_ce | federated[_gumbel] | eqlv2[_gumbel]; gol "
                        "also sets RFS, the normalized mask head and NMS 0.3")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in OUT from OUT/checkpoint.pt (only keys such as "
                        "solver.max_iters, solver.checkpoint_every and eval.* may change)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run in an OUT that holds an earlier run's files, "
                        "deleting them (" + ", ".join(RUN_FILES) + ")")
    parser.add_argument("--eval-only", action="store_true", help="only evaluate --checkpoint")
    parser.add_argument("--checkpoint", help="checkpoint to evaluate with --eval-only")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="load a --resume/--checkpoint file that holds pickled Python "
                        "objects (checkpoints of older versions). DANGEROUS: unpickling runs "
                        "whatever code the file contains; only for files you trust")
    parser.add_argument("--seed", type=int, help="overrides seed")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="more overrides, YAML values, e.g. solver.batch_size=4")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--no-eval", action="store_true", help="train only, skip evaluation")
    parser.add_argument("--log-all-ranks", action="store_true",
                        help="under torchrun, every rank logs (default: rank 0 only)")
    _cli.add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.eval_only and not args.checkpoint:
        parser.error("--eval-only needs --checkpoint PATH")
    if args.checkpoint and not args.eval_only:
        parser.error("--checkpoint is the file --eval-only evaluates; to continue training "
                     "use --resume (it reads OUT/checkpoint.pt)")
    if args.resume and (args.overwrite or args.eval_only):
        parser.error("--resume cannot be combined with --overwrite or --eval-only")
    return args


def _overrides(args: argparse.Namespace) -> Tuple[Dict[str, object], Dict[str, str]]:
    """({dotted key: value}, {dotted key: the flag that set it}) from the command line."""
    import yaml
    out: Dict[str, object] = {}
    origins: Dict[str, str] = {}

    def put(key: str, value, flag: str):
        out[key] = value
        origins[key] = flag

    if args.method:
        for key, value in METHOD_PRESETS.get(args.method, {"method.loss": args.method}).items():
            put(key, value, f"--method {args.method}")
    if args.data_root:
        put("data.root", args.data_root, "--data-root")
    if args.out:
        put("output_dir", args.out, "--out")
    if args.max_iters is not None:
        put("solver.max_iters", args.max_iters, "--max-iters")
    if args.epochs is not None:
        put("solver.epochs", args.epochs, "--epochs")
    if args.seed is not None:
        put("seed", args.seed, "--seed")
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. solver.batch_size=4")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise ConfigError(f"--set {item!r}: the value is not YAML "
                              f"({' '.join(str(error).split())})") from None
        put(key.strip(), parsed, f"--set {item}")
    return out, origins


def _setup_logging(args: argparse.Namespace) -> None:
    """INFO on rank 0; ERROR only on the other ranks unless --log-all-ranks (then each line
    says its rank). Python warnings go through logging, so they follow the same rule."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tag = f"[rank {rank}] " if world > 1 else ""
    level = logging.INFO if rank == 0 or args.log_all_ranks else logging.ERROR
    logging.basicConfig(level=level, format=f"%(asctime)s {tag}%(name)s: %(message)s")
    logging.getLogger().setLevel(level)  # also when logging was configured before
    logging.captureWarnings(True)


def _prepare_output_dir(out_dir: str, overwrite: bool) -> None:
    """A new run must not mix with an earlier run's files: refuse if OUT holds a trained or
    evaluated run (unless --overwrite), then delete what an earlier run or start-up left."""
    if not dist_utils.is_main():
        return
    found = [name for name in RUN_FILES if os.path.exists(os.path.join(out_dir, name))]
    if not overwrite and any(name in found for name in RUN_EVIDENCE):
        raise FileExistsError(
            f"{out_dir} holds an earlier run ({', '.join(found)}): --resume continues it, "
            f"--overwrite deletes those files and starts anew, or choose another --out")
    for name in found:
        path = os.path.join(out_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    if overwrite and found:
        log.warning("--overwrite: deleted the earlier run's %s in %s", ", ".join(found), out_dir)


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
    try:
        return build_classification_loss(name, train_set.image_counts.tolist(),
                                         train_set.num_images_with_annotations, **method)
    except TypeError as error:  # a method.* key this loss does not take
        unexpected = re.search(r"unexpected keyword argument '(\w+)'", str(error))
        if not unexpected:
            raise
        raise ConfigError(f"method.{unexpected.group(1)}: the loss {name!r} takes no such "
                          f"argument") from None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_data(train_set: LVISDataset, val_set: LVISDataset, cfg: dict, *, training: bool,
               evaluating: bool, progress: bool) -> None:
    """The start-up checks of gumbel_kernels.data.validation for what this run will read: every
    image path is resolved (a missing file fails now, not after training); with
    data.check_images every header is read too, split across ranks."""
    if training:
        data_checks.check_has_annotations(train_set)
    data_checks.check_same_categories(train_set, val_set)
    if evaluating:
        data_checks.check_evaluation_fields(val_set)
    for dataset, needed in ((train_set, training), (val_set, evaluating)):
        if not needed:
            continue
        if not cfg["data"]["check_images"]:
            dataset.check_image_files()
            continue
        entries = data_checks.dataset_image_entries(dataset)
        mine = entries[dist_utils.rank()::dist_utils.world_size()]
        data_checks.check_image_files(mine, dataset.ann_file,
                                      progress=progress and dist_utils.is_main())


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    _setup_logging(args)
    overrides, origins = _overrides(args)
    cfg = load_config(args.config, overrides, origins)
    device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    out_dir = cfg["output_dir"]
    resume_state = None
    if args.resume:  # before anything slow: a wrong checkpoint or config fails at once
        resume_state = load_resume_state(os.path.join(out_dir, CHECKPOINT_NAME), cfg,
                                         allow_pickle=args.allow_pickle)
    eval_state = None
    if args.eval_only:
        eval_state = load_checkpoint(args.checkpoint, allow_pickle=args.allow_pickle)
    distributed = dist_utils.init_distributed(device_name)
    device = torch.device(device_name, int(os.environ.get("LOCAL_RANK", 0))) \
        if device_name == "cuda" else torch.device("cpu")
    os.makedirs(out_dir, exist_ok=True)
    if not (args.resume or args.eval_only):
        _prepare_output_dir(out_dir, args.overwrite)
    elif args.eval_only and not args.no_eval:
        replaced = [n for n in ("results.json", "metrics.json")
                    if os.path.exists(os.path.join(out_dir, n))]
        if replaced:
            log.info("--eval-only: replacing %s in %s", ", ".join(replaced), out_dir)
    dist_utils.barrier()
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
    # Every image the run will read is checked now, before the model is built.
    check_data(train_set, val_set, cfg, training=not args.eval_only, evaluating=not args.no_eval,
               progress=not args.no_progress)
    loss = build_loss(cfg, train_set)
    model = build_model(cfg["model"], train_set.num_classes, loss,
                        load_weights=not args.eval_only).to(device)
    log.info("%s: %d classes, %d training images, loss %s", args.config, train_set.num_classes,
             len(train_set), loss)

    if eval_state is not None:
        model.load_state_dict(eval_state["model"] if "model" in eval_state else eval_state)
    else:
        sampler = build_train_sampler(
            train_set, cfg["data"]["sampler"], threshold=cfg["data"]["rfs_threshold"],
            mode=cfg["data"]["rfs_mode"], seed=int(cfg["seed"]),
            num_replicas=dist_utils.world_size(), rank=dist_utils.rank())
        trained = model
        if distributed:
            trained = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        train(cfg, trained, train_set, sampler, device, out_dir, resume_state=resume_state,
              progress=not args.no_progress)
    metrics: dict = {}
    if not args.no_eval:
        metrics = evaluate(model, val_set, paths["val_json"], device, out_dir,
                           max_dets=int(cfg["eval"]["max_dets"]),
                           batch_size=int(cfg["eval"]["batch_size"]),
                           max_images=cfg["eval"]["max_images"], progress=not args.no_progress,
                           num_workers=int(cfg["data"]["num_workers"]))
    if dist_utils.is_main():
        _report_outputs(out_dir)
    dist_utils.cleanup()
    return metrics


def _report_outputs(out_dir: str) -> None:
    """Plots the run (matplotlib permitting) and says where every output is."""
    try:
        plot_run([out_dir])
    except (ImportError, ValueError) as error:  # no matplotlib; nothing trained or evaluated
        log.warning("no plots: %s", error)
    written = [name for name in RUN_FILES if os.path.exists(os.path.join(out_dir, name))]
    print(f"outputs in {os.path.abspath(out_dir)}/: {', '.join(written)}", flush=True)


if __name__ == "__main__":
    raise SystemExit(_cli.run(main))
