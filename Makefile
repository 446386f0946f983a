# make repro : set up .venv if needed, then `dvc repro` (builds every recipe in params.yaml)
# make test  : set up .venv if needed, then run the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.setup-done
# DVC stage commands call `tunefile`, so the venv's bin goes first on PATH.
export PATH := $(BIN):$(PATH)

.PHONY: setup repro test clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.txt constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -r requirements.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/tunefile vendor
	touch $@

repro: setup
	$(BIN)/dvc repro

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf build .tunefile
