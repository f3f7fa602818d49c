# Entry points for a fresh machine:
#   make run          set up .venv and run the whole pipeline (dvc repro) on params.yaml
#   make test         set up .venv and run the test suite
#   make team-server  a local MLflow server on PostgreSQL with proxied artifacts (see README, Team mode)
#   make lock         write the versions of the tested .venv into requirements/constraints.txt
# TORCH picks the PyTorch build to install first (e.g. TORCH="torch --index-url <your CUDA index>"); the
# default is the CPU build from the local package index. Every install is pinned by CONSTRAINTS, the
# versions the tests passed with; torch is pinned without a build label, so the CPU and CUDA builds of
# that version both satisfy it (CONSTRAINTS= installs unpinned).

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
CONSTRAINTS ?= requirements/constraints.txt
EXTRAS ?= dev,lite0,team
BIN := $(VENV)/bin
PIN := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

.PHONY: setup run test lint lock team-server

$(BIN)/wbc: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet $(PIN) $(TORCH)
	$(BIN)/python -m pip install --quiet $(PIN) -e ".[$(EXTRAS)]"
	touch $@

setup: $(BIN)/wbc

run: setup
	. $(BIN)/activate && dvc repro

test: setup
	. $(BIN)/activate && python -m pytest

lint: setup
	$(BIN)/ruff check pipeline tests benchmarks

# pip freeze of the tested environment; CUDA runtime wheels and the local build label of torch are left
# out so that the file installs on machines without a GPU as well as with one.
lock:
	mkdir -p $(dir $(CONSTRAINTS))
	{ echo "# Versions the test suite passed with (make lock); make and CI install with -c this file."; \
	  $(BIN)/python -m pip freeze --exclude-editable | grep -v -E '^(nvidia-|triton==)' \
	    | sed -E 's/^(torch==[^+]+)\+.*/\1/'; } > $(CONSTRAINTS).tmp
	mv $(CONSTRAINTS).tmp $(CONSTRAINTS)

team-server: setup
	$(BIN)/python -m pipeline.team_server
