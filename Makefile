# Two entry points on a fresh machine: `make run` (default experiment) and `make test`.
# Both create .venv on first use. torch==2.13.0 is pinned in the same pip call as everything
# else so pip resolves the local CPU build instead of a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
TORCH  ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: run test lint bench clean-venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" -e ".[test,launchers]"
	touch $@

run: $(VENV)/.installed
	$(PY) run.py $(ARGS)

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(PY) -m ruff check .

bench: $(VENV)/.installed
	$(PY) bench/dual_solver.py

clean-venv:
	rm -rf $(VENV)
