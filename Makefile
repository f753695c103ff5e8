# Two entry points on a fresh machine: `make run` (default experiment) and `make test`.
# Both create .venv on first use and install exactly the versions in requirements.lock (with the
# project itself editable). torch is in the lock like everything else: on this kind of machine pip
# takes the local CPU build of the pinned release; see docs/environment.md.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
LOCK   ?= requirements.lock
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export WANDB_MODE ?= offline

# The tools that write the lock are themselves pinned, in a venv of their own.
LOCK_VENV  ?= .venv-lock
LOCK_TOOLS  = pip==26.3 pip-tools==7.6.2

.PHONY: run test test-fast lint bench lock lock-upgrade clean-venv

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$$(grep -m1 '^pip==' $(LOCK) || echo pip)"
	$(PY) -m pip install -q -r $(LOCK) -e ".[test,launchers]"
	touch $@

run: $(VENV)/.installed
	$(PY) run.py $(ARGS)

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The developers' loop: unit, maths, config composition and one tiny end-to-end run per world (~2 min).
test-fast: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest -q -m "fast and not slow" $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(PY) -m ruff check .

bench: $(VENV)/.installed
	$(PY) bench/dual_solver.py

# Regenerate requirements.lock after changing a dependency in pyproject.toml or requirements.in: pins
# that still fit are kept. `make lock-upgrade` moves every package to its newest release. Either way, run
# `make test` and commit the lock with the change that needed it.
lock-upgrade: LOCK_UPGRADE = --upgrade
lock-upgrade: lock
lock:
	test -x $(LOCK_VENV)/bin/pip-compile || ($(PYTHON) -m venv $(LOCK_VENV) && \
		$(LOCK_VENV)/bin/python -m pip install -q $(LOCK_TOOLS))
	$(LOCK_VENV)/bin/pip-compile -q $(LOCK_UPGRADE) --allow-unsafe --strip-extras --extra test --extra launchers \
		--no-emit-find-links --no-emit-index-url --no-emit-trusted-host \
		--output-file $(LOCK) pyproject.toml requirements.in
	sed -i -E 's/^(torch==[^+ ]+)\+[A-Za-z0-9.]+/\1/' $(LOCK)

clean-venv:
	rm -rf $(VENV)
