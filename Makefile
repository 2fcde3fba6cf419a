# The two commands a newcomer needs: `make dev` runs the service, `make test` runs the tests.
#
#   make install       Python only (3.11+, make, a C compiler): .venv with the client
#                      (clients/python, editable) and the server (editable, with [dev])
#   make install-node  Node.js tools: buf (node_modules/) and the Node example's packages;
#                      lint, test and the benchmarks need them, `make dev` does not
#   make lock          rewrite requirements/runtime.txt, the hash-pinned lock of the Docker image
#   make lock-check    fail if that lock is stale (CI)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NODE_STAMP := node_modules/.taskgate-installed
NODE_HELP := Node.js 20+ is needed for buf and the Node example: https://nodejs.org or apt install nodejs npm

.PHONY: install install-node dev test lint lock lock-check bench bench-quick

$(STAMP): pyproject.toml clients/python/pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e "./clients/python[worker]" -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

$(NODE_STAMP): package.json package-lock.json examples/node/package.json
	@command -v npm >/dev/null 2>&1 || { echo "$(NODE_HELP)" >&2; exit 1; }
	npm install --no-audit --no-fund --loglevel=error
	npm install --prefix examples/node --no-audit --no-fund --loglevel=error
	touch $(NODE_STAMP)

install-node: $(NODE_STAMP)

# Migrates the local database, then runs one worker and the gateway until Ctrl-C.
dev: install
	$(BIN)/taskgate dev

test: install install-node
	$(BIN)/pytest

lint: install install-node
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	node_modules/.bin/buf lint

lock: install
	$(BIN)/python requirements/lock.py

lock-check: install
	$(BIN)/python requirements/lock.py --check

# Benchmarks (not tests): ratios against raw send_task, a naive gateway and Flower, same run.
bench: install install-node
	$(BIN)/pip install -q -e "./clients/python[worker]" -e ".[dev,bench]"
	npm install --prefix bench/node --no-audit --no-fund --loglevel=error
	$(BIN)/python -m bench

bench-quick: install install-node
	$(BIN)/pip install -q -e "./clients/python[worker]" -e ".[dev,bench]"
	npm install --prefix bench/node --no-audit --no-fund --loglevel=error
	$(BIN)/python -m bench --quick
