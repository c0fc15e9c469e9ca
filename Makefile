# fastseg: `make test` and `make bench` do all set-up on a fresh machine (venv, installs, build).
PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
DEV_DEPS   := ninja pytest pytest-benchmark expecttest numpy matplotlib hypothesis ruff pydensecrf2 scikit-image
export MAX_JOBS ?= 2

DEPS_STAMP := $(VENV)/.fastseg-deps
BUILD_STAMP := $(VENV)/.fastseg-build
SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h')

.PHONY: all venv build build-inplace test test-fast test-interpret cpp-test bench lint clean

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

cpp-test: $(DEPS_STAMP)
	PYTHON=$(VPY) bash cpp_tests/run.sh

bench: build
	$(VPY) -m fastseg.bench

lint: $(DEPS_STAMP)
	$(VENV)/bin/ruff check fastseg triton_kernels tests bench

clean:
	rm -rf build build-cmake fastseg/_C*.so fastseg/_build_info.py $(BUILD_STAMP)
