"""Build gumbel_kernels._C: the C++ CPU kernels always, the CUDA kernels whenever nvcc is found.

Environment switches:
  GUMBEL_NO_CUDA=1      skip the CUDA sources (quick local builds)
  FORCE_CUDA=1          require the CUDA sources (fail if nvcc is missing)
  TORCH_CUDA_ARCH_LIST  GPU archs; defaults to DEFAULT_CUDA_ARCHS below when no GPU is visible
                        (the build machine has none), so every CI run compiles the CUDA kernels
  GUMBEL_CPU_AVX2=0/1   build the CPU kernel with AVX2+FMA (default: on when this CPU has them)
  CUDA_HOME             the toolkit root (include/cuda_runtime.h, lib64/libcudart.so); found
                        from nvcc when unset, since torch's own guess can be one level too high
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _is_toolkit_root(path):
    return bool(path) and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h"))


def _locate_cuda_home():
    """The CUDA toolkit root, or None. Must run before torch.utils.cpp_extension is imported,
    which reads CUDA_HOME once at import time."""
    if _is_toolkit_root(os.environ.get("CUDA_HOME")):
        return os.environ["CUDA_HOME"]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for candidate in candidates:
        if _is_toolkit_root(candidate) and os.path.isfile(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    return None


def _cpu_has_avx2():
    """AVX2 + FMA + F16C: what at::vec's AVX2 headers compile to."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return all(f" {flag}" in flags for flag in ("avx2", "fma", "f16c"))


WITH_CUDA = False
if not _env_flag("GUMBEL_NO_CUDA"):
    cuda_home = _locate_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("CUDA_PATH", cuda_home)
        WITH_CUDA = True
    elif _env_flag("FORCE_CUDA"):
        raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit (nvcc + include/cuda_runtime.h) was found; "
                           "set CUDA_HOME to the toolkit root")

import torch  # noqa: E402  (after CUDA_HOME is settled)
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

# Cubins for Turing (T4), Ampere (A100; also runs on sm_86/89), Hopper, Blackwell (B200) and
# Blackwell consumer/workstation (sm_120), plus compute_90 PTX that the driver JIT-compiles on
# any newer arch without a cubin (e.g. sm_110). Each arch adds its device compile to the build
# (README: build notes).
DEFAULT_CUDA_ARCHS = "7.5;8.0;9.0+PTX;10.0;12.0"
if WITH_CUDA and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
    os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS

use_avx2 = os.environ.get("GUMBEL_CPU_AVX2")
use_avx2 = _cpu_has_avx2() if use_avx2 is None else _env_flag("GUMBEL_CPU_AVX2")

# -fopenmp: at::parallel_for is a header template that, in torch's OpenMP builds, is an
# `omp parallel` region; compiled without it, the kernel would run on one thread.
cxx_flags = ["-O3", "-std=c++20", "-fvisibility=hidden", "-fopenmp"]
link_flags = ["-fopenmp"]
if use_avx2:
    # at::vec picks its AVX2 implementation (Sleef exp/log, exported by libtorch_cpu) from these.
    cxx_flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2",
                  "-DGUMBEL_BUILT_WITH_AVX2"]

sources = ["csrc/gol_loss.cpp", "csrc/python_module.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
define_macros = []
if WITH_CUDA:
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    define_macros.append(("GUMBEL_WITH_CUDA", None))
    extension = CUDAExtension(
        "gumbel_kernels._C", sources, define_macros=define_macros,
        extra_link_args=link_flags,
        extra_compile_args={"cxx": cxx_flags,
                            "nvcc": ["-O3", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr"]})
else:
    extension = CppExtension("gumbel_kernels._C", sources, define_macros=define_macros,
                             extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)

# The CUDA kernels' device code and host logic run on the CPU (backend "cuda_emulated", a test
# backend; csrc/cuda_emulation): plain C++, built with or without a CUDA toolkit, loaded with
# torch.ops.load_library by gumbel_kernels/_ops.py.
emulated_extension = CppExtension(
    "gumbel_kernels._cuda_emulated", sorted(glob.glob("csrc/cuda_emulation/*.cpp")),
    extra_compile_args={"cxx": ["-O2", "-std=c++20", "-fvisibility=hidden"]})

setup(
    name="gumbel-kernels",
    version="0.1.0",
    description="Fused CPU/CUDA/Triton kernels for the Gumbel Optimized Loss (GOL) and an LVIS "
                "Mask R-CNN harness",
    packages=find_packages(include=["gumbel_kernels", "gumbel_kernels.*"]),
    python_requires=">=3.10",
    ext_modules=[extension, emulated_extension],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
