"""The CUDA emulator built with AddressSanitizer + UBSan and with ThreadSanitizer (the CMake
targets gumbel_cuda_emulated_{asan,tsan}; the stand-ins for compute-sanitizer's memcheck and
racecheck): each build first proves it catches its class of bug on a test-only kernel with that
bug (csrc/cuda_emulation/sanitizer_probes.h), then runs a reduced grid of the emulated CUDA tests
clean. Each run is a subprocess with the sanitizer runtime preloaded into Python and the
sanitized library loaded in place of gumbel_kernels/_cuda_emulated*.so."""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "cmake"
REQUIRED = os.environ.get("GUMBEL_REQUIRE_CMAKE_BUILD") == "1"

# The emulated tests that also run under each sanitizer: every kernel, dtype and launch path
# (vector and scalar, grid-stride loops, the label pre-pass, partials, class statistics, the
# backward), at small sizes; the 2^31-element and the dense-grid tests are left to the plain
# emulator (a sanitizer makes them minutes long).
REDUCED_GRID = ("cuda_emulated and not beyond_int32 and not dense_grid and not reused_output "
                "and not deterministic and not gradcheck and not compile and not opcheck")
REDUCED_SETTINGS = ("droploss-gumbel-mean", "eql-sigmoid-none", "bce-gumbel-sum")

SANITIZERS = {
    "asan": dict(
        runtime=("libasan.so", "libstdc++.so.6"),
        options={"ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:alloc_dealloc_mismatch=0",
                 "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1"},
        probes={"out_of_bounds": "AddressSanitizer: heap-buffer-overflow",
                "misaligned_vector_load": "misaligned address"}),
    "tsan": dict(
        runtime=("libtsan.so", "libstdc++.so.6"),
        options={"TSAN_OPTIONS": "halt_on_error=1:report_signal_unsafe=0"},
        probes={"missing_barrier": "ThreadSanitizer: data race"}),
}


def _runtime_path(name: str) -> str:
    path = subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True,
                          check=False).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else ""


def _environment(kind: str) -> dict:
    # The sanitizer runtime must be loaded first, and libstdc++ with it (Python does not link
    # it, and ASan's __cxa_throw interceptor needs the real one at start-up).
    library = BUILD / f"libgumbel_cuda_emulated_{kind}.so"
    runtimes = [_runtime_path(name) for name in SANITIZERS[kind]["runtime"]]
    if not library.exists() or not all(runtimes):
        message = (f"the {kind} build of the CUDA emulator ({library}) or the compiler's "
                   f"{' / '.join(SANITIZERS[kind]['runtime'])} is missing: run `make cmake-build`")
        if REQUIRED:
            pytest.fail(message)
        pytest.skip(message)
    env = dict(os.environ, LD_PRELOAD=" ".join(runtimes), GUMBEL_CUDA_EMULATED_LIBRARY=str(library),
               PYTHONMALLOC="malloc", OMP_NUM_THREADS="1", **SANITIZERS[kind]["options"])
    env.pop("GUMBEL_REQUIRE_CMAKE_BUILD", None)
    return env


def _python(kind: str, *args: str, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=_environment(kind),
                          capture_output=True, text=True, timeout=timeout, check=False)


def _first_report(stderr: str) -> str:
    """The start of the first sanitizer report (or fatal error) in a run's stderr."""
    starts = [i for i in (stderr.find("Sanitizer"), stderr.find("runtime error"),
                          stderr.find("Fatal Python error")) if i >= 0]
    return stderr[max(0, min(starts) - 200): min(starts) + 4000] + "\n...\n" if starts else ""


def _probe(kind: str, bug: str) -> subprocess.CompletedProcess:
    code = ("import torch, gumbel_kernels._ops as o; assert o.emulated_error() is None, "
            f"o.emulated_error(); print(torch.ops.gumbel_emulated.sanitizer_probe({bug!r}))")
    return _python(kind, "-c", code, timeout=300)


@pytest.mark.parametrize("kind", sorted(SANITIZERS))
def test_sanitizer_build_is_silent_on_correct_kernels(kind):
    result = _probe(kind, "none")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Sanitizer" not in result.stderr and "runtime error" not in result.stderr
    assert float(result.stdout.split()[-1]) == 65302.0  # 2 * sum(0..255) + 4 + 5 + 6 + 7


@pytest.mark.parametrize("kind, bug", [(kind, bug) for kind in sorted(SANITIZERS)
                                       for bug in SANITIZERS[kind]["probes"]])
def test_sanitizer_build_catches_its_bug_class(kind, bug):
    # The same kernels as the silent run above, with one deliberate bug: the test fails if the
    # sanitizer does not report it.
    result = _probe(kind, bug)
    expected = SANITIZERS[kind]["probes"][bug]
    assert result.returncode != 0 and expected in result.stderr, (
        f"{kind} stayed silent on '{bug}' (exit {result.returncode}):\n{result.stderr[-4000:]}")


@pytest.mark.parametrize("kind", sorted(SANITIZERS))
def test_emulated_cuda_tests_run_clean_under_sanitizer(kind):
    settings = " or ".join(REDUCED_SETTINGS)
    selection = f"({REDUCED_GRID}) and (not over_settings or {settings})"
    result = _python(kind, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                     "tests/test_gol_loss.py", "tests/test_class_stats.py", "-k", selection,
                     timeout=1500)
    tail = result.stdout[-3000:] + _first_report(result.stderr) + result.stderr[-3000:]
    assert result.returncode == 0, tail
    assert "Sanitizer" not in result.stderr and "runtime error" not in result.stderr, tail
    assert " passed" in result.stdout and " failed" not in result.stdout, tail
