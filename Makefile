# The two commands a new user needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: demo test lint unit bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed-demo: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[examples]'
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed-demo

demo: $(VENV)/.installed-demo
	$(BIN)/stowplan run examples/quickstart.toml

lint: $(VENV)/.installed-test
	$(BIN)/ruff check stowplan tests benchmarks examples
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q

# the fast loop while changing code: unit and property tests, no services
unit: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q tests/unit tests/property tests/contract -m 'not integration'

bench: $(VENV)/.installed-test
	$(BIN)/python benchmarks/bench_dispatch.py
	$(BIN)/python benchmarks/bench_kubernetes.py

clean:
	rm -rf $(VENV) .stowplan
