# nbprod: two commands on a fresh machine.
#   make demo   the bike-share pipeline end to end on the embedded default (local Ray, MLflow on SQLite), served, replayed
#   make test   the whole suite: export drift, clean notebooks, notebook tests, pytest, docs, the example
# Everything installs from the committed lock file (requirements.lock) into .venv/.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.8
STAMP := $(VENV)/.nbprod-installed
# PyTorch's CPU build lies here on our machines (uv does not look there by itself); the lock names it torch==2.13.0+cpu
WHEELS ?= /opt/wheels
FIND_LINKS := $(if $(wildcard $(WHEELS)),--find-links $(WHEELS),)
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: help sysdeps install lock export check-export nbtest pytest docs example test demo lab clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install --quiet "uv==$(UV_VERSION)"
	$(BIN)/uv pip sync --compile-bytecode --python $(BIN)/python $(FIND_LINKS) requirements.lock
	$(BIN)/uv pip install --python $(BIN)/python --no-deps -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (nbprod)" >/dev/null
	@touch $(STAMP)

install: $(STAMP) sysdeps  ## create .venv and install the locked dependencies

# Debian packages nbprod uses: haproxy (Ray Serve's fast HTTP path; without it, Serve's own proxy), wrk (benchmarks/serve.py),
# chromium (the dashboard's browser tests and benchmark, driven by Playwright; never a downloaded browser)
DEBS := haproxy wrk chromium
sysdeps:  ## install the Debian packages above when missing (needs root and apt; otherwise says what is missing)
	@missing=$$(for p in $(DEBS); do command -v $$p >/dev/null || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing $$missing (apt-get)"; \
	    (apt-get install -y -qq $$missing >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq $$missing >/dev/null)) \
	      || echo "warning: could not install $$missing: nbprod serve falls back to Ray Serve's default proxy; the browser tests need chromium"; \
	  else echo "warning: $$missing not installed (needs root and apt-get): nbprod serve falls back to Ray Serve's default proxy; the browser tests need chromium"; fi; \
	fi

lock:  ## re-resolve requirements.lock from pyproject.toml (needs the index)
	$(BIN)/uv pip compile pyproject.toml --extra dev --extra torch --python-version 3.11 $(FIND_LINKS) --override overrides.txt -o requirements.lock

export: install  ## notebooks -> nbprod/
	$(BIN)/nbdev-export

check-export: install  ## fail when nbprod/ differs from the notebooks' export, or a notebook is not clean
	$(BIN)/nbprod check

# Each notebook in a fresh process (2 at a time): nbdev-test's own worker pool runs several notebooks in one process, where
# a notebook's cells can lean on modules another notebook set up first, passing or failing with the pool's order
nbtest: install  ## run the notebooks' asserting cells
	@find nbs -name '*.ipynb' -not -path '*/[._]*' | sort | xargs -P 2 -I NB sh -c \
	  'out=$$($(BIN)/nbdev-test --n-workers 1 "NB" 2>&1) && echo "ok      NB" || { printf "FAILED  NB\n%s\n" "$$out"; exit 1; }' \
	  || { echo "nbtest: notebooks failed (FAILED above); run one alone with $(BIN)/nbdev-test nbs/NAME.ipynb"; exit 1; }

pytest: install  ## cross-process tests: kernels, MLflow, CLI
	$(BIN)/pytest

docs: install  ## build the documentation site, warnings are errors
	$(BIN)/python docs/build.py

EXAMPLE := examples/bikeshare
example: install  ## the bike-share example's own suite: export drift, notebook tests, pytest (its pipeline included)
	cd $(EXAMPLE) && $(abspath $(BIN))/nbprod check
	cd $(EXAMPLE) && $(abspath $(BIN))/nbdev-test --n-workers 1
	cd $(EXAMPLE) && $(abspath $(BIN))/python -m pytest -q tests

test: check-export nbtest pytest docs example  ## the whole suite

demo: install  ## the bike-share pipeline on local Ray, tracked in MLflow; its champion served and asked about July; July-December replayed; the dashboard
	cd $(EXAMPLE) && $(abspath $(BIN))/nbprod run train
	cd $(EXAMPLE) && $(abspath $(BIN))/python scripts/try_endpoint.py
	cd $(EXAMPLE) && $(abspath $(BIN))/python scripts/replay.py
	cd $(EXAMPLE) && ($(abspath $(BIN))/nbprod dashboard --profile replay --stop >/dev/null; $(abspath $(BIN))/nbprod dashboard --profile replay --detach)
	@echo
	@echo "next, in $(EXAMPLE) (with $(abspath $(BIN)) on PATH):"
	@echo "  nbprod runs                                       # the pipeline run and its steps"
	@echo "  nbprod serve                                      # the champion on http://127.0.0.1:8000 (nbprod keys create NAME)"
	@echo "  nbprod run train -p learning_rate=0.05            # ingest and features are cached; train and evaluate re-run"
	@echo "  nbprod sweep nbs/02_train.ipynb -p learning_rate=0.05,0.1,0.2 -p max_leaf_nodes=15,31 --sort val_rmse"
	@echo "  nbprod tune hgb                                   # Optuna + ASHA search on Ray Tune, each trial a run; best model registered"
	@echo "  nbprod run nbs/06_nn.ipynb                        # a tabular network on Ray Train (2 workers), registered like the boosting"
	@echo "  nbprod monitor history bikeshare --profile replay # the replay's retrain loops, step by step"
	@echo "  mlflow ui --backend-store-uri sqlite:///.nbprod/mlflow.db    # runs, nested steps, the registered model"
	@echo "  nbprod dashboard --profile replay --stop          # stops the dashboard started above"
	@echo
	@echo "the dashboard of the replay: $$(cd $(EXAMPLE) && $(abspath $(BIN))/python -c 'from nbprod.dashboard_server import running; from nbprod.settings import load_settings; print(running(load_settings(profile="replay"))["url"])')"

lab: install  ## JupyterLab on the project's own kernel
	$(BIN)/jupyter lab --ip 127.0.0.1 --notebook-dir nbs

clean:  ## remove build outputs (keeps .venv and .nbprod)
	rm -rf build docs/_build .pytest_cache
