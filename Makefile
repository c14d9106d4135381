# lat-lightning: `make demo` runs the default recipe; `make test` runs the static checks of `make lint` (ruff lint,
# ruff format check, mypy, the import layering of setup.cfg [importlinter]) and then the test suite; `make format`
# rewrites the code into the house format. Configuration of ruff and mypy: pyproject.toml; why: docs/development.md.
# Both create .venv on first use (python3 -m venv), install torch first, then the package editable with
# its extras. A stamp file inside .venv records the install: an existing venv is reused and re-installed
# only when setup.cfg changes (delete .venv to start over).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.lat-lightning-installed

# Installed before the package so pip never resolves a bare `torch` requirement by itself (that pulls the
# multi-GB CUDA build on Linux). For a CPU-only wheel from the PyTorch index:
#   make test TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC     ?= torch==2.13.0
TORCH_PIP_ARGS ?=

.PHONY: demo test lint format venv clean-venv

venv: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): setup.cfg | $(BIN)/python
	$(BIN)/python -m pip install $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -e ".[dev,quant,gguf]"
	touch $@

demo: $(STAMP)
	$(BIN)/python train.py

test: lint
	$(BIN)/python -m pytest -x tests --durations=15

# The static checks, in this order (each stops the run): lint, format, types, import layering. .pre-commit-config.yaml
# runs the same four. mypy checks the `files` of pyproject.toml [tool.mypy] (lat_lightning, callbacks, benchmarks)
# with its incremental cache in .mypy_cache/. lint-imports runs from the repo root (it finds the extra root package
# callbacks/ through the cwd); --no-cache keeps it from writing .import_linter_cache/ into the tree.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache --no-logo

# Rewrites files: the import order (the one ruff lint finding it fixes by itself), then the house format.
format: $(STAMP)
	$(BIN)/ruff check --select I --fix .
	$(BIN)/ruff format .

clean-venv:
	rm -rf $(VENV)
