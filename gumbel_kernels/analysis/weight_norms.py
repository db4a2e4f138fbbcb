"""Classifier weight norms per class, sorted by training frequency (GOL paper, Fig. 1(ii)).

    python -m gumbel_kernels.analysis weight-norms --checkpoint PATH [MORE ...] [--names ...]
        [--key roi_heads.box_predictor.cls_score.weight] [--background auto|first|last|none]
        --ann FILE --out DIR

Long-tailed training leaves the rare classes with small classifier weights; the paper shows the
Gumbel-trained head is less imbalanced than the sigmoid one. Definitions (hand-computable):
- W is the (R, D) classification weight of the checkpoint (`--key`), one row per logit.
- The C classes are the categories of --ann sorted by id (the harness's contiguous indices).
  R = C: row k is class k. R = C + 1: one row is background and is dropped: `--background
  last` (this project's heads: GumbelCE/softmax put background at column C; the default
  "auto" means last), or `first` (torchvision's stock FastRCNNPredictor).
- norm_k = ||W_k||_2 = sqrt(sum_d W_kd^2).
- Classes are ordered by training image count (the categories' `image_count`, else counted
  from the annotations), most frequent first; colours are the r/c/f groups.
The checkpoint may be the trainer's own (OUT/checkpoint.pt: its checksum is verified), a state
dict, or a dict holding one under "model", "state_dict" or "model_state" (a "module." DDP prefix
is stripped); it is read with torch.load(weights_only=True), which runs no code (old pickled
checkpoints need --allow-pickle: only for files you trust).

Outputs in --out: weight_norms.png (bars, one panel per checkpoint), weight_norms.csv (rank,
index, category_id, name, frequency, image_count, norm_<name> ...) and weight_norms.json (mean
norm per group).
"""
from __future__ import annotations

import csv
import json
import os
from typing import Dict, List, Mapping, Union

import numpy as np
import torch

from ..engine.checkpoint import load_checkpoint
from .distributions import (GROUP_COLOURS, GROUP_NAMES, GROUPS, CategoryTable, _pyplot,
                            category_table, load_json)

__all__ = ["DEFAULT_KEY", "WeightNotFoundError", "find_state_dict", "classifier_weight", "class_weight_norms",
           "add_arguments", "run"]

DEFAULT_KEY = "roi_heads.box_predictor.cls_score.weight"


class WeightNotFoundError(KeyError, ValueError):
    """The checkpoint has no (unique) weight of that name: a user error, as a KeyError."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def find_state_dict(checkpoint: Mapping) -> Mapping:
    """The state dict inside a checkpoint dict (itself, or under model/state_dict/model_state)."""
    for wrapper in ("model", "state_dict", "model_state"):
        inner = checkpoint.get(wrapper) if isinstance(checkpoint, Mapping) else None
        if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            return inner
    if isinstance(checkpoint, Mapping):
        return checkpoint
    raise ValueError(f"a checkpoint must be a dict, got {type(checkpoint).__name__}")


def classifier_weight(checkpoint: Union[str, Mapping], key: str = DEFAULT_KEY,
                      allow_pickle: bool = False) -> torch.Tensor:
    """The (R, D) classifier weight `key` of a checkpoint path or dict."""
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = load_checkpoint(checkpoint, allow_pickle=allow_pickle)
    state = find_state_dict(checkpoint)
    stripped = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    if key in stripped:
        weight = stripped[key]
    else:
        matches = [k for k in stripped if k.endswith("." + key) or k.endswith(key)]
        if len(matches) != 1:
            candidates = [k for k, v in stripped.items()
                          if isinstance(v, torch.Tensor) and v.dim() == 2]
            raise WeightNotFoundError(f"no unique weight {key!r} in the checkpoint; 2-D tensors "
                                      f"there: {candidates[:20]}")
        weight = stripped[matches[0]]
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{key!r} must be a 2-D (classes, features) tensor, got "
                         f"{getattr(weight, 'shape', type(weight))}")
    return weight.detach().to(torch.float64)


def class_weight_norms(weight: torch.Tensor, num_classes: int,
                       background: str = "auto") -> np.ndarray:
    """(C,) L2 norms of the class rows of an (R, D) weight (see the module docstring)."""
    rows = weight.shape[0]
    if rows == num_classes:
        if background not in ("auto", "none"):
            raise ValueError(f"the weight has {rows} rows = C: no background row to drop "
                             f"(background={background!r})")
        class_rows = weight
    elif rows == num_classes + 1:
        if background in ("auto", "last"):
            class_rows = weight[:num_classes]
        elif background == "first":
            class_rows = weight[1:]
        else:
            raise ValueError(f"the weight has C + 1 = {rows} rows: say which is background "
                             f"(--background first|last)")
    else:
        raise ValueError(f"the weight has {rows} rows but the annotation file has "
                         f"{num_classes} categories (expected C or C + 1 rows)")
    return torch.linalg.vector_norm(class_rows, dim=1).numpy()


def _plot(path: str, cats: CategoryTable, names: List[str], norms: List[np.ndarray]) -> None:
    plt = _pyplot()
    order = cats.frequency_order(descending=True)
    colours = [GROUP_COLOURS[cats.frequencies[k]] for k in order]
    fig, axes = plt.subplots(len(names), 1, figsize=(9, 3.2 * len(names)), squeeze=False,
                             sharex=True, sharey=True)
    for ax, name, norm in zip(axes[:, 0], names, norms):
        ax.bar(np.arange(len(order)), norm[order], width=1.0, color=colours, linewidth=0)
        ax.set_ylabel("||w_k||_2")
        ax.set_title(name, fontsize=10)
    from matplotlib.patches import Patch
    axes[0, 0].legend(handles=[Patch(color=GROUP_COLOURS[g], label=GROUP_NAMES[g])
                               for g in GROUPS], fontsize=8)
    axes[-1, 0].set_xlabel("classes sorted by training image count (frequent -> rare)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", nargs="+", required=True, help="checkpoint file(s)")
    parser.add_argument("--names", nargs="+", help="a label per checkpoint (default: stems)")
    parser.add_argument("--key", default=DEFAULT_KEY, help="name of the classifier weight")
    parser.add_argument("--background", choices=("auto", "first", "last", "none"),
                        default="auto", help="which row of a (C+1)-row weight is background")
    parser.add_argument("--ann", required=True,
                        help="LVIS-format json with the categories (and image_count)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="load checkpoints that hold pickled Python objects (old or foreign "
                        "files). DANGEROUS: unpickling runs whatever code the file contains; "
                        "only for files you trust")
    parser.add_argument("--out", required=True, help="output folder")


def run(args) -> Dict:
    names = args.names or [os.path.splitext(os.path.basename(p))[0] for p in args.checkpoint]
    if len(names) != len(args.checkpoint):
        raise ValueError(f"{len(args.checkpoint)} checkpoints but {len(names)} names")
    cats = category_table(load_json(args.ann))
    norms = [class_weight_norms(classifier_weight(path, args.key, args.allow_pickle), len(cats),
                                args.background) for path in args.checkpoint]
    os.makedirs(args.out, exist_ok=True)
    _plot(os.path.join(args.out, "weight_norms.png"), cats, names, norms)
    with open(os.path.join(args.out, "weight_norms.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["rank", "index", "category_id", "name", "frequency", "image_count"]
                        + [f"norm_{name}" for name in names])
        for rank, k in enumerate(cats.frequency_order(descending=True)):
            writer.writerow([rank, k, cats.ids[k], cats.names[k], cats.frequencies[k],
                             cats.image_counts[k]] + [f"{n[k]:.8g}" for n in norms])
    groups = cats.group_indices()
    summary = {name: {GROUP_NAMES[g]: float(n[groups[g]].mean()) if groups[g] else None
                      for g in GROUPS} for name, n in zip(names, norms)}
    with open(os.path.join(args.out, "weight_norms.json"), "w") as f:
        json.dump({"key": args.key, "mean_norm": summary}, f, indent=2)
    print(f"mean classifier weight norm ({args.key}):")
    print(f"{'checkpoint':<20} {'rare':>8} {'common':>8} {'frequent':>8}")
    for name, entry in summary.items():
        print(f"{name:<20} " + " ".join("       -" if entry[c] is None else f"{entry[c]:8.4f}"
                                        for c in ("rare", "common", "frequent")))
    print(f"wrote {args.out}/weight_norms.png, weight_norms.csv, weight_norms.json")
    return summary
