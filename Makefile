# Two commands: `make demo` and `make test`. Everything installs into .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
LLAMA_CPP_VERSION := 0.3.36
# llama.cpp's native build segfaults on quantized models on AMX CPUs: build without AMX.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
  -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
  -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF

.PHONY: demo test install install-test lint bench clean screenshot

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e .
	# Native quantized-matmul kernels: compiled once for this CPU (also built lazily on first use).
	$(BIN)/python -m fuselm.quants.kernel_build || echo "native kernels unavailable: the torch fallback will be used"
	touch $@

# The reference llama.cpp build is cached in .venv: built once (about 4 minutes).
$(VENV)/.llama-cpp: $(BIN)/python
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install -q --no-cache-dir llama-cpp-python==$(LLAMA_CPP_VERSION)
	touch $@

# The llama-cpp-python sdist carries llama.cpp's converter and vocab files used by interop tests.
$(VENV)/llama-sdist/.ok: $(BIN)/python
	rm -rf $(VENV)/llama-sdist && mkdir -p $(VENV)/llama-sdist
	$(BIN)/pip download -q --no-binary :all: --no-deps -d $(VENV)/llama-sdist llama-cpp-python==$(LLAMA_CPP_VERSION)
	cd $(VENV)/llama-sdist && tar xzf llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed $(VENV)/.llama-cpp $(VENV)/llama-sdist/.ok
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(BIN)/fuselm demo --out demo-out

test: $(VENV)/.installed-test
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -n 2 tests

# README's picture of the demo page. Needs a Chromium (Debian: apt-get install chromium); not part of demo/test.
CHROMIUM ?= chromium
screenshot: $(VENV)/.installed
	$(BIN)/fuselm demo --out demo-out
	$(CHROMIUM) --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
	  --no-first-run --hide-scrollbars --user-data-dir=$$(mktemp -d) --window-size=960,1400 \
	  --screenshot=$(CURDIR)/docs/demo.png file://$(CURDIR)/demo-out/demo.html

lint: $(VENV)/.installed-test
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) demo-out
