"""Every Triton kernel variant the launcher can request compiles for sm_90, ahead of time and
without a GPU (triton.compile with a GPUTarget; gumbel_kernels.triton.aot lists the variants).
The interpreter accepts code the compiler rejects: this is the compiler's word on it."""
import os

import pytest

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("compiles ahead of time; the interpreter run is tests/test_triton.py",
                allow_module_level=True)
triton = pytest.importorskip("triton")

from bench import sass_report  # noqa: E402
from gumbel_kernels.triton import aot  # noqa: E402

VARIANTS = list(aot.variants())


def test_gol_usual_launch_is_register_capped():
    capped = [v.label for v in VARIANTS if "maxnreg" in v.options]
    assert capped and all("gumbel bounded" in label and "wide" in label and "tail" not in label
                          and not label.startswith("float64") for label in capped)
    assert any(label.startswith("float32 gumbel bounded wide") for label in capped)


def test_the_variant_list_covers_the_launcher():
    # Each constant the launcher derives (gol_loss.kernel_constants) appears in the list.
    loss = [dict(v.constants) for v in VARIANTS if v.kernel == "_gol_loss_kernel"]
    for key in ("GUMBEL", "BOUNDED", "GRAD_EXACT", "FLOAT64", "WIDE_ROWS", "FULL"):
        assert {c[key] for c in loss} == {False, True}, key
    assert {v.kernel for v in VARIANTS} == {"_gol_loss_kernel", "_row_statistics_kernel",
                                           "_finalize_kernel", "_scale_grad_kernel"}


@pytest.mark.parametrize("variant", VARIANTS, ids=[f"{v.kernel}:{v.label}" for v in VARIANTS])
def test_variant_compiles_for_sm90(variant):
    compiled = aot.compile_variant(variant)
    assert compiled.asm["cubin"] and ".target sm_90" in compiled.asm["ptx"]
    # Under its register cap (GOL's usual launch) the fused kernel does not spill and keeps
    # the occupancy the cap is for (gol_loss.register_cap).
    if "maxnreg" in variant.options:
        instructions, use = sass_report._cubin_sass(compiled.asm["cubin"])
        assert "STL" not in sass_report.memory_widths(instructions) and use["local"] == 0
        cap = variant.options["maxnreg"]
        assert use["registers"] <= cap
        threads = 32 * variant.num_warps
        assert sass_report.occupancy(use["registers"], threads,
                                     compiled.metadata.shared) >= {40: 0.75, 48: 0.625}[cap]
