"""The CMake build of csrc/ (libgumbel_ops.so) loads with torch.ops.load_library and computes what
the pure-PyTorch reference computes.

`make test` builds it first (`make cmake-build`) and sets GUMBEL_REQUIRE_CMAKE_BUILD=1, so a
missing library fails there; a bare pytest run skips instead.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from gumbel_kernels import reference

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "build" / "cmake" / "libgumbel_ops.so"

# Runs in a fresh interpreter: this process already holds the `gumbel` library from
# gumbel_kernels._C, and an operator library may be registered only once per process.
CHILD = r"""
import json, sys, torch
torch.ops.load_library(sys.argv[1])
g = torch.Generator().manual_seed(0)
logits = torch.randn(9, 13, generator=g) * 4
labels = torch.tensor([0, 13, 5, 13, 12, -100, 13, 2, 13])
drop = torch.arange(13) % 3 == 0
out = {}
for mode in ("bce", "eql", "droploss"):
    loss, grad = torch.ops.gumbel.gol_loss(logits, labels, drop, None, None, torch.tensor([42]),
                                           3, mode)
    out[mode] = [loss.item(), grad.tolist()]
out["cuda_kernel"] = torch._C._dispatch_has_kernel_for_dispatch_key("gumbel::gol_loss", "CUDA")
print(json.dumps(out))
"""


def test_cmake_library_loads_and_matches_reference():
    if not LIBRARY.exists():
        if os.environ.get("GUMBEL_REQUIRE_CMAKE_BUILD") == "1":
            pytest.fail(f"{LIBRARY} is missing: `make cmake-build` should have built it")
        pytest.skip(f"{LIBRARY} not built (run `make cmake-build`)")
    result = subprocess.run([sys.executable, "-c", CHILD, str(LIBRARY)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 13, generator=g) * 4
    labels = torch.tensor([0, 13, 5, 13, 12, -100, 13, 2, 13])
    drop = torch.arange(13) % 3 == 0
    for mode in ("bce", "eql", "droploss"):
        loss, grad = reference.gol_loss_forward(logits, labels, drop, None, None,
                                                torch.tensor([42]), 3, mode, "gumbel", "mean",
                                                -4.0, 10.0, "reference", -100, True)
        assert out[mode][0] == pytest.approx(loss.item(), rel=1e-5)
        torch.testing.assert_close(torch.tensor(out[mode][1]), grad, rtol=1e-5, atol=1e-6)
    if os.environ.get("GUMBEL_EXPECT_CUDA_KERNEL") == "1":
        assert out["cuda_kernel"], "the CMake build should contain the CUDA kernels"
