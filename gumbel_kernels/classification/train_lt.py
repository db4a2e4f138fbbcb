"""Long-tailed classification with decoupled classifier re-training (GOL paper, Table 4).

    python -m gumbel_kernels.classification.train_lt (--data-root DIR | --synthetic)
        [--imbalance 100] [--epochs E1] [--stage2-epochs E2] [--stage2-loss gumbel|softmax]
        [--stage2-sampler balanced|instance] [--depth 32] [--width 16] --out DIR

Stage 1 trains a CIFAR ResNet (ResNet-32 by default) end to end with softmax cross-entropy and
instance-balanced sampling. Stage 2 (classifier re-training, "cRT", Kang et al., ICLR 2020)
freezes the backbone (its parameters and its BatchNorm statistics), re-initialises the linear
classifier and trains only it, with class-balanced sampling by default (a class drawn uniformly,
then one of its images uniformly), using either
- "gumbel": GOL's Gumbel binary cross-entropy over the C-way head, the label being the positive
  column (`gumbel_kernels.gol_loss(..., mode="bce", activation="gumbel")`); the bias starts at
  -log(log C) so that every class starts at the Gumbel score exp(-exp(-b)) = 1/C, or
- "softmax": cross-entropy (bias 0).
Both stages use SGD (momentum 0.9), a cosine learning-rate schedule (stage 1 with a linear
warm-up), random 4-pixel-padded crops and horizontal flips. Top-1 is the argmax of the logits
(the same for softmax, sigmoid and Gumbel scores: all are increasing in the logit).

The data is CIFAR-100-LT from a local torchvision-format copy under --data-root (an error if
it holds none: a typo must not train on other data), or the generated
`SyntheticLTClassification` with --synthetic. See cifar_lt.py for the long-tail rule.

Output: a top-1 table (overall; many: > 100 training images, medium: 20-100, few: < 20) on
stdout, OUT/metrics.json (both stages: group accuracies, per-class accuracies, class counts,
arguments), OUT/stage1.pt (model state dict; reuse it with --stage1-checkpoint to compare
stage-2 losses on the same backbone) and OUT/stage2.pt, checkpoints with a verified checksum
that load with weights_only=True (gumbel_kernels.engine.checkpoint).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - tqdm is a declared dependency
    def tqdm(iterable, **_):
        return iterable

from .. import gol_loss
from .._cli import HelpFormatter, add_debug_flag, run
from ..engine.checkpoint import load_checkpoint, save_checkpoint
from .cifar_lt import (GROUPS, LTClassificationData, SyntheticLTClassification,
                       cifar100_available, class_groups, load_cifar100_lt)
from .models import CifarResNet, resnet_cifar

__all__ = ["build_parser", "main", "load_data", "train_stage1", "train_stage2", "evaluate",
           "format_table", "class_balanced_indices", "stage2_loss"]


# ------------------------------------------------------------------------------------ data --

def load_data(args) -> LTClassificationData:
    if args.synthetic:
        return SyntheticLTClassification(args.num_classes, args.imbalance, args.n_max,
                                         test_per_class=args.test_per_class,
                                         image_size=args.image_size, seed=args.seed)
    if not cifar100_available(args.data_root):
        raise FileNotFoundError(f"--data-root {args.data_root}: no CIFAR-100 copy in "
                                f"torchvision's format there (it needs cifar-100-python/train "
                                f"and cifar-100-python/test); --synthetic trains on generated data")
    return load_cifar100_lt(args.data_root, args.imbalance, args.n_max)


class _Normalizer:
    """uint8 (B, 3, H, W) -> normalised float32, with optional crop+flip augmentation."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, device: torch.device):
        self.mean = mean.view(1, 3, 1, 1).to(device)
        self.std = std.view(1, 3, 1, 1).to(device)
        self.device = device

    def __call__(self, images: torch.Tensor, augment: bool,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True).to(torch.float32) / 255.0
        x = (x - self.mean) / self.std
        if augment:
            x = _random_crop_flip(x, 4, generator)
        return x


def _random_crop_flip(x: torch.Tensor, pad: int, generator: Optional[torch.Generator]):
    """Zero-pad by `pad`, crop back at a random offset, flip horizontally with p = 0.5."""
    n, _, h, w = x.shape
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = (offsets[:, 0, None] + torch.arange(h)[None]).to(x.device)  # (n, h)
    cols = (offsets[:, 1, None] + torch.arange(w)[None])
    cols = torch.where(flips[:, None], cols.flip(1), cols).to(x.device)  # (n, w)
    batch = torch.arange(n, device=x.device)[:, None, None]
    # (n, h, w, c) advanced indexing, then back to (n, c, h, w)
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def class_balanced_indices(labels: torch.Tensor, num_classes: int, num_samples: int,
                           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Class-balanced sampling: each draw takes a class uniformly (among the classes with
    training images), then one of its images uniformly."""
    counts = torch.bincount(labels, minlength=num_classes)
    present = torch.nonzero(counts > 0).flatten()
    order = torch.argsort(labels, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    classes = present[torch.randint(0, present.numel(), (num_samples,), generator=generator)]
    within = (torch.rand(num_samples, generator=generator, dtype=torch.float64)
              * counts[classes]).long()
    return order[starts[classes] + within]


def _epoch_indices(labels: torch.Tensor, num_classes: int, sampler: str,
                   generator: torch.Generator) -> torch.Tensor:
    if sampler == "balanced":
        return class_balanced_indices(labels, num_classes, labels.numel(), generator)
    return torch.randperm(labels.numel(), generator=generator)


# ---------------------------------------------------------------------------------- losses --

def stage2_loss(name: str):
    """The stage-2 loss by name: (logits (B, C), labels (B,)) -> scalar."""
    if name == "gumbel":
        return lambda logits, labels: gol_loss(logits, labels, mode="bce", activation="gumbel")
    if name == "softmax":
        return lambda logits, labels: F.cross_entropy(logits, labels)
    raise ValueError(f"unknown stage-2 loss {name!r}; expected 'gumbel' or 'softmax'")


def _reset_classifier(classifier: nn.Linear, loss: str) -> None:
    classifier.reset_parameters()
    num_classes = classifier.out_features
    if loss == "gumbel" and num_classes > 1:
        # Gumbel prior: exp(-exp(-b)) = 1/C, i.e. b = -log(log C).
        nn.init.constant_(classifier.bias, -math.log(math.log(num_classes)))
    else:
        nn.init.zeros_(classifier.bias)


def _lr_at(step: int, total: int, base_lr: float, warmup: int) -> float:
    if warmup and step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(1.0, progress)))


# -------------------------------------------------------------------------------- training --

def _run_epochs(model: CifarResNet, params, data: LTClassificationData, norm: _Normalizer,
                loss_fn, *, epochs: int, lr: float, weight_decay: float, batch_size: int,
                sampler: str, warmup_epochs: int, frozen_backbone: bool, seed: int,
                progress: bool, stage: str, augment: bool) -> List[float]:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    n = data.train_labels.numel()
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total_steps = epochs * steps_per_epoch
    warmup_steps = warmup_epochs * steps_per_epoch
    step, epoch_losses = 0, []
    for epoch in range(epochs):
        if frozen_backbone:
            model.eval()  # BatchNorm statistics stay those of stage 1
        else:
            model.train()
        indices = _epoch_indices(data.train_labels, data.num_classes, sampler, generator)
        batches = indices.split(batch_size)
        total, count = 0.0, 0
        bar = tqdm(batches, desc=f"{stage} epoch {epoch + 1}/{epochs}", disable=not progress,
                   leave=False, file=sys.stderr)
        for batch in bar:
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, total_steps, lr, warmup_steps)
            x = norm(data.train_images[batch], augment, generator)
            y = data.train_labels[batch].to(norm.device)
            if frozen_backbone:
                with torch.no_grad():
                    features = model.features(x)
                logits = model.classifier(features)
            else:
                logits = model(x)
            loss = loss_fn(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            total += float(loss.detach()) * len(batch)
            count += len(batch)
            if progress:
                bar.set_postfix(loss=f"{total / count:.4f}")
        epoch_losses.append(total / max(1, count))
    return epoch_losses


def train_stage1(model: CifarResNet, data: LTClassificationData, norm: _Normalizer, args,
                 progress: bool = True) -> List[float]:
    """End-to-end training with softmax cross-entropy and instance-balanced sampling."""
    return _run_epochs(model, model.parameters(), data, norm, stage2_loss("softmax"),
                       epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                       batch_size=args.batch_size, sampler="instance",
                       warmup_epochs=min(args.warmup_epochs, max(0, args.epochs - 1)),
                       frozen_backbone=False, seed=args.seed, progress=progress, stage="stage1",
                       augment=not args.no_augment)


def train_stage2(model: CifarResNet, data: LTClassificationData, norm: _Normalizer, args,
                 progress: bool = True) -> List[float]:
    """cRT: frozen backbone, re-initialised classifier trained alone with the stage-2 loss."""
    for p in model.backbone_parameters():
        p.requires_grad_(False)
    _reset_classifier(model.classifier, args.stage2_loss)
    return _run_epochs(model, model.classifier.parameters(), data, norm,
                       stage2_loss(args.stage2_loss), epochs=args.stage2_epochs,
                       lr=args.stage2_lr, weight_decay=args.stage2_weight_decay,
                       batch_size=args.batch_size, sampler=args.stage2_sampler, warmup_epochs=0,
                       frozen_backbone=True, seed=args.seed + 1, progress=progress,
                       stage="stage2", augment=not args.no_augment)


@torch.no_grad()
def evaluate(model: CifarResNet, data: LTClassificationData, norm: _Normalizer,
             batch_size: int = 512) -> Dict:
    """Top-1 (%) overall and per group (many/medium/few), and per class."""
    model.eval()
    correct = torch.zeros(data.num_classes, dtype=torch.int64)
    seen = torch.zeros(data.num_classes, dtype=torch.int64)
    for start in range(0, data.test_labels.numel(), batch_size):
        x = norm(data.test_images[start:start + batch_size], augment=False)
        y = data.test_labels[start:start + batch_size]
        pred = model(x).argmax(dim=1).cpu()
        correct += torch.bincount(y[pred == y], minlength=data.num_classes)
        seen += torch.bincount(y, minlength=data.num_classes)
    per_class = [100.0 * int(c) / int(s) if s else None for c, s in zip(correct, seen)]
    result = {"overall": 100.0 * int(correct.sum()) / max(1, int(seen.sum()))}
    for group, classes in class_groups(data.class_counts).items():
        total = int(seen[classes].sum()) if classes else 0
        result[group] = 100.0 * int(correct[classes].sum()) / total if total else None
    return {"top1": result, "per_class_top1": per_class}


def format_table(title: str, rows: Dict[str, Dict[str, Optional[float]]]) -> str:
    """A plain-text top-1 table: one row per stage, columns overall/many/medium/few."""
    columns = ("overall",) + GROUPS
    width = max(len("method"), *(len(name) for name in rows))
    lines = [title, f"{'method':<{width}}  " + "  ".join(f"{c:>7}" for c in columns)]
    for name, top1 in rows.items():
        cells = ["      -" if top1.get(c) is None else f"{top1[c]:7.2f}" for c in columns]
        lines.append(f"{name:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- CLI --

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gumbel_kernels.classification.train_lt",
        description="CIFAR-100-LT: stage-1 softmax training, stage-2 classifier re-training "
                    "(decoupling) with Gumbel or softmax (GOL Table 4).",
        formatter_class=HelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--data-root", help="folder holding torchvision's cifar-100-python/")
    src.add_argument("--synthetic", action="store_true", help="generated long-tailed data")
    parser.add_argument("--require-data", action="store_true",
                        help="accepted for old scripts: a --data-root without CIFAR-100 is "
                        "always an error now")
    parser.add_argument("--imbalance", type=float, default=100.0, help="n_max / n_min (the paper: 50, 100, 200)")
    parser.add_argument("--n-max", type=int, default=500, help="images of the largest class")
    parser.add_argument("--num-classes", type=int, default=100, help="(synthetic only)")
    parser.add_argument("--image-size", type=int, default=32, help="(synthetic only)")
    parser.add_argument("--test-per-class", type=int, default=100, help="(synthetic only)")
    parser.add_argument("--depth", type=int, default=32, help="ResNet depth, 6n+2")
    parser.add_argument("--width", type=int, default=16, help="channels of the first stage")
    parser.add_argument("--epochs", type=int, default=200, help="stage-1 epochs")
    parser.add_argument("--lr", type=float, default=0.1, help="stage-1 peak learning rate")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="stage-1 weight decay")
    parser.add_argument("--warmup-epochs", type=int, default=5,
                        help="stage-1 linear warm-up epochs")
    parser.add_argument("--stage2-epochs", type=int, default=10,
                        help="classifier re-training epochs")
    parser.add_argument("--stage2-loss", choices=("gumbel", "softmax"), default="gumbel",
                        help="loss of the re-trained classifier")
    parser.add_argument("--stage2-sampler", choices=("balanced", "instance"), default="balanced",
                        help="class-balanced or instance sampling in stage 2")
    parser.add_argument("--stage2-lr", type=float, default=0.1, help="stage-2 learning rate")
    parser.add_argument("--stage2-weight-decay", type=float, default=5e-4,
                        help="stage-2 weight decay")
    parser.add_argument("--stage1-checkpoint", help="skip stage 1: load this stage1.pt")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step")
    parser.add_argument("--no-augment", action="store_true", help="no crop/flip augmentation")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:k]")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    parser.add_argument("--out", required=True, help="output folder")
    add_debug_flag(parser)
    return parser


def main(argv=None) -> Dict:
    args = build_parser().parse_args(argv)
    if args.epochs < 0 or args.stage2_epochs < 0:
        raise ValueError("--epochs and --stage2-epochs must be >= 0")
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args) -> Dict:
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    progress = not args.no_progress
    os.makedirs(args.out, exist_ok=True)

    data = load_data(args)
    print(data.summary(), flush=True)
    mean, std = data.channel_stats()
    norm = _Normalizer(mean, std, device)
    model = resnet_cifar(args.depth, args.width, data.num_classes).to(device)

    started = time.time()
    if args.stage1_checkpoint:
        state = load_checkpoint(args.stage1_checkpoint)
        model.load_state_dict(state["model"])
        stage1_losses = state.get("epoch_losses", [])
    else:
        stage1_losses = train_stage1(model, data, norm, args, progress)
        save_checkpoint(os.path.join(args.out, "stage1.pt"),
                        {"model": model.state_dict(), "epoch_losses": stage1_losses,
                         "depth": args.depth, "width": args.width})
    stage1 = evaluate(model, data, norm)
    stage1.update(loss="softmax", sampler="instance", epochs=args.epochs,
                  epoch_losses=stage1_losses)

    stage2_losses = train_stage2(model, data, norm, args, progress)
    save_checkpoint(os.path.join(args.out, "stage2.pt"),
                    {"model": model.state_dict(), "epoch_losses": stage2_losses})
    stage2 = evaluate(model, data, norm)
    stage2.update(loss=args.stage2_loss, sampler=args.stage2_sampler, epochs=args.stage2_epochs,
                  epoch_losses=stage2_losses)

    rows = {"stage1: softmax (instance)": stage1["top1"],
            f"stage2 cRT: {args.stage2_loss} ({args.stage2_sampler})": stage2["top1"]}
    title = f"{data.name}, imbalance {args.imbalance:g}, ResNet-{args.depth} (width " \
            f"{args.width}): top-1 accuracy (%)"
    print(format_table(title, rows), flush=True)

    groups = class_groups(data.class_counts)
    metrics = {
        "dataset": data.name, "synthetic": isinstance(data, SyntheticLTClassification),
        "imbalance": args.imbalance, "num_classes": data.num_classes,
        "num_train_images": int(data.train_labels.numel()),
        "num_test_images": int(data.test_labels.numel()),
        "class_counts": data.class_counts,
        "group_classes": {g: len(c) for g, c in groups.items()},
        "group_rule": "many: > 100 training images, medium: 20-100, few: < 20",
        "stage1": stage1, "stage2": stage2,
        "seconds": time.time() - started, "args": vars(args),
    }
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    return metrics


if __name__ == "__main__":
    raise SystemExit(run(main))
