"""Draw the GOL loss benchmark figure from the bench CSV, and from nothing else.

    python -m bench.plot [--csv bench/results/gol_loss.csv] [--out bench/results/gol_loss.png]

One panel per (device, mode, C, dtype): median ms against N on log-log axes, one line per
provider with p20-p80 error bars. Each provider shows its latest run on that device (the newest
timestamp; rows of one run share a timestamp), so re-running one provider updates its line.
"""
from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from . import common  # noqa: E402

PROVIDER_ORDER = ("eager", "compile_literal", "compile_rewrite", "ours", "cpu", "cuda", "triton",
                  "reference")


def latest_rows(rows: Sequence[Dict[str, str]]) -> List[Dict[str, str]]:
    """Per (device, provider), only the rows of that provider's newest run."""
    newest: Dict[Tuple[str, str], str] = {}
    for row in rows:
        key = (row["device"], row["provider"])
        if row["timestamp"] > newest.get(key, ""):  # ISO 8601 UTC sorts as text
            newest[key] = row["timestamp"]
    return [row for row in rows if row["timestamp"] == newest[(row["device"], row["provider"])]]


def _float(value: str) -> Optional[float]:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def plot(csv_path: Path, out_path: Path) -> Path:
    rows = latest_rows(common.read_rows(csv_path))
    if not rows:
        raise SystemExit(f"{csv_path} has no rows to plot")
    panels: Dict[Tuple[str, str, int, str], Dict[str, List[Dict[str, str]]]] = defaultdict(
        lambda: defaultdict(list))
    for row in rows:
        if _float(row["median_ms"]) is None:
            continue
        panel = (row["device"], row["mode"], int(row["C"]), row["dtype"])
        panels[panel][row["provider"]].append(row)
    keys = sorted(panels, key=lambda k: (k[0], k[1] != "forward", k[2], k[3]))
    columns = min(len(keys), 3)
    lines = (len(keys) + columns - 1) // columns
    figure, axes = plt.subplots(lines, columns, figsize=(5.2 * columns, 4.2 * lines),
                                squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, keys):
        device, mode, num_classes, dtype = key
        providers = sorted(panels[key], key=lambda p: (PROVIDER_ORDER.index(p)
                                                       if p in PROVIDER_ORDER else 99, p))
        for provider in providers:
            points = sorted(panels[key][provider], key=lambda r: int(r["N"]))
            n = [int(r["N"]) for r in points]
            median = [float(r["median_ms"]) for r in points]
            low = [m - (_float(r["p20_ms"]) or m) for m, r in zip(median, points)]
            high = [(_float(r["p80_ms"]) or m) - m for m, r in zip(median, points)]
            ax.errorbar(n, median, yerr=[low, high], marker="o", markersize=4, capsize=3,
                        label=provider)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N (RoIs)")
        ax.set_ylabel("median ms (p20–p80)")
        names = sorted({r["device_name"] for p in providers for r in panels[key][p]})
        ax.set_title(f"{device} {mode}, C={num_classes}, {dtype}\n{'; '.join(names)[:60]}",
                     fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    commits = sorted({row["commit"] for row in rows})
    figure.suptitle(f"GOL DropLoss (commits: {', '.join(commits)})", fontsize=10)
    figure.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_path, dpi=120)
    plt.close(figure)
    return out_path


def main(argv: Optional[Sequence[str]] = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m bench.plot",
                                     description="Plot the GOL loss benchmark CSV.")
    parser.add_argument("--csv", type=Path, default=common.DEFAULT_CSV)
    parser.add_argument("--out", type=Path, default=common.DEFAULT_CSV.with_suffix(".png"))
    args = parser.parse_args(argv)
    path = plot(args.csv, args.out)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
