# One-command set-up and jobs. Every target creates .venv and builds the extension when needed,
# so `make test`, `make demo` and `make bench` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CUDA sources compile whenever nvcc is found (setup.py); GUMBEL_NO_CUDA=1 skips them.
BUILD_ENV ?=
PYTEST_ARGS ?=

.PHONY: all venv build cmake-build test test-triton demo bench sanitize gpu-check sass-report clean

all: test

$(VENV)/.stamp-deps: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install -r requirements.txt
	touch $@

venv: $(VENV)/.stamp-deps

# Rebuilt when a C++/CUDA source, header or setup.py changes.
$(VENV)/.stamp-build: $(VENV)/.stamp-deps setup.py $(shell find csrc -type f)
	$(BUILD_ENV) $(PIP) install --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.stamp-build

# Every test (tests/test_cmake_build.py loads the CMake build); then the Triton tests again under
# the interpreter (TRITON_INTERPRET must be set before triton is imported, hence a second process).
test: build cmake-build
	GUMBEL_REQUIRE_CMAKE_BUILD=1 GUMBEL_REQUIRE_MMDET=1 GUMBEL_EXPECT_CUDA_KERNEL=$(if $(CMAKE_CUDA_ARGS),1,0) \
		$(PY) -m pytest tests -q $(PYTEST_ARGS)
	TRITON_INTERPRET=1 $(PY) -m pytest tests/test_triton.py -q $(PYTEST_ARGS)

test-triton: build
	TRITON_INTERPRET=1 $(PY) -m pytest tests/test_triton.py -q $(PYTEST_ARGS)

# The CMake build of the same csrc/ against libtorch -> build/cmake/libgumbel_ops.so. CMake is
# pointed at the toolkit root (CUDA_HOME, else /usr/local/cuda): it would guess it from nvcc's
# location, which a wrapper in /usr/local/bin misleads.
CUDA_ROOT ?= $(firstword $(CUDA_HOME) $(wildcard /usr/local/cuda))
CMAKE_ARGS ?=
ifneq ($(and $(CUDA_ROOT),$(wildcard $(CUDA_ROOT)/bin/nvcc)),)
CMAKE_CUDA_ARGS := -DCMAKE_CUDA_COMPILER=$(CUDA_ROOT)/bin/nvcc -DCUDAToolkit_ROOT=$(CUDA_ROOT) \
	-DCUDA_TOOLKIT_ROOT_DIR=$(CUDA_ROOT)
endif

# It compiles the CUDA kernels for sm_90 alone (it checks that CMake builds and loads the same
# csrc/, and builds the emulator's sanitizer libraries; the setup.py extension carries every
# arch): CMAKE_CUDA_ARCHS="8.0;9.0" for others, CMakeLists.txt's default when run by hand. The
# list goes to torch's CMake config as TORCH_CUDA_ARCH_LIST: it replaces CMAKE_CUDA_ARCHITECTURES
# with its own gencode flags.
CMAKE_CUDA_ARCHS ?= 9.0
cmake-build: $(VENV)/.stamp-build
	TORCH_CUDA_ARCH_LIST="$(CMAKE_CUDA_ARCHS)" cmake -S . -B build/cmake \
		-DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
		$(CMAKE_CUDA_ARGS) $(CMAKE_ARGS)
	cmake --build build/cmake -j 2

demo: build
	$(PY) -m gumbel_kernels.train --config configs/demo_cpu.yaml --out runs/demo --overwrite

bench: build
	$(PY) -m bench.gol_loss_bench --shapes make
	$(PY) -m bench.plot

sanitize: build
	compute-sanitizer --tool memcheck $(PY) -m pytest tests/test_gol_loss.py -q -k "cuda and not cuda_emulated"
	compute-sanitizer --tool racecheck $(PY) -m pytest tests/test_gol_loss.py -q -k "cuda and not cuda_emulated"

# On a machine with a GPU (under 8 minutes): build for its arch, the CUDA and Triton tests on the
# device, compute-sanitizer memcheck/racecheck, the cuda/triton benchmark -> bench/results/
# gpu_check.md. Uses .venv when there is one, else the machine's python3 (installs nothing).
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	$(GPU_PYTHON) -m bench.gpu_check

# Without a GPU: the shipped cubins' SASS (cuobjdump) and Triton's kernels compiled ahead of time
# for sm_90 -> instructions per element, registers, occupancy, an H100 time estimate ->
# bench/results/sass_report.md.
sass-report: build
	$(PY) -m bench.sass_report

clean:
	rm -rf build $(VENV)/.stamp-build gumbel_kernels/*.so
