# The two commands a newcomer needs: `make dev` runs the service, `make test` runs the tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install dev test lint bench

$(STAMP): pyproject.toml package.json package-lock.json examples/node/package.json
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	npm install --no-audit --no-fund --loglevel=error
	npm install --prefix examples/node --no-audit --no-fund --loglevel=error
	touch $(STAMP)

install: $(STAMP)

# Migrates the local database, then runs one worker and the gateway until Ctrl-C.
dev: install
	$(BIN)/taskgate dev

test: install
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	node_modules/.bin/buf lint
