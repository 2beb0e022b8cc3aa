# Every target does its own set-up: a fresh clone needs nothing but Python 3.11+ and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Two stamps: `make run` needs only the relay (the [server] extra, at the versions the image
# runs); lint/test/bench also need the dev tools. The dev install includes the server one,
# so it refreshes both stamps and switching between run and test reinstalls nothing.
SERVER_STAMP := $(VENV)/.installed-server
DEV_STAMP    := $(VENV)/.installed-dev
LOCK         := requirements/server.lock
UV_VERSION   := 0.13.9

.PHONY: run test lint format bench bench-full demo clean migrate openapi lock browser

CONSTRAINTS  := $(VENV)/constraints.txt

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The lock's pins without its hashes (pip would demand hashes for the editable install too).
$(CONSTRAINTS): $(LOCK) | $(BIN)/python
	sed -n 's/^\([A-Za-z0-9._-]*==[^ ]*\).*/\1/p' $(LOCK) > $(CONSTRAINTS)

# `pns` was this project's old distribution name (and is someone else's on the index).
$(SERVER_STAMP): pyproject.toml $(CONSTRAINTS)
	$(BIN)/python -m pip uninstall --quiet --yes pns 2>/dev/null || true
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e '.[server]'
	touch $(SERVER_STAMP)

$(DEV_STAMP): pyproject.toml $(CONSTRAINTS)
	$(BIN)/python -m pip uninstall --quiet --yes pns 2>/dev/null || true
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e '.[server,dev]'
	touch $(SERVER_STAMP) $(DEV_STAMP)

## Start the relay on the embedded default (SQLite under ./var, log push sender).
run: $(SERVER_STAMP)
	$(BIN)/pns-server serve

migrate: $(SERVER_STAMP)
	$(BIN)/pns-server migrate

lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy pns_server client_sdk

format: $(DEV_STAMP)
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

## Linters, then the whole suite on SQLite and a throwaway PostgreSQL cluster, in
## TEST_WORKERS processes (each starts its own cluster); TEST_WORKERS=0 runs it in this one.
## A test file runs whole in one process: module-scoped fixtures (the web approver's paired
## browser) carry state from one test to the next, as in a run in one process.
TEST_WORKERS ?= 2
test: lint browser
	$(BIN)/python -m pytest --numprocesses=$(TEST_WORKERS) --dist=loadfile $(PYTEST_ARGS)

## Benchmarks against real relay processes on SQLite and PostgreSQL (docs/benchmarks.md).
bench: $(DEV_STAMP)
	$(BIN)/python -m bench.run

bench-full: $(DEV_STAMP)
	$(BIN)/python -m bench.run --full

## Regenerate docs/openapi.json from the code (a test fails while it is stale).
openapi: $(SERVER_STAMP)
	$(BIN)/python scripts/openapi.py

## Watch the whole flow: a relay, a simulated phone, approved / rejected / OTP logins.
demo: $(DEV_STAMP)
	$(BIN)/python scripts/demo.py

## Re-resolve requirements/server.lock (the image's exact versions) after a pyproject change;
## `make lock LOCK_ARGS=--upgrade` moves every pin to the newest release the bounds allow.
lock: | $(BIN)/python
	$(BIN)/python -m pip install --quiet 'uv==$(UV_VERSION)'
	$(BIN)/uv pip compile pyproject.toml --extra server --python-version 3.11 \
	  --python-platform linux --generate-hashes --custom-compile-command 'make lock' \
	  --quiet $(LOCK_ARGS) -o $(LOCK)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist
