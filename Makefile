# Assayer: `make` runs lint and the tests; `make demo` shows it working.
.DEFAULT_GOAL := all
SHELL := /bin/bash

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: all help install lint format test chart e2e bench bench-watch bench-warm demo clean

all: lint test

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z0-9-]+):.*## /  \1\t/' | expand -t 16

$(BIN)/assayer: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[torch,plot,bundled-redis,dev]"
	@touch $@

install: $(BIN)/assayer ## venv with Assayer, torch (CPU), the bundled Redis and the test tools

format: install ## ruff's import sorting and autofixes
	$(BIN)/ruff check --fix assayer tests bench examples

lint: install ## ruff and strict mypy
	$(BIN)/ruff check assayer tests bench examples
	$(BIN)/mypy assayer

test: install ## every test but the Docker end-to-end one (real Redis, real workers; chart tests need helm: make chart)
	$(BIN)/pytest -m "not e2e" $(PYTEST_ARGS)

chart: install ## install helm, kubernetes-validate and checkov, then run the chart tests
	bash .ci/install-helm.sh
	$(BIN)/pytest tests/chart $(PYTEST_ARGS)

e2e: install ## the compose bundle on a real Docker engine (installs and starts one when missing)
	bash .ci/install-docker.sh
	bash docker/e2e.sh

bench: bench-watch bench-warm ## every benchmark; figures printed and written to bench/out/

bench-watch: install
	$(BIN)/python bench/watch_bench.py all

bench-warm: install
	$(BIN)/python bench/warm_eval.py

demo: install ## local stack, a watch, a few epochs of training, results, plot, shutdown
	$(BIN)/python examples/digits/demo.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache bench/out
