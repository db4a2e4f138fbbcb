"""What every benchmark shares: the fixed CSV schema, timing, peak-memory measurement, and the
run metadata (device, commit, torch version) stamped on each row.

Rows are only ever appended to the CSV; bench.plot reads nothing else. Ratios (time vs copy,
speedups) are computed from rows measured in the same run, never across runs.
"""
from __future__ import annotations

import csv
import datetime
import math
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEFAULT_CSV = BENCH_DIR / "results" / "gol_loss.csv"

# The fixed schema of bench/results/*.csv. Add columns only at the end, never reorder.
CSV_COLUMNS: Tuple[str, ...] = (
    "timestamp",                # UTC, ISO 8601, one value per run (identifies the run)
    "device",                   # "cpu" | "cuda"
    "device_name",              # CPU model and thread count, or the GPU name
    "commit",                   # git rev-parse --short HEAD, or "uncommitted"
    "torch",                    # torch.__version__
    "provider",                 # eager | compile_literal | compile_rewrite | ours | cpu | cuda | triton | reference
    "mode",                     # forward (no grad) | full (forward + backward)
    "N",
    "C",
    "dtype",                    # logits dtype (float32, float16, bfloat16)
    "repeats",                  # timed calls behind the quantiles
    "median_ms",
    "p20_ms",
    "p80_ms",
    "copy_ms",                  # median time of an (N, C) same-dtype tensor copy, same run
    "time_vs_copy",             # median_ms / copy_ms
    "peak_extra_mb",            # peak memory above the pre-call baseline during one call (MiB)
    "speedup_vs_eager",         # eager median / this median (same run, same case)
    "speedup_vs_best_compile",  # min(compile_literal, compile_rewrite) median / this median
    "notes",                    # backend actually run, memory method, anything unusual
)


# --------------------------------------------------------------------------- run metadata

def git_commit() -> str:
    """Short hash of HEAD, or "uncommitted" when the tree has no commit (or git is missing)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "uncommitted"
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else "uncommitted"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()} ({torch.get_num_threads()} threads)"


def utc_timestamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def parse_dtype(name: str) -> torch.dtype:
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16",
               "fp64": "float64"}
    name = aliases.get(name, name)
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"unknown floating dtype {name!r}")
    return dtype


# --------------------------------------------------------------------------- timing

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    times_ms: List[float]

    @property
    def repeats(self) -> int:
        return len(self.times_ms)

    def quantile(self, q: float) -> float:
        """Linear-interpolated quantile (numpy's default), q in [0, 1]."""
        ordered = sorted(self.times_ms)
        position = q * (len(ordered) - 1)
        low = math.floor(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    @property
    def median_ms(self) -> float:
        return self.quantile(0.5)

    @property
    def p20_ms(self) -> float:
        return self.quantile(0.2)

    @property
    def p80_ms(self) -> float:
        return self.quantile(0.8)


def _time_once_ms(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1e3


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup: int = 2,
            repeats: Optional[int] = None, min_repeats: int = 5, max_repeats: int = 100,
            budget_s: float = 2.0, between: Optional[Callable[[], None]] = None) -> Timing:
    """Time `fn` after `warmup` untimed calls.

    With `repeats` given, exactly that many timed calls; otherwise as many as fit in `budget_s`
    (estimated from the last warm-up call), clamped to [min_repeats, max_repeats], so that a
    0.7 s eager call and a 5 ms kernel both get a bounded, meaningful sample. `between` runs
    untimed after every call (e.g. dropping the gradient the call produced).
    """
    last_ms = 0.0
    for _ in range(max(1, warmup)):
        synchronize(device)
        last_ms = _time_once_ms(fn, device)
        if between is not None:
            between()
    if repeats is None:
        repeats = int(budget_s * 1e3 / max(last_ms, 1e-3))
        repeats = max(min_repeats, min(max_repeats, repeats))
    times = []
    for _ in range(max(1, repeats)):
        synchronize(device)
        times.append(_time_once_ms(fn, device))
        if between is not None:
            between()
    return Timing(times)


def copy_time(shape: Sequence[int], dtype: torch.dtype, device: torch.device, *,
              repeats: int = 20) -> Timing:
    """An (N, C) same-dtype copy: the memory-bound floor a fused one-pass kernel is held to."""
    source = torch.randn(*shape, device=device).to(dtype)
    target = torch.empty_like(source)
    return time_fn(lambda: target.copy_(source), device, warmup=3, repeats=repeats)


# --------------------------------------------------------------------------- peak memory

CPU_MEMORY_METHOD = "mem=cpu-profiler-alloc-events"
CUDA_MEMORY_METHOD = "mem=cuda-max_memory_allocated"


def _cpu_peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Peak of the running sum of CPU allocator events recorded by torch.profiler.

    With profile_memory=True every c10 CPU allocation and free (any thread, including those
    made by compiled inductor code and by C++ extension kernels through at::empty) is recorded
    with its size; sorted by time, the running sum is the net memory held since the call began,
    and its maximum is the peak extra memory of the call. Memory that bypasses c10's allocator
    (a raw malloc inside a kernel, OpenMP stacks) is not seen.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    events.sort()
    held = peak = 0
    for _, size in events:
        held += size
        peak = max(peak, held)
    return peak


def peak_extra_memory_mb(fn: Callable[[], object], device: torch.device) -> Tuple[float, str]:
    """(peak memory above the pre-call baseline during one call of `fn`, in MiB; the method).

    The result and anything the call leaves behind (a .grad) count, as they are memory the call
    needs; the caller's inputs, allocated before, do not. Run it outside the timed calls.
    """
    if device.type == "cuda":
        synchronize(device)
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - baseline
        return max(0, peak) / 2 ** 20, CUDA_MEMORY_METHOD
    return _cpu_peak_extra_bytes(fn) / 2 ** 20, CPU_MEMORY_METHOD


# --------------------------------------------------------------------------- CSV

def format_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return f"{value:.6g}"
    return str(value)


def append_rows(rows: Iterable[Dict[str, object]], path: os.PathLike | str = DEFAULT_CSV) -> Path:
    """Append rows (dicts keyed by CSV_COLUMNS) to `path`, writing the header to a new file.

    An existing file whose header differs from CSV_COLUMNS is an error: rows of two schemas in
    one file would make every later plot wrong.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = list(rows)
    for row in rows:
        unknown = set(row) - set(CSV_COLUMNS)
        if unknown:
            raise KeyError(f"columns not in the bench schema: {sorted(unknown)}")
    new_file = not path.exists() or path.stat().st_size == 0
    if not new_file:
        with open(path, newline="") as existing:
            header = next(csv.reader(existing), [])
        if tuple(header) != CSV_COLUMNS:
            raise ValueError(f"{path} has a different header than the bench schema; move it "
                             f"aside.\n  file:   {header}\n  schema: {list(CSV_COLUMNS)}")
    with open(path, "a", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS)
        if new_file:
            writer.writeheader()
        for row in rows:
            writer.writerow({column: format_value(row.get(column)) for column in CSV_COLUMNS})
    return path


def read_rows(path: os.PathLike | str = DEFAULT_CSV) -> List[Dict[str, str]]:
    with open(path, newline="") as source:
        reader = csv.DictReader(source)
        if tuple(reader.fieldnames or ()) != CSV_COLUMNS:
            raise ValueError(f"{path} does not have the bench schema header")
        return list(reader)
