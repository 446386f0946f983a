# make repro : set up .venv if needed, then `dvc repro` (builds every recipe in params.yaml)
# make test  : set up .venv if needed, then run the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.setup-done
# DVC stage commands call `tunefile`, so the venv's bin goes first on PATH.
export PATH := $(BIN):$(PATH)
# llama-cpp-python compiles llama.cpp when pip installs it. tunefile does not use its multimodal
# library (llava/mtmd), so it is not built: a shorter cold setup. CMAKE_ARGS you set (for example
# -DGGML_CUDA=on) are passed on.
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF $(CMAKE_ARGS)

.PHONY: setup repro test clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.txt constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install --quiet -c constraints.txt -r requirements.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/tunefile vendor
	touch $@

repro: setup
	$(BIN)/dvc repro

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf build .tunefile
