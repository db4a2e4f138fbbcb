"""`make sass-report`: what the GPU kernels compile to, read from their sm_90 SASS without a GPU.

For every kernel instantiation of the built extension (gumbel_kernels/_C*.so, cuobjdump from the
triton wheel) and every ahead-of-time compiled Triton kernel (gumbel_kernels.triton.aot):
registers, theoretical occupancy on an H100/H200, spills, the widths of its global loads and
stores; and for the fused loss kernels, the instructions executed per element on the common
path, counted as follows:

- the common path is GOL's usual element: a background row of DropLoss (Philox drawn), a
  drop-class column, float32 (and bfloat16) logits, the default clamp (the bounded math), the
  reference gradient, no class or row weights, a gradient stored, a scalar loss;
- CUDA: csrc/cuda/gol_kernels.cuh compiled with GK_SASS_COMMON_PATH, which turns every branch
  off that path into a no-op, so that the row walk's inner loop holds exactly the instructions
  the path executes per group of four elements (the loads, the Philox call, the four elements'
  math, the stores, the loop control and the branch tests that pick the path). Count: the SASS
  instructions from the inner loop's head to its back-edge (NOPs excluded), divided by 4. The
  per-row work outside the loop (the row's facts, its setup) is reported apart, per element of
  a 1203-wide row;
- Triton: the fused kernel compiled with the call's runtime switches bound to the common path's
  values and FULL (a whole tile), so that the only branch left is the Philox one, taken. Count:
  all its instructions, divided by the elements a thread owns (TILE / threads).
The shipped kernels have the same code on that path plus uniform branches for the switches
(a few instructions per row or per tile).

Writes bench/results/sass_report.md (and .csv), and prints the table.
"""
from __future__ import annotations

import argparse
import csv
import glob
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
ARCH = "sm_90"
LVIS_CLASSES = 1203

# sm_90 limits per SM (CUDA C Programming Guide, compute capability 9.0).
REGISTERS_PER_SM = 65536
REGISTER_ALLOCATION_UNIT = 256  # registers, per warp
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
SHARED_PER_SM = 228 * 1024
SHARED_RESERVED_PER_BLOCK = 1024

# For the time estimate (H100 SXM; an H200 has the same SM array and 4.8 TB/s).
H100_SMS = 132
H100_CLOCK_HZ = 1.98e9
H100_ISSUE_PER_SM_CYCLE = 4  # warp instructions: one per sub-partition scheduler
H100_DRAM_BYTES_PER_S = 3.35e12

_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")
_RESOURCE = re.compile(r"Function ([^\s:]+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def tool(name: str) -> str:
    """cuobjdump / nvdisasm: from the triton wheel (no CUDA toolkit needed), else the PATH."""
    try:
        import triton
        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.exists(path):
            return path
    except ImportError:
        pass
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found (it ships in the triton wheel)")
    return found


def _run(args: Sequence[str]) -> str:
    return subprocess.run(list(args), capture_output=True, text=True, check=True).stdout


@dataclass
class Instruction:
    address: int
    text: str  # predicate, opcode and operands

    @property
    def opcode(self) -> str:
        words = self.text.split()
        return words[1] if words[0].startswith("@") else words[0]

    def branch_target(self) -> Optional[int]:
        if not self.opcode.startswith("BRA"):
            return None
        targets = re.findall(r"0x([0-9a-f]+)", self.text)
        return int(targets[-1], 16) if targets else None


def parse_sass(text: str) -> Dict[str, List[Instruction]]:
    """Function name -> its instructions, from cuobjdump -sass output."""
    functions: Dict[str, List[Instruction]] = {}
    current: Optional[List[Instruction]] = None
    for line in text.splitlines():
        header = _FUNCTION.match(line)
        if header:
            current = functions.setdefault(header.group(1), [])
            continue
        instruction = _INSTRUCTION.match(line)
        if instruction and current is not None:
            current.append(Instruction(int(instruction.group(1), 16), instruction.group(2)))
    return functions


def parse_resources(text: str) -> Dict[str, Dict[str, int]]:
    return {m.group(1): dict(registers=int(m.group(2)), stack=int(m.group(3)),
                             shared=int(m.group(4)), local=int(m.group(5)))
            for m in _RESOURCE.finditer(text)}


def demangle(names: Sequence[str]) -> Dict[str, str]:
    if not names or not shutil.which("c++filt"):
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return dict(zip(names, out))


def occupancy(registers: int, threads: int, shared: int) -> float:
    """Theoretical occupancy (resident warps / 64) of a kernel on an sm_90 SM."""
    warps = math.ceil(threads / 32)
    per_warp = math.ceil(max(registers, 1) * 32 / REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
    blocks = min(REGISTERS_PER_SM // (per_warp * warps), MAX_WARPS_PER_SM // warps,
                 MAX_BLOCKS_PER_SM)
    if shared:
        blocks = min(blocks, SHARED_PER_SM // (shared + SHARED_RESERVED_PER_BLOCK))
    return blocks * warps / MAX_WARPS_PER_SM


def memory_widths(instructions: Sequence[Instruction]) -> Dict[str, int]:
    """Counts of global loads/stores by width (bits), and of local-memory accesses."""
    counts: Dict[str, int] = {}
    for instruction in instructions:
        op = instruction.opcode
        kind = next((k for k in ("LDG", "STG", "LDL", "STL") if op.startswith(k)), None)
        if kind is None:
            continue
        width = next((w for w in ("128", "64", "U16", "16", "U8", "S8", "8") if f".{w}" in op), "32")
        width = {"U16": "16", "U8": "8", "S8": "8"}.get(width, width)
        key = kind if kind in ("LDL", "STL") else f"{kind}.{width}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def innermost_loop(instructions: Sequence[Instruction], marker: str) -> Tuple[int, int]:
    """(first, last) indices of the innermost loop (a backward branch's span) that contains an
    instruction whose text contains `marker`."""
    marks = [i for i, ins in enumerate(instructions) if marker in ins.text]
    inside = [(a, b) for a, b in _loops(instructions) if any(a <= m <= b for m in marks)]
    if not inside:
        raise ValueError(f"no loop around {marker!r}")
    return min(inside, key=lambda span: span[1] - span[0])


def counted(instructions: Sequence[Instruction]) -> int:
    return sum(1 for ins in instructions if ins.opcode != "NOP")


@dataclass
class Row:
    backend: str
    kernel: str
    registers: int
    occupancy: float
    spill_bytes: int
    widths: Dict[str, int]
    per_element: Optional[float] = None
    per_row: Optional[float] = None
    notes: str = ""
    estimate_us: Dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------- CUDA --

def extension_binary() -> str:
    found = sorted(glob.glob(os.path.join(ROOT, "gumbel_kernels", "_C*.so")))
    if not found:
        raise FileNotFoundError("gumbel_kernels/_C*.so is not built: run `make build`")
    return found[0]


def has_ptx(binary: str, arch: str = "sm_90") -> bool:
    return f".{arch}.ptx" in _run([tool("cuobjdump"), "--list-ptx", binary])


def cuda_rows(binary: str) -> List[Row]:
    sass = parse_sass(_run([tool("cuobjdump"), "-sass", "-arch", ARCH, binary]))
    resources = parse_resources(_run([tool("cuobjdump"), "-res-usage", "-arch", ARCH, binary]))
    names = demangle(list(sass))
    rows = []
    for mangled, instructions in sorted(sass.items(), key=lambda kv: names[kv[0]]):
        use = resources.get(mangled, dict(registers=0, stack=0, shared=0, local=0))
        widths = memory_widths(instructions)
        rows.append(Row("cuda", _short(names[mangled]), use["registers"],
                        occupancy(use["registers"], 256, use["shared"]),
                        use["local"] + 4 * (widths.get("STL", 0)), widths))
    return rows


_ENUMS = {"(MathKind)0": "bounded", "(MathKind)1": "series", "(MathKind)2": "closed",
          "(MathKind)3": "sigmoid", "(GradMode)0": "reference", "(GradMode)1": "exact"}


def _short(name: str) -> str:
    """A demangled kernel name without namespaces and parameter list, its enum template
    arguments spelled out: `gol_rows_kernel<float, bounded, reference, false>`."""
    name = name.replace("gk::cuda::", "").replace("gk::", "")
    for cast, word in _ENUMS.items():
        name = name.replace(cast, word)
    if name.endswith(")"):  # drop the parameter list: the parenthesis matching the last one
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                name = name[:i]
                break
    name = re.sub(r"^void ", "", name)
    return name.replace("__nv_bfloat16", "bf16").replace("__half", "f16")


COMMON_PATH_SOURCE = """
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "cuda/gol_kernels.cuh"
namespace gk { namespace cuda {
template __global__ void gol_rows_kernel<float, MathKind::kBounded, GradMode::kReference, false>(const RowsArgs<float>);
template __global__ void gol_rows_kernel<__nv_bfloat16, MathKind::kBounded, GradMode::kReference, false>(const RowsArgs<__nv_bfloat16>);
}}
"""


def cuda_common_path(nvcc: str) -> List[Row]:
    """The fused kernel's common path, compiled apart with GK_SASS_COMMON_PATH (see the top)."""
    with tempfile.TemporaryDirectory() as work:
        source = os.path.join(work, "common_path.cu")
        with open(source, "w") as f:
            f.write(COMMON_PATH_SOURCE)
        cubin = os.path.join(work, "common_path.cubin")
        subprocess.run([nvcc, "-std=c++20", "--expt-relaxed-constexpr", "-O3", f"-arch={ARCH}",
                        "-cubin", "-DGK_SASS_COMMON_PATH", "-I", os.path.join(ROOT, "csrc"),
                        "-o", cubin, source], check=True, capture_output=True, text=True)
        sass = parse_sass(_run([tool("cuobjdump"), "-sass", cubin]))
    rows = []
    names = demangle(list(sass))
    for mangled, instructions in sass.items():
        if "gol_rows_kernel" not in mangled:
            continue
        # The row walk's inner loop: the innermost loop around the element math.
        first, last = innermost_loop(instructions, "MUFU.EX2")
        loop = counted(instructions[first:last + 1])
        # The row loop (the outer one) minus the inner loop: the per-row work.
        outer = [(a, b) for a, b in _loops(instructions) if a < first and b > last]
        per_row = None
        if outer:
            a, b = min(outer, key=lambda span: span[1] - span[0])
            per_row = counted(instructions[a:b + 1]) - loop
        rows.append(Row("cuda", _short(names[mangled]) + " [common path]", 0, 0.0, 0, {},
                        per_element=loop / 4, per_row=per_row,
                        notes=f"inner loop {loop} instructions per group of 4"))
    return rows


def _loops(instructions):
    """(first, last) indices of each loop: a backward branch and its target."""
    index = {ins.address: i for i, ins in enumerate(instructions)}
    for i, ins in enumerate(instructions):
        target = ins.branch_target()
        if target is not None and target <= ins.address and target in index:
            yield index[target], i


# ----------------------------------------------------------------------------------- Triton --

def _cubin_sass(cubin: bytes) -> Tuple[List[Instruction], Dict[str, int]]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = parse_sass(_run([tool("cuobjdump"), "-sass", f.name]))
        use = parse_resources(_run([tool("cuobjdump"), "-res-usage", f.name]))
    (name, instructions), = sass.items()
    return instructions, use.get(name, dict(registers=0, stack=0, shared=0, local=0))


def triton_rows(common_only: bool = False) -> List[Row]:
    from gumbel_kernels.triton import aot
    from gumbel_kernels.triton import gol_loss as kernels
    rows = []
    variants = [] if common_only else list(aot.variants())
    for variant in variants:
        compiled = aot.compile_variant(variant)
        instructions, use = _cubin_sass(compiled.asm["cubin"])
        threads = 32 * variant.num_warps
        widths = memory_widths(instructions)
        rows.append(Row("triton", f"{variant.kernel} {variant.label}", use["registers"],
                        occupancy(use["registers"], threads, compiled.metadata.shared),
                        use["local"] + 4 * widths.get("STL", 0), widths))
    for variant in aot.common_path_variants():
        compiled = aot.compile_variant(variant)
        instructions, use = _cubin_sass(compiled.asm["cubin"])
        threads = 32 * variant.num_warps
        per_thread = kernels.MAX_TILE / threads
        # A program walks its tiles in a loop: the loop body is one tile's work per thread.
        first, last = innermost_loop(instructions, "MUFU.EX2")
        body = counted(instructions[first:last + 1])
        outside = counted(instructions) - body
        rows.append(Row("triton", f"{variant.kernel} {variant.label} [common path]",
                        use["registers"],
                        occupancy(use["registers"], threads, compiled.metadata.shared),
                        use["local"], memory_widths(instructions),
                        per_element=body / per_thread,
                        notes=f"tile loop {body} instructions for {per_thread:g} elements per "
                              f"thread; {outside} once per program"))
    return rows


# ---------------------------------------------------------------------------------- report --

def estimate_us(per_element: float, bytes_per_element: int, n: int = 8192,
                c: int = LVIS_CLASSES) -> Dict[str, float]:
    """H100 estimates (no GPU measured): issue-bound and memory-bound times of one call."""
    elements = n * c
    issue = elements / 32 * per_element / (H100_SMS * H100_ISSUE_PER_SM_CYCLE * H100_CLOCK_HZ)
    memory = elements * bytes_per_element / H100_DRAM_BYTES_PER_S
    return {"issue": issue * 1e6, "memory": memory * 1e6}


def element_bytes(kernel: str) -> int:
    """Global bytes per element of the fused pass: the logit read and the gradient written."""
    return 4 if ("bf16" in kernel or "bfloat16" in kernel or "f16" in kernel) else 8


def format_table(rows: Sequence[Row]) -> List[str]:
    lines = ["| backend | kernel | registers | occupancy | spill bytes | global loads | global stores "
             "| instr./element (common path) | notes |",
             "|---|---|---:|---:|---:|---|---|---:|---|"]
    for r in rows:
        loads = ", ".join(f"{k[4:]}b x{v}" for k, v in sorted(r.widths.items()) if k.startswith("LDG"))
        stores = ", ".join(f"{k[4:]}b x{v}" for k, v in sorted(r.widths.items()) if k.startswith("STG"))
        per = f"{r.per_element:.1f}" if r.per_element is not None else ""
        note = r.notes
        if r.per_row is not None:
            note += f"; per row {r.per_row} ({r.per_row / LVIS_CLASSES * 32:.1f}/element at C=1203)"
        if r.estimate_us:
            note += (f"; H100 estimate at 8192x1203: issue {r.estimate_us['issue']:.0f} us, "
                     f"memory {r.estimate_us['memory']:.0f} us")
        regs = str(r.registers) if r.registers else ""
        occ = f"{r.occupancy:.0%}" if r.registers else ""
        lines.append(f"| {r.backend} | `{r.kernel}` | {regs} | {occ} | {r.spill_bytes if r.registers else ''} "
                     f"| {loads} | {stores} | {per} | {note.strip('; ')} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--binary", default=None, help="the built extension (default: gumbel_kernels/_C*.so)")
    parser.add_argument("--nvcc", default=shutil.which("nvcc") or "nvcc")
    parser.add_argument("--all-triton", action="store_true",
                        help="every Triton variant (slow: ~1 s each), not only the common path")
    parser.add_argument("--out", default=os.path.join(RESULTS, "sass_report.md"))
    args = parser.parse_args(argv)
    binary = args.binary or extension_binary()
    rows = [r for r in cuda_rows(binary) if "gol_rows_kernel" in r.kernel or "prepare" in r.kernel
            or "class_stats" in r.kernel or "scale_grad" in r.kernel]
    common = cuda_common_path(args.nvcc)
    triton = triton_rows(common_only=not args.all_triton)
    for r in common + triton:
        if r.per_element is not None:
            r.estimate_us = estimate_us(r.per_element, element_bytes(r.kernel))
    all_rows = common + triton + rows
    lines = [f"# SASS report ({ARCH}, no GPU: compiled and disassembled only)", "",
             f"PTX embedded in {os.path.basename(binary)}: {'yes' if has_ptx(binary) else 'NO'}", ""]
    lines += format_table(all_rows)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.splitext(args.out)[0] + ".csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["backend", "kernel", "registers", "occupancy", "spill_bytes", "widths",
                         "per_element", "per_row", "notes"])
        for r in all_rows:
            writer.writerow([r.backend, r.kernel, r.registers, f"{r.occupancy:.4f}", r.spill_bytes,
                             " ".join(f"{k}:{v}" for k, v in sorted(r.widths.items())),
                             "" if r.per_element is None else f"{r.per_element:.2f}",
                             "" if r.per_row is None else r.per_row, r.notes])
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
