# datagen — developer entry points. `make test` and `make demo` work on a fresh machine with
# only Python 3.11 installed: they create .venv and install datagen into it first.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test test-fast lint format demo stop bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

install: $(VENV)/.installed

test: install  ## the whole test suite, slow end-to-end tests included (what CI runs)
	$(PY) -m pytest

test-fast: install  ## skip the tests marked slow
	$(PY) -m pytest -m "not slow"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .

demo: install  ## the main job on the embedded default: local Prefect server + worker, a build-ct run
	$(PY) scripts/demo.py demo

stop:  ## stop what `make demo` started (the server and the worker, by PID)
	@if [ -x $(PY) ]; then $(PY) scripts/demo.py stop; else echo "nothing to stop (no $(VENV))"; fi

bench: install
	$(PY) bench/filter_vs_duckdb.py

clean:
	rm -rf .bench .pytest_cache .ruff_cache
