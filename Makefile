# fastseg: `make test` and `make bench` do all set-up on a fresh machine (venv, installs, build).
PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
DEV_DEPS   := ninja pytest pytest-benchmark expecttest numpy matplotlib hypothesis ruff pydensecrf2 scikit-image segmentation-models-pytorch
export MAX_JOBS ?= 2

# The GPU machine's own stack (bench/gpu_check.sh runs there): its torch, Triton and torchvision and
# the test tools it has (no pydensecrf2, no segmentation-models-pytorch; numpy < 2.3 for Triton 3.6's
# interpreter). Built and tested in a copy of the tree, .twin/, so that its fastseg/_C (for torch
# 2.11) never replaces the development build.
TWIN      ?= .venv-twin
TWIN_SRC  := .twin
TWIN_PINS := torch==2.11.0 torchvision==0.26.0 triton==3.6.0
TWIN_DEPS := ninja pytest pytest-xdist pytest-benchmark expecttest hypothesis scikit-image timm matplotlib "numpy<2.3"

DEPS_STAMP := $(VENV)/.fastseg-deps
BUILD_STAMP := $(VENV)/.fastseg-build
SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h')

.PHONY: all venv build build-inplace test test-fast test-interpret cpp-test twin-test bench bench-full lint clean wheel wheel-cpu \
        sdist wheel-test

all: test

$(VPY):
	$(PYTHON) -m venv $(VENV)

$(DEPS_STAMP): | $(VPY)
	$(VPY) -m pip install -q --upgrade pip setuptools wheel
	$(VPY) -m pip install -q $(TORCH_PINS) $(DEV_DEPS)
	touch $@

venv: $(DEPS_STAMP)

# pip builds in a fresh temporary folder, so this rebuilds everything whenever a source changes.
$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	$(VPY) -m pip install --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILD_STAMP)

# Incremental (ninja keeps ./build) rebuild of fastseg/_C for development.
build-inplace: $(DEPS_STAMP)
	$(VPY) setup.py build_ext --inplace

# The main suite, then the Triton kernels under the interpreter in their own process
# (TRITON_INTERPRET must be set before triton is imported).
test: build
	$(VPY) -m pytest tests -m "not interpret" -q -rs
	TRITON_INTERPRET=1 $(VPY) -m pytest tests -m interpret -q -rs

# The device twin: build fastseg._C (C++ and CUDA) against torch 2.11, run the CPU suite there, and
# the interpreter suite + an sm_90a compile of every Triton launch with Triton 3.6 (bench/triton_sm90_compile.py).
$(TWIN)/.fastseg-deps:
	$(PYTHON) -m venv $(TWIN)
	$(TWIN)/bin/python -m pip install -q --upgrade pip setuptools wheel
	$(TWIN)/bin/python -m pip install -q $(TWIN_PINS) $(TWIN_DEPS)
	touch $@

twin-test: $(TWIN)/.fastseg-deps
	mkdir -p $(TWIN_SRC)
	find $(TWIN_SRC) -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +  # keep ninja's objects only
	git ls-files -z -co --exclude-standard | tar --null -T - -cf - | tar -xf - -C $(TWIN_SRC)
	cd $(TWIN_SRC) && ../$(TWIN)/bin/python setup.py -q build_ext --inplace
	cd $(TWIN_SRC) && ../$(TWIN)/bin/python -m pytest tests -m "not interpret" -q -rs -p no:cacheprovider
	# The interpreter suite runs inside the compile check (it records the launches), which fails if it fails.
	cd $(TWIN_SRC) && ../$(TWIN)/bin/python bench/triton_sm90_compile.py --json triton-sm90-compile.json

# dist/fastseg-<version>-cp311-cp311-linux_x86_64.whl: fastseg._C (C++, and CUDA for setup.py's default
# archs 8.0;9.0+PTX where a toolkit is present) + the Triton kernels; ninja's objects in ./build are reused.
wheel: $(DEPS_STAMP)
	rm -f dist/fastseg-*.whl
	$(VPY) setup.py -q bdist_wheel

wheel-cpu: $(DEPS_STAMP)
	rm -f dist/fastseg-*.whl
	FASTSEG_CUDA=0 $(VPY) setup.py -q bdist_wheel

sdist: $(DEPS_STAMP)
	rm -f dist/fastseg-*.tar.gz
	$(VPY) setup.py -q sdist

# CI: package the build `make build` made (no second compile), install it with pip --no-deps into a
# temporary target and use it from outside the tree (tests/wheel_check.py); the twin's torch, when
# present, must get the clear "built for torch ..." message.
wheel-test: build
	rm -rf dist/prebuilt && FASTSEG_PREBUILT=1 $(VPY) setup.py -q bdist_wheel -d dist/prebuilt
	$(VPY) tests/wheel_check.py dist/prebuilt/fastseg-*.whl $(if $(wildcard $(TWIN)/bin/python),--other-python $(abspath $(TWIN)/bin/python))

cpp-test: $(DEPS_STAMP)
	PYTHON=$(VPY) bash cpp_tests/run.sh

bench: build
	$(VPY) -m fastseg.bench

# every case timed exhaustively (rounds, samples as asked; models at 513x513): tens of minutes on a CPU
bench-full: build
	$(VPY) -m fastseg.bench --full

lint: $(DEPS_STAMP)
	$(VENV)/bin/ruff check fastseg triton_kernels tests bench

clean:
	rm -rf build build-cmake dist fastseg/_C*.so fastseg/_build_info.py $(BUILD_STAMP) $(TWIN_SRC)
