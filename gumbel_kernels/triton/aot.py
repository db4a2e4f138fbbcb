"""Every Triton kernel variant the launcher of gumbel_kernels.triton.gol_loss can request,
compiled ahead of time for a GPU target without a GPU (triton.compile with a GPUTarget).

The interpreter (TRITON_INTERPRET=1) runs code the compiler rejects; compiling each variant in
CI catches that, and the cubins feed the SASS report (`python -m bench.sass_report`). A variant
is the kernel's compile-time constants (gol_loss.kernel_constants) and pointer dtypes; its
integer arguments are typed as a call's values type them (total is int64 past 2^31).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Dict, Iterator, Tuple

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import gol_loss as kernels

HOPPER = GPUTarget("cuda", 90, 32)
# torch dtype name -> Triton pointee type
_ELEMENT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}


@dataclass(frozen=True)
class Variant:
    kernel: str                     # the @triton.jit function's name in gol_loss.py
    signature: Tuple[Tuple[str, str], ...]
    constants: Tuple[Tuple[str, object], ...] = ()
    num_warps: int = 4
    label: str = ""                 # what the variant is, for reports
    options: Dict = field(default_factory=dict, compare=False, hash=False)


def _pointer_attrs(fn, signature) -> dict:
    # torch allocations are 16-byte aligned: the launcher's ordinary call specialises its
    # pointers so (an offset view compiles another variant at run time).
    return {(fn.arg_names.index(name),): [["tt.divisibility", 16]]
            for name, ty in signature if ty.startswith("*")}


def _loss_kernel_variants() -> Iterator[Variant]:
    for dtype, activation, bounded, exact, wide, full, total in itertools.product(
            _ELEMENT, ("gumbel", "sigmoid"), (True, False), (False, True), (True, False),
            (True, False), ("i32", "i64")):
        float64 = dtype == "float64"
        gumbel = activation == "gumbel"
        if (bounded and (not gumbel or float64)) or (exact and not gumbel):
            continue  # the launcher never asks for these (kernel_constants)
        element = _ELEMENT[dtype]
        math = "fp64" if float64 else "fp32"
        tile = kernels.MAX_TILE if wide else kernels.NARROW_TILE
        signature = (
            ("logits_ptr", f"*{element}"), ("codes_ptr", "*i32"), ("drop_ptr", "*u8"),
            ("thresholds_ptr", "*i32"),
            ("class_weight_ptr", f"*{math}"), ("row_weight_ptr", f"*{math}"),
            ("counts_ptr", "*i64"), ("ratio_ptr", "*fp32"), ("seed_ptr", "*i64"),
            ("grad_ptr", f"*{element}"), ("loss_ptr", f"*{element}"), ("partials_ptr", "*fp64"),
            ("first_tile", "i32"), ("end_tile", "i32"), ("tiles_per_program", "i32"),
            ("first_partial", "i32"), ("total", total), ("num_rows", "i32"), ("num_classes", "i32"),
            ("offset_lo", "i32"), ("offset_hi", "i32"),
            ("lo_bits", "i64"), ("hi_bits", "i64"), ("inv_c_bits", "i64"),
            *((name, "i32") for name in kernels._RUNTIME_SWITCHES))
        constants = (("GUMBEL", gumbel), ("BOUNDED", bounded), ("GRAD_EXACT", exact),
                     ("FLOAT64", float64), ("WIDE_ROWS", wide), ("FULL", full),
                     ("GROUPS", tile // 4), ("COMMON_PATH_ONLY", False))
        label = (f"{dtype} {activation}{' bounded' if bounded else ''}"
                 f"{' exact' if exact else ''} {'wide' if wide else 'narrow'}"
                 f"{'' if full else ' tail'} total:{total}")
        yield Variant("_gol_loss_kernel", signature, constants, kernels._num_warps(tile), label,
                      kernels.register_cap(full, getattr(torch, dtype), bounded, wide,
                                           total == "i64"))


# The runtime switches of the fused kernel on GOL's common path (DropLoss, no class or row
# weights, a gradient, a scalar mean loss): bound as constants, with COMMON_PATH_ONLY (a tile of
# background rows), they leave the SASS of exactly what that path executes
# (bench/sass_report.py counts it).
COMMON_PATH_SWITCHES = dict(drop_mode=2, has_class_weight=0, has_row_weight=0, need_grad=1,
                            store_loss=0, mean=1)


def common_path_variants() -> Iterator[Variant]:
    """The fused kernel on the common path: float32 and bfloat16, the bounded math, the
    reference gradient, a whole wide tile, its runtime switches bound."""
    for variant in _loss_kernel_variants():
        constants = dict(variant.constants)
        dtype = variant.label.split()[0]
        if (dtype in ("float32", "bfloat16") and constants["BOUNDED"] and not constants["GRAD_EXACT"]
                and constants["WIDE_ROWS"] and constants["FULL"] and "total:i32" in variant.label):
            signature = tuple((n, t) for n, t in variant.signature if n not in COMMON_PATH_SWITCHES)
            constants.update(COMMON_PATH_SWITCHES, COMMON_PATH_ONLY=True)
            yield Variant(variant.kernel, signature, tuple(constants.items()),
                          variant.num_warps, variant.label + ", switches bound",
                          variant.options)


def variants() -> Iterator[Variant]:
    """Every variant of every kernel of the Triton backend."""
    yield from _loss_kernel_variants()
    for has_drop in (False, True):
        yield Variant("_row_statistics_kernel",
                      (("labels_ptr", "*i64"), ("drop_ptr", "*u8"), ("counts_ptr", "*i64"),
                       ("ratio_ptr", "*fp32"), ("codes_ptr", "*i32"), ("thresholds_ptr", "*i32"),
                       ("num_rows", "i32"), ("num_classes", "i32"),
                       ("ignore_index", "i32")),
                      (("HAS_DROP", has_drop), ("BLOCK", kernels.STATS_BLOCK)),
                      label=f"has_drop={has_drop}")
    for loss, mean in itertools.product(("fp32", "fp64"), (False, True)):
        yield Variant("_finalize_kernel",
                      (("partials_ptr", "*fp64"), ("counts_ptr", "*i64"), ("loss_ptr", f"*{loss}"),
                       ("num_partials", "i32")),
                      (("MEAN", mean), ("BLOCK", kernels.FINALIZE_BLOCK)),
                      label=f"{loss} mean={mean}")
    for element in _ELEMENT.values():
        float64 = element == "fp64"
        yield Variant("_scale_grad_kernel",
                      (("grad_ptr", f"*{element}"), ("scale_ptr", "*fp32" if not float64 else "*fp64"),
                       ("numel", "i32")),
                      (("FLOAT64", float64), ("BLOCK", kernels.SCALE_BLOCK)),
                      label=element)


def compile_variant(variant: Variant, target: GPUTarget = HOPPER):
    """triton.compile of one variant: the CompiledKernel (asm: ttir, ttgir, llir, ptx, cubin)."""
    fn = getattr(kernels, variant.kernel)
    signature = dict(variant.signature)
    constants = dict(variant.constants)
    signature.update({name: "constexpr" for name in constants})
    source = ASTSource(fn, signature, constexprs=constants,
                       attrs=_pointer_attrs(fn, variant.signature))
    return triton.compile(source, target=target,
                          options={"num_warps": variant.num_warps, **variant.options})
