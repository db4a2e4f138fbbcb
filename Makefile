# One-command set-up and jobs. Every target creates .venv and builds the extension when needed,
# so `make test`, `make demo` and `make bench` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CUDA sources compile whenever nvcc is found (setup.py); GUMBEL_NO_CUDA=1 skips them.
BUILD_ENV ?=
PYTEST_ARGS ?=

.PHONY: all venv build test test-triton demo bench sanitize clean

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

# Every test; then the Triton tests again under the interpreter (TRITON_INTERPRET must be set
# before triton is imported, hence a second process).
test: build
	$(PY) -m pytest tests -q $(PYTEST_ARGS)
	TRITON_INTERPRET=1 $(PY) -m pytest tests/test_triton.py -q $(PYTEST_ARGS)

test-triton: build
	TRITON_INTERPRET=1 $(PY) -m pytest tests/test_triton.py -q $(PYTEST_ARGS)

demo: build
	$(PY) -m gumbel_kernels.train --config configs/demo_cpu.yaml --out runs/demo

bench: build
	$(PY) -m bench.gol_loss_bench --shapes make
	$(PY) -m bench.plot

sanitize: build
	compute-sanitizer --tool memcheck $(PY) -m pytest tests/test_gol_loss.py -q -k cuda
	compute-sanitizer --tool racecheck $(PY) -m pytest tests/test_gol_loss.py -q -k cuda

clean:
	rm -rf build $(VENV)/.stamp-build gumbel_kernels/*.so
