"""Training-step time of Mask R-CNN with the fused GOL loss vs the eager literal GOL loss, and the
loss's share of the step (same CSV schema as gol_loss_bench; mode "train_step").

    python -m bench.train_step_bench [--device cpu|cuda] [--classes 1203] [--rois 512]
        [--image-size 192] [--batch 2] [--repeats R] [--csv PATH]

Both providers run the same model, batch and seed; only the box classification loss differs:
"ours" is gumbel_kernels.losses.GOLLoss, "eager" the literal GOL DropLoss of
bench/literal_gol.py behind the same module interface. N in the CSV is the number of sampled RoIs
per step (the loss's rows); `notes` holds the loss-only time on logits of that shape (forward +
backward) and its share of the step.
"""
from __future__ import annotations

import argparse
from typing import List, Optional, Sequence

import torch
from torch import nn

from gumbel_kernels.detection import build_model
from gumbel_kernels.losses import GOLLoss

from . import common
from .literal_gol import literal_gol


class LiteralGOLLoss(nn.Module):
    """bench.literal_gol.literal_gol as a classification-loss module (C-way Gumbel head)."""

    activation = "gumbel"

    def __init__(self, drop_classes: torch.Tensor):
        super().__init__()
        self.register_buffer("drop_classes", drop_classes, persistent=False)

    def num_logits(self, num_classes: int) -> int:
        return num_classes

    def forward(self, logits, labels):
        return literal_gol(logits, labels, self.drop_classes)


def _batch(num_images: int, size: int, num_classes: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    images, targets = [], []
    for _ in range(num_images):
        boxes = []
        for _ in range(4):
            x0, y0 = torch.randint(0, size // 2, (2,), generator=g).tolist()
            w, h = torch.randint(size // 8, size // 2, (2,), generator=g).tolist()
            boxes.append([x0, y0, x0 + w, y0 + h])
        boxes = torch.tensor(boxes, dtype=torch.float32)
        masks = torch.zeros(len(boxes), size, size, dtype=torch.uint8)
        for k, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
            masks[k, y0:y1, x0:x1] = 1
        images.append(torch.rand(3, size, size, generator=g).to(device))
        targets.append({"boxes": boxes.to(device), "masks": masks.to(device),
                        "labels": torch.randint(1, num_classes + 1, (len(boxes),), generator=g).to(device)})
    return images, targets


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    parser = argparse.ArgumentParser(prog="python -m bench.train_step_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--classes", type=int, default=1203)
    parser.add_argument("--rois", type=int, default=512, help="sampled RoIs per image")
    parser.add_argument("--image-size", type=int, default=192)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--csv", default=str(common.DEFAULT_CSV))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    c = args.classes
    # LVIS-like: about 40% of the classes are rare enough to be dropped.
    counts = torch.randint(1, 1000, (c,), generator=torch.Generator().manual_seed(1))
    counts[: int(0.4 * c)] = 1
    fused = GOLLoss(counts.tolist(), 10_000, lambda_=0.0011)
    losses = {"ours": fused, "eager": LiteralGOLLoss(fused.drop_classes.clone())}
    images, targets = _batch(args.batch, args.image_size, c, device)
    rois = args.batch * args.rois
    model_cfg = {"backbone": "resnet18", "weights": None, "min_size": [args.image_size],
                 "max_size": args.image_size, "box_batch_size_per_image": args.rois,
                 "box_positive_fraction": 0.25, "rpn_pre_nms_top_n": [1000, 500],
                 "rpn_post_nms_top_n": [1000, 500]}
    copy = common.copy_time((rois, c), torch.float32, device)
    timestamp = common.utc_timestamp()
    measured = {}
    for name, loss in losses.items():
        torch.manual_seed(0)
        model = build_model(model_cfg, c, loss.to(device)).to(device).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

        def step():
            optimizer.zero_grad(set_to_none=True)
            sum(model(images, targets).values()).backward()
            optimizer.step()

        step_timing = common.time_fn(step, device, repeats=args.repeats, budget_s=20.0,
                                     min_repeats=5, max_repeats=30)
        logits = torch.randn(rois, c, device=device, requires_grad=True)
        labels = torch.full((rois,), c, device=device)
        labels[: rois // 4] = torch.randint(0, c, (rois // 4,), device=device)

        def loss_only():
            loss(logits, labels).backward()

        loss_timing = common.time_fn(loss_only, device, between=lambda: setattr(logits, "grad", None))
        measured[name] = (step_timing, loss_timing)
    rows = []
    eager_ms = measured["eager"][0].median_ms
    for name, (step_timing, loss_timing) in measured.items():
        share = loss_timing.median_ms / step_timing.median_ms
        rows.append({
            "timestamp": timestamp, "device": device.type, "device_name": common.device_name(device),
            "commit": common.git_commit(), "torch": torch.__version__, "provider": name,
            "mode": "train_step", "N": rois, "C": c, "dtype": "float32",
            "repeats": step_timing.repeats, "median_ms": step_timing.median_ms,
            "p20_ms": step_timing.p20_ms, "p80_ms": step_timing.p80_ms,
            "copy_ms": copy.median_ms, "time_vs_copy": step_timing.median_ms / copy.median_ms,
            "peak_extra_mb": "", "speedup_vs_eager": eager_ms / step_timing.median_ms,
            "speedup_vs_best_compile": "",
            "notes": f"loss_ms={loss_timing.median_ms:.2f}; loss_share={100 * share:.1f}%; "
                     f"resnet18-fpn {args.batch}x{args.image_size}px"})
        print(f"{name:>6}: step {step_timing.median_ms:8.1f} ms "
              f"[{step_timing.p20_ms:.1f}, {step_timing.p80_ms:.1f}], loss fwd+bwd "
              f"{loss_timing.median_ms:7.2f} ms = {100 * share:4.1f}% of the step")
    print(f"step speed-up of the fused loss: {eager_ms / measured['ours'][0].median_ms:.2f}x")
    common.append_rows(rows, args.csv)
    return rows


if __name__ == "__main__":
    main()
