# nbprod: two commands on a fresh machine.
#   make demo   run the main job on the embedded default (local store, MLflow on SQLite)
#   make test   the whole suite: export drift, clean notebooks, notebook tests, pytest, docs
# Everything installs from the committed lock file (requirements.lock) into .venv/.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.8
STAMP := $(VENV)/.nbprod-installed
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: help install lock export check-export nbtest pytest docs test demo lab clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install --quiet "uv==$(UV_VERSION)"
	$(BIN)/uv pip sync --compile-bytecode --python $(BIN)/python requirements.lock
	$(BIN)/uv pip install --python $(BIN)/python --no-deps -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (nbprod)" >/dev/null
	@touch $(STAMP)

install: $(STAMP)  ## create .venv and install the locked dependencies

lock:  ## re-resolve requirements.lock from pyproject.toml (needs the index)
	$(BIN)/uv pip compile pyproject.toml --extra dev --python-version 3.11 -o requirements.lock

export: install  ## notebooks -> nbprod/
	$(BIN)/nbdev-export

check-export: install  ## fail when nbprod/ differs from the notebooks' export, or a notebook is not clean
	$(BIN)/nbprod check

nbtest: install  ## run the notebooks' asserting cells
	$(BIN)/nbdev-test --n-workers 2

pytest: install  ## cross-process tests: kernels, MLflow, CLI
	$(BIN)/pytest

docs: install  ## build the documentation site, warnings are errors
	$(BIN)/python docs/build.py

test: check-export nbtest pytest docs  ## the whole suite

DEMO := build/demo
demo: install  ## scaffold a small project and run its training notebook, tracked
	rm -rf $(DEMO)
	$(BIN)/nbprod new demo --dir $(dir $(DEMO))
	cd $(DEMO) && $(abspath $(BIN))/nbprod run nbs/train.ipynb -p alpha=0.5
	cd $(DEMO) && $(abspath $(BIN))/nbprod runs

lab: install  ## JupyterLab on the project's own kernel
	$(BIN)/jupyter lab --ip 127.0.0.1 --notebook-dir nbs

clean:  ## remove build outputs (keeps .venv and .nbprod)
	rm -rf build docs/_build .pytest_cache
