# fastlayers: two commands on a fresh machine with Python >= 3.10 and pip.
#
#   make bench   set up, run the CPU benchmark suite, print the comparison table (+ chart, JSON)
#   make test    set up, run the test suite
#   make fuzz    the property-based differential tests for FUZZ_MINUTES (default 20), random seeds;
#                failures saved under fuzz-failures/
#
# Set-up creates .venv (with --system-site-packages, so an installed torch, e.g. a machine's CUDA
# build, is kept), installs what is missing (torch==2.13.0 only when no torch imports; triton
# where the platform has wheels; test and bench tools) and builds the C++ extension in place.
# Re-running skips every step whose inputs did not change.
#
#   make test PYTHON=python3   use that interpreter as it is (no venv, no installs: e.g. a GPU
#                              machine without registry access); only builds fastlayers._C.

BASE_PYTHON ?= python3
TORCH_PIN   ?= torch==2.13.0
VENV        := .venv
PYTHON      ?=
PYTEST_ARGS ?=

ifeq ($(strip $(PYTHON)),)
PY    := $(VENV)/bin/python
SETUP := $(VENV)/.fastlayers-setup
else
PY    := $(PYTHON)
SETUP :=
endif

EXT     := fastlayers/.built-ext
SOURCES := $(wildcard csrc/*.cpp csrc/*.h) setup.py

FUZZ_MINUTES ?= 20

.PHONY: test bench bench-quick fuzz build setup clean

test: build
	$(PY) -m pytest tests -q $(PYTEST_ARGS)

fuzz: build
	$(PY) scripts/fuzz.py --minutes $(FUZZ_MINUTES)

# A few shapes with few rounds (numbers mean nothing): proves the benchmark suite runs; CI runs it.
bench-quick: build
	@mkdir -p bench/results
	FASTLAYERS_BENCH_QUICK=1 $(PY) -m pytest bench/test_bench_linear_act.py bench/test_bench_softmax.py bench/test_bench_models.py -q \
		-p no:cacheprovider --benchmark-json=bench/results/quick.json $(PYTEST_ARGS)
	$(PY) bench/report.py bench/results/quick.json --no-png

bench: build
	@mkdir -p bench/results
	$(PY) -m pytest bench/test_bench_linear_act.py bench/test_bench_softmax.py bench/test_bench_models.py -q -p no:cacheprovider \
		--benchmark-json=bench/results/cpu-latest.json $(PYTEST_ARGS)
	$(PY) bench/report.py bench/results/cpu-latest.json

build: $(SETUP) $(EXT)

setup: $(SETUP)

$(EXT): $(SOURCES) | $(SETUP)
	$(PY) setup.py -q build_ext --inplace
	@touch $@

$(VENV)/.fastlayers-setup: Makefile pyproject.toml
	@$(BASE_PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "fastlayers needs Python >= 3.10"'
	test -x $(VENV)/bin/python || $(BASE_PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c 'import torch' 2>/dev/null || $(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q "pybind11>=2.10" setuptools wheel pytest pytest-benchmark hypothesis numpy scikit-learn \
		matplotlib tqdm transformers
	$(PY) -c 'import triton' 2>/dev/null || $(PY) -m pip install -q triton \
		|| echo "fastlayers: no triton wheel for this platform; the triton backend will be unavailable"
	@touch $@

clean:
	rm -rf build fastlayers/_C*.so $(EXT) .pytest_cache
