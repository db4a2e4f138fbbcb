"""Benchmark of the GOL DropLoss: the fused kernels against the literal GOL code and torch.compile.

    python -m bench.gol_loss_bench [--device cpu|cuda] [--providers eager,compile_literal,...]
        [--shapes quick|make|full|NxC,...] [--modes forward,full] [--dtypes float32,...]
        [--repeats R] [--budget S] [--csv PATH]

Providers (each skipped, with the reason printed, where it cannot run):
  eager            bench.literal_gol.literal_gol, the loss as GOL's mmdetection code writes it
  compile_literal  torch.compile(literal_gol, dynamic=False)
  compile_rewrite  torch.compile(compile_friendly_gol, dynamic=False), the best rewrite for compile
  ours             gumbel_kernels.gol_loss(backend="auto")
  cpu|cuda|triton|reference   gumbel_kernels.gol_loss(backend=<name>)
Modes: "forward" (no grad) and "full" (forward + backward, logits.requires_grad).
Every row goes to the CSV (bench.common.CSV_COLUMNS); ratios use rows of this run only.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import common
from .literal_gol import compile_friendly_gol, literal_gol

BASELINES = ("eager", "compile_literal", "compile_rewrite")
COMPILE_PROVIDERS = ("compile_literal", "compile_rewrite")
# Provider name -> gumbel_kernels backend.
BACKEND_PROVIDERS = {"ours": "auto", "cpu": "cpu", "cuda": "cuda", "triton": "triton",
                     "reference": "reference"}
ALL_PROVIDERS = BASELINES + tuple(BACKEND_PROVIDERS)
DEFAULT_PROVIDERS = {"cpu": BASELINES + ("ours",),
                     "cuda": BASELINES + ("ours", "cuda", "triton")}
MODES = ("forward", "full")
HEADLINE = (8192, 1203)  # 16 images x 512 sampled RoIs, the 1203 LVIS v1 classes

SHAPE_PRESETS: Dict[str, List[Tuple[int, int]]] = {
    "quick": [HEADLINE],
    # What `make bench` runs: a line per panel of the plot in well under 10 minutes on 2 CPU
    # cores, compilation included.
    "make": [(512, 1203), (2048, 1203), (8192, 1203), (16384, 1203), (2048, 1204),
             (8192, 1204), (512, 21000), (2048, 21000)],
    "full": [(n, c) for c in (1203, 1204) for n in (512, 2048, 8192, 16384)]
            + [(512, 21000), (2048, 21000), (8192, 13204)],
    # `make gpu-check`: the headline and a V3Det-size head (13,204 classes).
    "gpu": [HEADLINE, (8192, 13204)],
}

REWRITE_INDUCTOR_OPTIONS = {"realize_opcount_threshold": 300}
OURS_SEED = 0x5EED  # a fixed Philox key: every run of "ours" drops the same elements

# LVIS v1 train: 100,170 images; 337 rare (1-10 images), 461 common (11-100) and 405 frequent
# (>100) categories. GOL drops classes whose image frequency is below lambda = 0.0011, i.e.
# fewer than ~110 images: the rare and common ones, about two thirds of the classes.
LVIS_V1_IMAGES = 100_170
LVIS_V1_BINS = ((337, 1, 10), (461, 11, 100), (405, 101, 50_000))
GOL_LAMBDA = 0.0011
FOREGROUND_FRACTION = 0.25  # GOL samples 512 RoIs per image, 25% positive


class ProviderUnavailable(RuntimeError):
    """A provider cannot run here; the message says why."""


# --------------------------------------------------------------------------- inputs

def lvis_like_image_counts(num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """Per-class image counts with LVIS v1's rare/common/frequent proportions (float64)."""
    total = sum(size for size, _, _ in LVIS_V1_BINS)
    counts = []
    for size, low, high in LVIS_V1_BINS:
        share = round(size * num_classes / total)
        # Log-uniform inside each bin: the long tail within the tail.
        u = torch.rand(share, generator=generator, dtype=torch.float64)
        counts.append(torch.exp(math.log(low) + u * (math.log(high + 1) - math.log(low))).floor())
    counts = torch.cat(counts)
    if counts.numel() < num_classes:  # rounding: pad with frequent classes
        counts = torch.cat([counts, torch.full((num_classes - counts.numel(),), 1000.0,
                                               dtype=torch.float64)])
    counts = counts[:num_classes]
    return counts[torch.randperm(num_classes, generator=generator)]


@dataclass
class Inputs:
    logits: torch.Tensor
    labels: torch.Tensor
    drop_classes: torch.Tensor


def make_inputs(num_rows: int, num_classes: int, dtype: torch.dtype, device: torch.device,
                seed: int = 0) -> Inputs:
    """RoI-classification-like inputs: LVIS-like drop classes, 25% foreground rows whose classes
    follow the image counts, background label C, logits centred below zero as a trained
    detector's mostly-negative scores are (some beyond the clamp)."""
    generator = torch.Generator().manual_seed(seed)
    counts = lvis_like_image_counts(num_classes, generator)
    drop_classes = counts / LVIS_V1_IMAGES < GOL_LAMBDA
    foreground = torch.rand(num_rows, generator=generator) < FOREGROUND_FRACTION
    fg_classes = torch.multinomial(counts, num_rows, replacement=True, generator=generator)
    labels = torch.where(foreground, fg_classes, torch.full_like(fg_classes, num_classes))
    logits = torch.randn(num_rows, num_classes, generator=generator) * 2.0 - 2.0
    return Inputs(logits.to(device=device, dtype=dtype), labels.to(device),
                  drop_classes.to(device))


# --------------------------------------------------------------------------- providers

def _configure_dynamo() -> None:
    # One graph per (shape, dtype, grad mode) with dynamic=False: keep them all.
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 1024)
    for name in ("accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 4096)


def _import_gumbel_kernels():
    try:
        import gumbel_kernels as gk
        from gumbel_kernels import backends
    except Exception as error:  # noqa: BLE001 - any import failure makes the provider unavailable
        raise ProviderUnavailable(f"gumbel_kernels cannot be imported: {error}") from None
    if not hasattr(gk, "gol_loss"):
        raise ProviderUnavailable("gumbel_kernels has no gol_loss yet")
    return gk, backends


def build_provider(name: str, device: torch.device) -> Tuple[Callable, str]:
    """(loss function (logits, labels, drop_classes) -> scalar, a note for the CSV)."""
    if name == "eager":
        return literal_gol, "literal GOL DropLoss, eager"
    if name == "compile_literal":
        _configure_dynamo()
        return torch.compile(literal_gol, dynamic=False), "torch.compile(literal_gol, dynamic=False)"
    if name == "compile_rewrite":
        _configure_dynamo()
        # Inductor stores a CPU pointwise body of more than 50 ops to memory before reducing it
        # (realize_cpu_opcount_threshold); the rewrite's body (loss, gradient, drop hash) is
        # larger, so raise the limit and keep the whole case in one loop.
        compiled = torch.compile(compile_friendly_gol, dynamic=False,
                                 options=REWRITE_INDUCTOR_OPTIONS)

        def rewrite(logits, labels, drop_classes):
            # The per-call seed is drawn eagerly: inside the graph inductor would inline the
            # draw into the element loop.
            seed = torch.randint(0, 2 ** 31 - 1, (), dtype=torch.int32, device=logits.device)
            return compiled(logits, labels, drop_classes, seed)

        return rewrite, (f"torch.compile(compile_friendly_gol, dynamic=False, "
                         f"options={REWRITE_INDUCTOR_OPTIONS})")
    if name in BACKEND_PROVIDERS:
        gk, backends = _import_gumbel_kernels()
        requested = BACKEND_PROVIDERS[name]
        if requested == "auto":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    resolved = backends.resolve("auto", device.type)
                except RuntimeError as error:
                    raise ProviderUnavailable(str(error)) from None
        else:
            reason = backends.unavailable_reason(requested, device.type)
            if reason is not None:
                raise ProviderUnavailable(reason)
            resolved = requested

        def ours(logits, labels, drop_classes):
            return gk.gol_loss(logits, labels, drop_classes, seed=OURS_SEED, backend=requested)

        note = f"gk.gol_loss(backend={requested!r}) -> {resolved}"
        if requested == "auto" and resolved == "reference":
            note += " (slow pure-PyTorch fallback: the compiled kernels are not available)"
        return ours, note
    raise ValueError(f"unknown provider {name!r}; expected one of {', '.join(ALL_PROVIDERS)}")


# --------------------------------------------------------------------------- one case

@dataclass
class Case:
    provider: str
    mode: str
    num_rows: int
    num_classes: int
    dtype: torch.dtype


def run_case(loss_fn: Callable, inputs: Inputs, mode: str, device: torch.device,
             repeats: Optional[int], budget_s: float, min_repeats: int,
             measure_memory: bool = True) -> Tuple[common.Timing, Optional[float], str]:
    logits = inputs.logits.detach().clone().requires_grad_(mode == "full")

    if mode == "forward":
        def call():
            with torch.no_grad():
                return loss_fn(logits, inputs.labels, inputs.drop_classes)
        between = None
    else:
        def call():
            loss = loss_fn(logits, inputs.labels, inputs.drop_classes)
            loss.backward()
            return loss

        def between():
            logits.grad = None  # freed outside the timed region, like an optimizer step would

    timing = common.time_fn(call, device, repeats=repeats, min_repeats=min_repeats,
                            budget_s=budget_s, between=between)
    peak_mb, method = None, ""
    if measure_memory:
        peak_mb, method = common.peak_extra_memory_mb(call, device)
        if between is not None:
            between()
    return timing, peak_mb, method


# --------------------------------------------------------------------------- reporting

def fill_ratios(rows: List[Dict[str, object]]) -> None:
    """speedup_vs_eager and speedup_vs_best_compile from the rows of this run."""
    by_case: Dict[Tuple, Dict[str, float]] = {}
    for row in rows:
        key = (row["mode"], row["N"], row["C"], row["dtype"])
        by_case.setdefault(key, {})[row["provider"]] = row["median_ms"]
    for row in rows:
        medians = by_case[(row["mode"], row["N"], row["C"], row["dtype"])]
        eager = medians.get("eager")
        compiled = [medians[p] for p in COMPILE_PROVIDERS if p in medians]
        row["speedup_vs_eager"] = eager / row["median_ms"] if eager else None
        row["speedup_vs_best_compile"] = min(compiled) / row["median_ms"] if compiled else None


def _fmt(value, spec: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec) + suffix


def markdown_table(rows: Sequence[Dict[str, object]]) -> str:
    lines = ["| provider | mode | N | C | dtype | median ms | p20–p80 ms | vs copy | peak extra MB "
             "| vs eager | vs best compile |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(
            f"| {row['provider']} | {row['mode']} | {row['N']} | {row['C']} | {row['dtype']} "
            f"| {_fmt(row['median_ms'], '.2f')} "
            f"| {_fmt(row['p20_ms'], '.2f')}–{_fmt(row['p80_ms'], '.2f')} "
            f"| {_fmt(row['time_vs_copy'], '.1f', '×')} | {_fmt(row['peak_extra_mb'], '.1f')} "
            f"| {_fmt(row['speedup_vs_eager'], '.2f', '×')} "
            f"| {_fmt(row['speedup_vs_best_compile'], '.2f', '×')} |")
    return "\n".join(lines)


def _times(speedup: float) -> str:
    if speedup >= 1:
        return f"{speedup:.2f}× faster than"
    return f"{1 / speedup:.2f}× slower than"


def headline(rows: Sequence[Dict[str, object]], provider: str = "ours") -> List[str]:
    """One sentence per mode for N=8192, C=1203, float32, when all its rows were measured."""
    sentences = []
    for mode in MODES:
        case = {row["provider"]: row for row in rows
                if (row["N"], row["C"]) == HEADLINE and row["dtype"] == "float32"
                and row["mode"] == mode}
        if provider not in case:
            continue
        ours = case[provider]
        compiled = [case[p] for p in COMPILE_PROVIDERS if p in case]
        best = min(compiled, key=lambda row: row["median_ms"]) if compiled else None
        parts = [f"{mode}, N={HEADLINE[0]}, C={HEADLINE[1]}, float32: {provider} "
                 f"({ours['median_ms']:.2f} ms) is"]
        if "eager" in case:
            parts.append(f"{_times(ours['speedup_vs_eager'])} eager "
                         f"({case['eager']['median_ms']:.1f} ms)")
        if best is not None:
            parts.append(f"{'and ' if 'eager' in case else ''}"
                         f"{_times(ours['speedup_vs_best_compile'])} the best compile baseline "
                         f"({best['provider']}, {best['median_ms']:.1f} ms)")
        sentences.append(" ".join(parts))
    return sentences


def _load_note() -> str:
    """The 1-minute load average: CPU timings on a shared machine are only as good as this."""
    try:
        return f"loadavg={os.getloadavg()[0]:.2f}/{os.cpu_count()}cpu"
    except OSError:  # pragma: no cover - not on every platform
        return ""


# --------------------------------------------------------------------------- CLI

def parse_shapes(spec: str) -> List[Tuple[int, int]]:
    if spec in SHAPE_PRESETS:
        return list(SHAPE_PRESETS[spec])
    shapes = []
    for item in spec.split(","):
        try:
            n, c = item.lower().split("x")
            shapes.append((int(n), int(c)))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--shapes takes a preset ({', '.join(SHAPE_PRESETS)}) or NxC[,NxC...], "
                f"got {spec!r}") from None
    return shapes


def _split(value: str) -> List[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gol_loss_bench",
        description="Time the GOL DropLoss providers and append rows to the bench CSV.")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--providers", default=None,
                        help=f"comma-separated, from {', '.join(ALL_PROVIDERS)} "
                             "(default: eager, compile_literal, compile_rewrite, ours; on cuda "
                             "also cuda, triton)")
    parser.add_argument("--shapes", default="quick",
                        help=f"preset ({', '.join(f'{k}: {len(v)} shapes' for k, v in SHAPE_PRESETS.items())}) "
                             "or NxC[,NxC...] (default: quick = 8192x1203)")
    parser.add_argument("--modes", default="forward,full", help="forward,full (default: both)")
    parser.add_argument("--dtypes", default="float32", help="e.g. float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per case (default: adaptive, see --budget)")
    parser.add_argument("--budget", type=float, default=2.0,
                        help="seconds of timed calls per case when --repeats is not given "
                             "(at least --min-repeats calls, at most 100)")
    parser.add_argument("--min-repeats", type=int, default=5)
    parser.add_argument("--csv", default=str(common.DEFAULT_CSV), help="CSV to append rows to")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the peak-memory measurement (one extra untimed call per case)")
    parser.add_argument("--seed", type=int, default=0, help="input generation and torch RNG seed")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, object]]:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    providers = _split(args.providers) if args.providers else list(DEFAULT_PROVIDERS[device.type])
    for name in providers:
        if name not in ALL_PROVIDERS:
            raise SystemExit(f"unknown provider {name!r}; expected one of {', '.join(ALL_PROVIDERS)}")
    modes = _split(args.modes)
    for mode in modes:
        if mode not in MODES:
            raise SystemExit(f"unknown mode {mode!r}; expected forward and/or full")
    dtypes = [common.parse_dtype(name) for name in _split(args.dtypes)]
    shapes = parse_shapes(args.shapes)
    torch.manual_seed(args.seed)

    loss_fns: Dict[str, Callable] = {}
    notes: Dict[str, str] = {}
    for name in providers:
        try:
            loss_fns[name], notes[name] = build_provider(name, device)
        except ProviderUnavailable as reason:
            print(f"skipping provider {name!r}: {reason}", file=sys.stderr)
    if not loss_fns:
        raise SystemExit("no provider can run")

    run_meta = {"timestamp": common.utc_timestamp(), "device": device.type,
                "device_name": common.device_name(device), "commit": common.git_commit(),
                "torch": torch.__version__}
    cases = [Case(p, m, n, c, d) for d in dtypes for (n, c) in shapes for m in modes
             for p in loss_fns]
    try:
        from tqdm import tqdm
        progress = tqdm(cases, desc="gol_loss bench", unit="case", dynamic_ncols=True)
    except ImportError:  # pragma: no cover - tqdm is in requirements
        progress = cases

    rows: List[Dict[str, object]] = []
    inputs_key, inputs, copy_ms = None, None, None
    for case in progress:
        if hasattr(progress, "set_postfix_str"):
            progress.set_postfix_str(f"{case.provider} {case.mode} {case.num_rows}x"
                                     f"{case.num_classes} {common.dtype_name(case.dtype)}")
        key = (case.num_rows, case.num_classes, case.dtype)
        if key != inputs_key:
            inputs = None  # free the previous shape's tensors first
            inputs = make_inputs(case.num_rows, case.num_classes, case.dtype, device, args.seed)
            copy_ms = common.copy_time((case.num_rows, case.num_classes), case.dtype,
                                       device).median_ms
            inputs_key = key
        try:
            timing, peak_mb, method = run_case(loss_fns[case.provider], inputs, case.mode, device,
                                               args.repeats, args.budget, args.min_repeats,
                                               measure_memory=not args.no_memory)
        except Exception as error:  # noqa: BLE001 - report and go on with the other cases
            message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            print(f"\n{case.provider} {case.mode} {case.num_rows}x{case.num_classes} failed: "
                  f"{message}", file=sys.stderr)
            continue
        note = "; ".join(filter(None, [notes[case.provider], method,
                                       f"threads={torch.get_num_threads()}"
                                       if device.type == "cpu" else "", _load_note()]))
        rows.append(dict(run_meta, provider=case.provider, mode=case.mode, N=case.num_rows,
                         C=case.num_classes, dtype=common.dtype_name(case.dtype),
                         repeats=timing.repeats, median_ms=timing.median_ms,
                         p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, copy_ms=copy_ms,
                         time_vs_copy=timing.median_ms / copy_ms, peak_extra_mb=peak_mb,
                         notes=note))
    if hasattr(progress, "close"):
        progress.close()

    fill_ratios(rows)
    if rows:
        path = common.append_rows(rows, args.csv)
        print(f"\n{len(rows)} rows appended to {path}\n")
        print(markdown_table(rows))
        for sentence in headline(rows):
            print("\n" + sentence)
    return rows


if __name__ == "__main__":
    main()
