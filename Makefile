# Fresh machine: `make demo` runs the main job, `make test` the tests; each installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
LINT_DIRS := src tests $(wildcard benchmarks)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch is pinned here (a local CPU build); pyproject declares the compatible range for users.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

.PHONY: install demo test test-slow lint format bench
install: $(STAMP)

demo: $(STAMP)
	$(PY) -m l3d.demo --out runs/demo

test: $(STAMP)
	$(PY) -m ruff check $(LINT_DIRS)
	$(PY) -m pytest

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

lint: $(STAMP)
	$(PY) -m ruff check $(LINT_DIRS)
	$(PY) -m ruff format --check $(LINT_DIRS)

format: $(STAMP)
	$(PY) -m ruff format $(LINT_DIRS)
	$(PY) -m ruff check --fix $(LINT_DIRS)
