"""Plots of a training run from its own files (matplotlib, Agg backend: no display needed).

    python -m gumbel_kernels.engine.plots RUN_DIR            # or: LOG.jsonl METRICS.json ...
        [--out DIR] [--smooth 20]

- loss_curve.png from log.jsonl (one record per iteration): every `loss*` term against the
  iteration (raw, thin, and a running mean over --smooth iterations, thick; log scale), the
  learning rate below it and, where the log has them, the seconds per iteration and waiting
  for data (running means) with the peak GPU memory.
- ap_by_frequency.png from metrics.json: mask AP overall and per LVIS frequency group (APr, APc,
  APf; percent) and box AP, as bars; an undefined group (-1: no ground truth) is marked n/a.
The trainer writes both into its output folder at the end of a run.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Dict, List, Optional, Sequence

from .._cli import HelpFormatter, add_debug_flag, run
from ..analysis.distributions import GROUP_COLOURS, GROUP_NAMES, _pyplot
from .run_log import LOG_NAME

__all__ = ["read_log", "plot_loss_curve", "plot_ap_by_frequency", "plot_run", "main"]

log = logging.getLogger(__name__)
LOSS_CURVE = "loss_curve.png"
AP_CHART = "ap_by_frequency.png"


def read_log(path: str) -> List[dict]:
    """The records of a JSONL log; a torn last line (a killed run) is skipped."""
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):  # not the last line: the file is damaged, not torn
                raise ValueError(f"{path}: line {number} is not json") from None
    return records


def _running_mean(values: Sequence[float], window: int) -> List[float]:
    out, total = [], 0.0
    for k, value in enumerate(values):
        total += value
        if k >= window:
            total -= values[k - window]
        out.append(total / min(k + 1, window))
    return out


def plot_loss_curve(records: Sequence[dict], path: str, *, smooth: int = 20,
                    title: Optional[str] = None) -> str:
    """Loss terms and learning rate against the iteration (see the module docstring)."""
    records = [r for r in records if "iteration" in r]
    if not records:
        raise ValueError(f"no iteration records to plot into {path}")
    iterations = [r["iteration"] for r in records]
    terms = sorted({k for r in records for k in r if k.startswith("loss")},
                   key=lambda k: (k != "loss", k))
    plt = _pyplot()
    has_lr = any("lr" in r for r in records)
    has_time = any("time" in r for r in records)
    ratios = [3] + [1] * (has_lr + has_time)
    fig, axes = plt.subplots(len(ratios), 1, figsize=(8, 4 + 1.6 * (len(ratios) - 1)),
                             sharex=True, squeeze=False, gridspec_kw={"height_ratios": ratios})
    ax = axes[0, 0]
    for k, term in enumerate(terms):
        points = [(i, r[term]) for i, r in zip(iterations, records)
                  if isinstance(r.get(term), (int, float)) and r[term] > 0]
        if not points:
            continue
        xs, ys = zip(*points)
        colour = f"C{k % 10}"
        ax.plot(xs, ys, color=colour, linewidth=0.6, alpha=0.35)
        ax.plot(xs, _running_mean(ys, max(1, smooth)), color=colour,
                linewidth=2.2 if term == "loss" else 1.3, label=term)
    ax.set_yscale("log")
    ax.set_ylabel("loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(title or f"training loss ({len(records)} iterations; thick: running mean of "
                          f"{smooth})", fontsize=10)
    if has_lr:
        lr_ax = axes[1, 0]
        lr_ax.plot(iterations, [r.get("lr", float("nan")) for r in records], color="k",
                   linewidth=1.0)
        lr_ax.set_ylabel("lr")
        lr_ax.grid(True, alpha=0.3)
    if has_time:
        _plot_throughput(axes[-1, 0], iterations, records, smooth)
    axes[-1, 0].set_xlabel("iteration")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_throughput(ax, iterations, records, smooth: int) -> None:
    """Seconds per iteration and waiting for data (running means); peak GPU memory if logged."""
    for key, colour in (("time", "C0"), ("data_time", "C1")):
        points = [(i, r[key]) for i, r in zip(iterations, records) if key in r]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, _running_mean(ys, max(1, smooth)), color=colour, linewidth=1.0, label=key)
    ax.set_ylabel("s / iter")
    ax.grid(True, alpha=0.3)
    memory = [(i, r["max_mem_mb"] / 1024) for i, r in zip(iterations, records) if "max_mem_mb" in r]
    if memory:
        twin = ax.twinx()
        twin.plot(*zip(*memory), color="C3", linewidth=1.0, label="max_mem")
        twin.set_ylabel("GPU GiB", color="C3")
    ax.legend(fontsize=8, loc="upper left")


def plot_ap_by_frequency(metrics: Dict[str, float], path: str, *,
                         title: Optional[str] = None) -> str:
    """Bars of AP, APr, APc, APf (mask AP) and APb (box AP), in percent."""
    names = [k for k in ("AP", "APr", "APc", "APf", "APb") if k in metrics]
    if not any(k in names for k in ("APr", "APc", "APf")):
        raise ValueError(f"no APr/APc/APf in the metrics to plot into {path} "
                         f"(keys: {', '.join(sorted(metrics)[:10])})")
    colours = {"AP": "#7f7f7f", "APb": "#bcbd22", **{f"AP{g}": GROUP_COLOURS[g] for g in "rcf"}}
    labels = {"AP": "AP (mask)", "APb": "AP (box)",
              **{f"AP{g}": f"AP{g}\n({GROUP_NAMES[g]})" for g in "rcf"}}
    values = [float(metrics[k]) for k in names]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    heights = [max(v, 0.0) for v in values]
    bars = ax.bar(range(len(names)), heights, color=[colours[k] for k in names])
    top = max(heights + [1.0])
    for bar, value in zip(bars, values):
        text = "n/a" if value < 0 else f"{value:.1f}"
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.01 * top, text,
                ha="center", va="bottom", fontsize=9)
    ax.set_xticks(range(len(names)), [labels[k] for k in names], fontsize=9)
    ax.set_ylim(0, top * 1.15)
    ax.set_ylabel("AP (%)")
    ax.set_title(title or "LVIS AP by category frequency", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_run(inputs: Sequence[str], out_dir: Optional[str] = None, *, smooth: int = 20) -> List[str]:
    """Plots what `inputs` hold: run folders (their log.jsonl and metrics.json, where present)
    or the files themselves (a .jsonl is a log, a .json the metrics). Returns the PNGs written,
    into out_dir (default: the folder of the first input)."""
    logs, metrics = [], []
    for item in inputs:
        if os.path.isdir(item):
            for name, found in ((LOG_NAME, logs), ("metrics.json", metrics)):
                if os.path.exists(os.path.join(item, name)):
                    found.append(os.path.join(item, name))
        elif not os.path.exists(item):
            raise FileNotFoundError(f"{item} does not exist")
        elif item.endswith(".jsonl"):
            logs.append(item)
        elif item.endswith(".json"):
            metrics.append(item)
        else:
            raise ValueError(f"{item}: expected a run folder, a .jsonl log or a .json metrics file")
    if len(logs) > 1 or len(metrics) > 1:
        raise ValueError("give one run: at most one log.jsonl and one metrics.json")
    if not logs and not metrics:
        raise FileNotFoundError(f"no log.jsonl or metrics.json in {', '.join(inputs)}")
    first = inputs[0]
    out_dir = out_dir or (first if os.path.isdir(first) else os.path.dirname(first) or ".")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    records = read_log(logs[0]) if logs else []
    if records:
        written.append(plot_loss_curve(records, os.path.join(out_dir, LOSS_CURVE), smooth=smooth))
    elif logs:
        log.warning("%s holds no iterations: no loss curve", logs[0])
    if metrics:
        with open(metrics[0]) as f:
            written.append(plot_ap_by_frequency(json.load(f), os.path.join(out_dir, AP_CHART)))
    if not written:
        raise ValueError(f"nothing to plot in {', '.join(inputs)}")
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gumbel_kernels.engine.plots",
                                     description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="PATH",
                        help="a run folder, or its log.jsonl and/or metrics.json")
    parser.add_argument("--out", help="output folder (default: the folder of the first PATH)")
    parser.add_argument("--smooth", type=int, default=20,
                        help="running-mean window of the loss curves, in iterations")
    add_debug_flag(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> List[str]:
    args = build_parser().parse_args(argv)
    if args.smooth < 1:
        raise ValueError(f"--smooth {args.smooth}: must be >= 1")
    written = plot_run(args.inputs, args.out, smooth=args.smooth)
    print("wrote " + ", ".join(written))
    return written


if __name__ == "__main__":
    raise SystemExit(run(main))
