# The two commands a newcomer needs: `make dev` runs the service, `make test` runs the tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install dev test lint bench bench-quick

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

# Benchmarks (not tests): ratios against raw send_task, a naive gateway and Flower, same run.
bench: install
	$(BIN)/pip install -q -e ".[dev,bench]"
	npm install --prefix bench/node --no-audit --no-fund --loglevel=error
	$(BIN)/python -m bench

bench-quick: install
	$(BIN)/pip install -q -e ".[dev,bench]"
	npm install --prefix bench/node --no-audit --no-fund --loglevel=error
	$(BIN)/python -m bench --quick
