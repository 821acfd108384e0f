# Two commands: `make demo` and `make test`. Everything installs into .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
LLAMA_CPP_VERSION := 0.3.36
# llama.cpp's native build segfaults on quantized models on AMX CPUs: build without AMX (and without -march=native),
# enabling each AVX-512 extension only where this CPU has it (an AVX2-only machine would die of SIGILL otherwise).
CPU_FLAGS := $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
has = $(if $(filter $(1),$(CPU_FLAGS)),ON,OFF)
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=$(call has,avx2) -DGGML_FMA=$(call has,fma) \
  -DGGML_F16C=$(call has,f16c) -DGGML_AVX512=$(call has,avx512f) -DGGML_AVX512_VBMI=$(call has,avx512vbmi) \
  -DGGML_AVX512_VNNI=$(call has,avx512_vnni) -DGGML_AVX512_BF16=$(call has,avx512_bf16) \
  -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF

.PHONY: demo test install install-test lint bench clean screenshot fuzz

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e .
	# Native quantized-matmul kernels: compiled once for this CPU (also built lazily on first use).
	$(BIN)/python -m fuselm.quants.kernel_build || echo "native kernels unavailable: the torch fallback will be used"
	touch $@

# The reference llama.cpp build is cached in .venv: built once (about 4 minutes) per set of CPU flags.
LLAMA_STAMP := $(VENV)/.llama-cpp-avx512-$(call has,avx512f)
$(LLAMA_STAMP): $(BIN)/python
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install -q --no-cache-dir --force-reinstall --no-deps \
	  llama-cpp-python==$(LLAMA_CPP_VERSION)
	$(BIN)/pip install -q llama-cpp-python==$(LLAMA_CPP_VERSION)
	rm -f $(VENV)/.llama-cpp-avx512-*
	touch $@

# The llama-cpp-python sdist carries llama.cpp's converter and vocab files used by interop tests.
$(VENV)/llama-sdist/.ok: $(BIN)/python
	rm -rf $(VENV)/llama-sdist && mkdir -p $(VENV)/llama-sdist
	$(BIN)/pip download -q --no-binary :all: --no-deps -d $(VENV)/llama-sdist llama-cpp-python==$(LLAMA_CPP_VERSION)
	cd $(VENV)/llama-sdist && tar xzf llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed $(LLAMA_STAMP) $(VENV)/llama-sdist/.ok $(VENV)/.chromium
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# The web page is tested in a real headless browser: Debian's Chromium and its WebDriver (test-only system packages).
$(VENV)/.chromium: $(BIN)/python
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver)
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(BIN)/fuselm demo --out demo-out

test: $(VENV)/.installed-test
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -n 2 --dist loadgroup tests

# README's picture of the demo page. Needs a Chromium (Debian: apt-get install chromium); not part of demo/test.
CHROMIUM ?= chromium
screenshot: $(VENV)/.installed
	$(BIN)/fuselm demo --out demo-out
	$(CHROMIUM) --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
	  --no-first-run --hide-scrollbars --user-data-dir=$$(mktemp -d) --window-size=960,1400 \
	  --screenshot=$(CURDIR)/docs/demo.png file://$(CURDIR)/demo-out/demo.html

# The fuzz harness: the hypothesis targets, then a mutation run over every reader (MUTANTS=10000 by default;
# each mutant loads and generates in a child with a 20 s timeout and a 3 GiB memory limit). See benchmarks/fuzz.py.
fuzz: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -p no:xdist tests/test_fuzz_*.py
	$(BIN)/python benchmarks/fuzz.py --mutants $(or $(MUTANTS),10000) --workers 2 --json fuzz-results.json

lint: $(VENV)/.installed-test
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) demo-out
