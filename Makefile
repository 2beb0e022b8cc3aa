# Every target does its own set-up: a fresh clone needs nothing but Python 3.11+ and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint format bench bench-full demo clean migrate openapi

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[server,dev]'
	touch $(STAMP)

## Start the relay on the embedded default (SQLite under ./var, log push sender).
run: $(STAMP)
	$(BIN)/pns-server serve

migrate: $(STAMP)
	$(BIN)/pns-server migrate

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy pns_server client_sdk

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

## Linters, then the whole suite on SQLite and a throwaway PostgreSQL cluster.
test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## Benchmarks against real relay processes on SQLite and PostgreSQL (docs/benchmarks.md).
bench: $(STAMP)
	$(BIN)/python -m bench.run

bench-full: $(STAMP)
	$(BIN)/python -m bench.run --full

## Regenerate docs/openapi.json from the code (a test fails while it is stale).
openapi: $(STAMP)
	$(BIN)/python scripts/openapi.py

## Watch the whole flow: a relay, a simulated phone, approved / rejected / OTP logins.
demo: $(STAMP)
	$(BIN)/python scripts/demo.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist
