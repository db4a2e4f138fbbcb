"""`make gpu-check`: everything a lent GPU machine should run, as one command under 8 minutes.

1. build the extension for the visible GPU's arch (TORCH_CUDA_ARCH_LIST from the device);
2. the CUDA and Triton tests on the device (the `cuda` targets of the kernel tests, the compiled
   Triton tests);
3. compute-sanitizer memcheck and racecheck on a reduced set of CUDA tests;
4. the benchmark's cuda and triton providers at the headline shapes (N=8192; C=1203 and the
   V3Det-size 13204; float32 and bfloat16; forward + backward), beside the same-size copy and
   the best torch.compile baseline.
It writes bench/results/gpu_check.md (and gpu_check.log) and, when $OUT is set (the device
tool), copies both there. Each step has a time limit; a failing step is reported, not fatal.
Runs under whichever Python has torch (a bare GPU machine's own python3 included): it installs
nothing but the extension itself.
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import subprocess
import sys
import time
from typing import List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
BENCH_CSV = os.path.join(RESULTS, "gpu_check_bench.csv")
SUMMARY_LINE = re.compile(r"=+ (.*(passed|failed|error|skipped).*) in [\d.]+s")


class Step:
    def __init__(self, name: str, command: List[str], limit: int, env: Optional[dict] = None):
        self.name, self.command, self.limit, self.env = name, command, limit, env
        self.returncode: Optional[int] = None
        self.seconds = 0.0
        self.output = ""

    def run(self, log) -> None:
        start = time.monotonic()
        log.write(f"\n$ {' '.join(self.command)}\n")
        log.flush()
        try:
            done = subprocess.run(self.command, cwd=ROOT, env={**os.environ, **(self.env or {})},
                                  capture_output=True, text=True, timeout=self.limit)
            self.returncode, self.output = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as expired:
            self.returncode = -1
            self.output = f"{expired.stdout or ''}{expired.stderr or ''}\n(timed out after " \
                          f"{self.limit} s)"
        except FileNotFoundError as missing:
            self.returncode, self.output = -2, f"not run: {missing}"
        self.seconds = time.monotonic() - start
        log.write(self.output[-20000:])
        log.flush()

    def summary(self) -> str:
        found = SUMMARY_LINE.findall(self.output)
        if found:
            return found[-1][0]
        if self.returncode == -2:
            return self.output.strip()
        return "ok" if self.returncode == 0 else f"exit {self.returncode}"


def _arch_list(python: str) -> str:
    probe = subprocess.run([python, "-c", "import torch; print('%d.%d' % "
                            "torch.cuda.get_device_capability())"],
                           capture_output=True, text=True, check=False)
    return probe.stdout.strip() or "9.0"


def steps(python: str, quick: bool) -> List[Step]:
    pytest = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    kernel_tests = ["tests/test_gol_loss.py", "tests/test_class_stats.py", "tests/test_op_edges.py"]
    sanitized = ("cuda] and (over_shapes or unaligned or bad_label or scale_grad "
                 "or identical_dropped)")
    bench = [python, "-m", "bench.gol_loss_bench", "--device", "cuda", "--csv", BENCH_CSV,
             "--providers", "compile_rewrite,cuda,triton", "--modes", "full",
             "--shapes", "gpu", "--dtypes", "float32,bfloat16",
             "--budget", "0.5" if quick else "1", "--no-memory"]
    build_env = {"TORCH_CUDA_ARCH_LIST": _arch_list(python), "MAX_JOBS": str(os.cpu_count() or 8),
                 "FORCE_CUDA": "1"}
    sanitizer = shutil.which("compute-sanitizer") or "compute-sanitizer"
    return [
        Step("build", [python, "-m", "pip", "install", "--no-build-isolation", "--no-deps",
                       "--no-index", "-e", "."], 240, build_env),
        Step("cuda tests", pytest + kernel_tests + ["-k", "cuda and not cuda_emulated"], 150),
        Step("triton tests (compiled)", pytest + ["tests/test_triton.py"], 120),
        Step("memcheck", [sanitizer, "--tool", "memcheck", "--error-exitcode", "9"] + pytest
             + ["tests/test_gol_loss.py", "-k", sanitized], 120),
        Step("racecheck", [sanitizer, "--tool", "racecheck", "--error-exitcode", "9"] + pytest
             + ["tests/test_gol_loss.py", "-k", sanitized], 120),
        Step("bench", bench, 150),
    ]


def bench_table() -> List[str]:
    if not os.path.exists(BENCH_CSV):
        return ["(no benchmark rows)"]
    with open(BENCH_CSV) as f:
        rows = list(csv.DictReader(f))
    last = max(r["timestamp"] for r in rows) if rows else None
    lines = ["| provider | N x C | dtype | median ms [p20-p80] | vs copy | vs best compile |",
             "|---|---|---|---:|---:|---:|"]
    for r in rows:
        if r["timestamp"] != last or r["provider"] not in ("cuda", "triton"):
            continue
        lines.append(f"| {r['provider']} | {r['N']} x {r['C']} | {r['dtype']} | "
                     f"{float(r['median_ms']):.4f} [{float(r['p20_ms']):.4f}-"
                     f"{float(r['p80_ms']):.4f}] | {float(r['time_vs_copy']):.2f}x | "
                     f"{r['speedup_vs_best_compile']}x |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--python", default=sys.executable, help="the Python that runs the steps")
    parser.add_argument("--quick", action="store_true", help="shorter benchmark budget")
    args = parser.parse_args(argv)
    os.makedirs(RESULTS, exist_ok=True)
    log_path = os.path.join(RESULTS, "gpu_check.log")
    done = []
    with open(log_path, "w") as log:
        for step in steps(args.python, args.quick):
            step.run(log)
            done.append(step)
            print(f"[gpu-check] {step.name}: {step.summary()} ({step.seconds:.0f} s)", flush=True)
            if step.name == "build" and step.returncode != 0:
                break
    device = subprocess.run([args.python, "-c", "import torch; print(torch.cuda.get_device_name())"],
                            capture_output=True, text=True, check=False).stdout.strip()
    lines = [f"# gpu-check on {device or 'an unknown device'}", "",
             "| step | result | seconds |", "|---|---|---:|"]
    lines += [f"| {s.name} | {s.summary()} | {s.seconds:.0f} |" for s in done]
    lines += ["", "Benchmark (forward + backward; copy = same-size device copy, compile = the best "
              "torch.compile baseline, in the same run):", ""] + bench_table()
    summary_path = os.path.join(RESULTS, "gpu_check.md")
    with open(summary_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    if os.environ.get("OUT"):
        for path in (summary_path, log_path, BENCH_CSV):
            if os.path.exists(path):
                shutil.copy(path, os.environ["OUT"])
    return 0 if all(s.returncode == 0 for s in done) else 1


if __name__ == "__main__":
    sys.exit(main())
