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
#
#   make test-triton36   (part of make test) the Triton tests (`pytest tests -m triton_interp`: the
#                        files test_triton*.py; TRITON36_TESTS="-k triton" for every test with the
#                        triton backend) under triton 3.6.0, the GPU machine's version, in the
#                        interpreter. triton 3.6 and numpy < 2.4 (3.6's interpreter needs it) are
#                        installed once into .triton36/ and put first on PYTHONPATH; torch and the
#                        rest come from the main env.
#                        Skipped (with a message) when the main env has no triton or already has
#                        3.6, or when PYTHON= is given (no installs) and .triton36/ is missing.
#                        Adds 36 s to make test (140 tests, quiet 2-core machine; 2-4 min when busy)
#                        + a one-off 20 s install, plus 35-60 s for compile-gate-quick.
#   make compile-gate    compile every Triton kernel x config x layout x dtype for sm_90 and sm_80
#                        without a GPU and fail on spills or too much shared memory
#                        (scripts/compile_gate.py): under triton 3.6 -> bench/results/sm90-compile.md
#                        (fails the target), then under the main env's triton ->
#                        sm90-compile-triton-main.md (a report only). ~21 min each on 2 cores (2220 kernels).
#                        make test runs the --quick subset (sm_90, 59 kernels, ~35 s) under 3.6.

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
TORCH_VERSION := fastlayers/.torch-version
SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/torch/*.cpp) setup.py

FUZZ_MINUTES ?= 20
BENCH_FILES := bench/test_bench_linear_act.py bench/test_bench_softmax.py bench/test_bench_gated.py \
               bench/test_bench_loss.py bench/test_bench_models.py bench/test_bench_norms.py \
               bench/test_bench_training.py bench/test_bench_rotary.py \
               bench/test_bench_attention_softmax.py bench/test_bench_attention.py

.PHONY: test bench bench-quick fuzz build setup clean test-triton36 compile-gate compile-gate-quick FORCE

test: build
	$(PY) -m pytest tests -q --durations=15 $(PYTEST_ARGS)
	@$(MAKE) --no-print-directory test-triton36 compile-gate-quick

# ----------------------------------------------------------------------------- triton 3.6 / sm_90
TRITON36_VERSION := 3.6.0
TRITON36_DIR     := .triton36
TRITON36_STAMP   := $(TRITON36_DIR)/.fastlayers-$(TRITON36_VERSION)
TRITON36_PY      := PYTHONPATH=$(CURDIR)/$(TRITON36_DIR) $(PY)
# Which tests run under triton 3.6: by default the Triton suites (tests/backends/test_triton*.py, marker
# triton_interp: ~2-4 min here). TRITON36_TESTS="-k triton" adds the op suites' triton backend
# (the whole matrix: 39 min on the shared 2-core machine, 2026-12-01, and 22 failures there,
# bf16 softmax through 3.6's interpreter, whose fp32 -> bf16 casts truncate, and an RSS test).
TRITON36_TESTS   ?= -m triton_interp

test-triton36: build
	@if ! $(PY) -c 'import triton' 2>/dev/null; then \
		echo "test-triton36: skipped: no triton in the main environment (the triton backend is unavailable)"; \
	elif $(PY) -c 'import triton, sys; sys.exit(triton.__version__ != "$(TRITON36_VERSION)")'; then \
		echo "test-triton36: skipped: the main environment already runs triton $(TRITON36_VERSION)"; \
	elif [ -n "$(strip $(PYTHON))" ] && [ ! -f $(TRITON36_STAMP) ]; then \
		echo "test-triton36: skipped: PYTHON= given (no installs) and no $(TRITON36_DIR)/"; \
	else \
		$(MAKE) --no-print-directory $(TRITON36_STAMP) && \
		$(TRITON36_PY) -c 'import triton, numpy; assert triton.__version__ == "$(TRITON36_VERSION)", triton.__file__; print("test-triton36: triton", triton.__version__, "numpy", numpy.__version__, "from", triton.__file__)' && \
		$(TRITON36_PY) -m pytest tests -q $(TRITON36_TESTS) -p no:cacheprovider; \
	fi

$(TRITON36_STAMP):
	@rm -rf $(TRITON36_DIR)
	$(PY) -m pip install -q --target $(TRITON36_DIR) --no-deps triton==$(TRITON36_VERSION) "numpy<2.4"
	@touch $@

# The compile gate runs with the GPU machine's triton (3.6, from .triton36/) when it is there.
GATE_PY = $$([ -f $(TRITON36_STAMP) ] && echo PYTHONPATH=$(CURDIR)/$(TRITON36_DIR)) $(PY)

compile-gate: build
	@$(PY) -c 'import triton' 2>/dev/null || { echo "compile-gate: needs triton"; exit 1; }
	@[ -n "$(strip $(PYTHON))" ] || $(MAKE) --no-print-directory $(TRITON36_STAMP)
	env $(GATE_PY) scripts/compile_gate.py --out bench/results/sm90-compile.md
	@# the main env's triton: a report (the GPU machine runs 3.6; newer ptxas / triton versions
	@# still spill a few bytes in some small-M and fp32-FMA configs), not a failure
	-$(PY) scripts/compile_gate.py --out bench/results/sm90-compile-triton-main.md

compile-gate-quick: build
	@if $(PY) -c 'import triton' 2>/dev/null; then env $(GATE_PY) scripts/compile_gate.py --quick; \
	else echo "compile-gate-quick: skipped: triton is not installed"; fi

fuzz: build
	$(PY) scripts/fuzz.py --minutes $(FUZZ_MINUTES)

# A few shapes with few rounds (numbers mean nothing): proves the benchmark suite runs; CI runs it.
bench-quick: build
	@mkdir -p bench/results
	FASTLAYERS_BENCH_QUICK=1 $(PY) -m pytest $(BENCH_FILES) -q \
		-p no:cacheprovider --benchmark-json=bench/results/quick.json $(PYTEST_ARGS)
	$(PY) bench/report.py bench/results/quick.json --no-png

bench: build
	@mkdir -p bench/results
	$(PY) -m pytest $(BENCH_FILES) -q -p no:cacheprovider \
		--benchmark-json=bench/results/cpu-latest.json $(PYTEST_ARGS)
	$(PY) bench/report.py bench/results/cpu-latest.json
	$(PY) bench/report.py bench/results/cpu-latest.json --markdown --no-png > bench/results/cpu-latest.md

build: $(SETUP) $(EXT)

setup: $(SETUP)

$(EXT): $(SOURCES) $(TORCH_VERSION) | $(SETUP)
	$(PY) setup.py -q build_ext --inplace
	@touch $@

# The installed torch's version, rewritten only when it changes (setup.py writes the same file):
# fastlayers._fastpath links libtorch, so a new torch rebuilds it.
$(TORCH_VERSION): FORCE | $(SETUP)
	@v="$$($(PY) -c 'import torch; print(torch.__version__)')" && \
		[ "$$v" = "$$(cat $@ 2>/dev/null)" ] || echo "$$v" > $@

FORCE:

$(VENV)/.fastlayers-setup: Makefile pyproject.toml
	@$(BASE_PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "fastlayers needs Python >= 3.10"'
	test -x $(VENV)/bin/python || $(BASE_PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c 'import torch' 2>/dev/null || $(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q "pybind11>=2.10" setuptools wheel pytest pytest-benchmark hypothesis numpy scikit-learn \
		matplotlib tqdm transformers peft kernels
	$(PY) -c 'import triton' 2>/dev/null || $(PY) -m pip install -q triton \
		|| echo "fastlayers: no triton wheel for this platform; the triton backend will be unavailable"
	@touch $@

clean:
	rm -rf build fastlayers/_C*.so fastlayers/_fastpath*.so $(EXT) $(TORCH_VERSION) .pytest_cache $(TRITON36_DIR)
