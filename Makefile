# Two entry points for a fresh machine:
#   make run    set up .venv and run the whole pipeline (dvc repro) on params.yaml
#   make test   set up .venv and run the test suite
# TORCH picks the PyTorch build to install first (e.g. TORCH="torch --index-url <your CUDA index>").

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup run test lint

$(BIN)/wbc: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev,lite0]"
	touch $@

setup: $(BIN)/wbc

run: setup
	. $(BIN)/activate && dvc repro

test: setup
	. $(BIN)/activate && python -m pytest

lint: setup
	$(BIN)/ruff check pipeline tests benchmarks
