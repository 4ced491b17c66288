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

.PHONY: install demo test test-slow lint format bench browser
install: $(STAMP)

demo: $(STAMP)
	$(PY) -m l3d.demos.tms --out runs/demo

# The report's browser tests use headless Chromium: try Debian's package (needs root), quietly;
# never fail here (the tests skip with a message when it is missing).
browser:
	-@command -v chromium >/dev/null 2>&1 || \
		(DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1) || \
		(apt-get update -qq >/dev/null 2>&1 && \
		 DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1) || \
		echo "chromium could not be installed: the report's browser tests will be skipped"

test: $(STAMP) browser
	$(PY) -m ruff check $(LINT_DIRS)
	$(PY) -m mypy
	$(PY) -m pytest

test-slow: $(STAMP) browser
	$(PY) -m pytest -m slow

# Speed targets are checked by benchmarks, never by timed tests (docs/performance.md).
bench: $(STAMP)
	$(PY) benchmarks/bench_toy.py --epochs 1000
	$(PY) benchmarks/bench_step.py --settings a,c --methods fast,torchfunc,floor --repeats 5

lint: $(STAMP)
	$(PY) -m ruff check $(LINT_DIRS)
	$(PY) -m ruff format --check $(LINT_DIRS)

format: $(STAMP)
	$(PY) -m ruff format $(LINT_DIRS)
	$(PY) -m ruff check --fix $(LINT_DIRS)
