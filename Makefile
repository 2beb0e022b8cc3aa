# Every target does its own set-up: a fresh clone needs nothing but Python 3.11+ and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint format bench bench-full demo clean migrate browser

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

## The web approver's tests drive Debian's Chromium (never a downloaded browser):
## installed here when missing and we are root; otherwise those tests skip (and fail in CI).
CHROMIUM ?= /usr/bin/chromium
browser:
	@test -x $(CHROMIUM) || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing chromium for the web approver tests"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null || \
	    { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }; \
	  else echo "note: $(CHROMIUM) is missing (apt-get install chromium); browser tests will skip"; fi; }

## Linters, then the whole suite on SQLite and a throwaway PostgreSQL cluster.
test: lint browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## Benchmarks against real relay processes on SQLite and PostgreSQL (docs/benchmarks.md).
bench: $(STAMP)
	$(BIN)/python -m bench.run

bench-full: $(STAMP)
	$(BIN)/python -m bench.run --full

## Watch the whole flow: a relay, a simulated phone, approved / rejected / OTP logins.
demo: $(STAMP)
	$(BIN)/python scripts/demo.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist
