# make repro : set up .venv if needed, then `dvc repro` (builds every recipe in params.yaml)
# make test  : set up .venv if needed, then lint (ruff) and run the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.setup-done
# DVC stage commands call `tunefile`, so the venv's bin goes first on PATH.
export PATH := $(BIN):$(PATH)

# llama-cpp-python compiles llama.cpp at install. A default build uses the build host's own CPU
# (-march=native): on a Xeon with AMX it turns on ggml's AMX buffer type, whose kernels crash in
# llama_decode on our q8_0/q4_k_m files, and the wheel it leaves in pip's cache dies with SIGILL
# on a host without AVX-512. So we build one portable x86-64 baseline (AVX2, FMA, F16C, BMI2;
# no AVX-512, no AMX) that runs on every host of our kind, keep the AVX2 weight repacking that
# makes q4 fast, and skip the multimodal library (llava/mtmd) that tunefile never uses. The wheel
# is kept under the tunefile cache, keyed by version and flags, never taken from pip's wheel
# cache (whose key ignores CMAKE_ARGS). CMAKE_ARGS you set (e.g. -DGGML_CUDA=on) come last and win.
LLAMA_VERSION := $(shell sed -n 's/^llama_cpp_python==//p' constraints.txt)
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
  -DGGML_BMI2=ON -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF \
  -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
  -DGGML_AMX_BF16=OFF -DGGML_CPU_REPACK=ON -DLLAVA_BUILD=OFF $(CMAKE_ARGS)
TUNEFILE_CACHE ?= $(HOME)/.cache/tunefile
LLAMA_FLAGS_ID := $(shell echo '$(LLAMA_VERSION) $(LLAMA_CMAKE_ARGS)' | sha1sum | cut -c1-12)
LLAMA_WHEELS := $(TUNEFILE_CACHE)/wheels/llama-cpp-python-$(LLAMA_VERSION)-$(LLAMA_FLAGS_ID)
export TUNEFILE_CACHE

.PHONY: setup repro test clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.txt constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test -n "$$(ls $(LLAMA_WHEELS)/*.whl 2>/dev/null)" || { \
	  rm -rf $(LLAMA_WHEELS).tmp && mkdir -p $(LLAMA_WHEELS).tmp/sdist && \
	  $(BIN)/pip download --quiet --no-deps --no-binary :all: -d $(LLAMA_WHEELS).tmp/sdist \
	    llama-cpp-python==$(LLAMA_VERSION) && \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip wheel --quiet --no-cache-dir --no-deps \
	    -w $(LLAMA_WHEELS).tmp $(LLAMA_WHEELS).tmp/sdist/*.tar.gz && \
	  rm -rf $(LLAMA_WHEELS) && mv $(LLAMA_WHEELS).tmp $(LLAMA_WHEELS); }
	$(BIN)/pip install --quiet --force-reinstall --no-deps $(LLAMA_WHEELS)/*.whl
	$(BIN)/pip install --quiet -c constraints.txt -r requirements.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/tunefile vendor
	$(BIN)/tunefile doctor
	touch $@

repro: setup
	$(BIN)/dvc repro

test: setup
	$(BIN)/ruff check builder tests bench
	$(BIN)/python -m pytest -q -rs

clean:
	rm -rf build .tunefile
