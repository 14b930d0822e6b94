# Assayer: `make` runs lint and the tests; `make demo` shows it working.
.DEFAULT_GOAL := all
SHELL := /bin/bash

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: all help install lint format test chart e2e dist lock bench bench-watch bench-warm bench-page bench-suite bench-rotation bench-tests demo clean

all: lint test

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z0-9-]+):.*## /  \1\t/' | expand -t 16

$(BIN)/assayer: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@# The distribution was called assayer before checkpoint-assayer: drop it from an older venv.
	$(BIN)/pip uninstall --quiet --yes assayer 2>/dev/null || true
	$(BIN)/pip install --quiet -e ".[torch,plot,bundled-redis,dev]"
	@touch $@

install: $(BIN)/assayer ## venv with Assayer, torch (CPU), the bundled Redis and the test tools

format: install ## ruff's import sorting and autofixes
	$(BIN)/ruff check --fix assayer tests bench examples

lint: install ## ruff and strict mypy (assayer, the tests, the benchmarks)
	$(BIN)/ruff check assayer tests bench examples
	@# one mypy run per program: tests/, tests/e2e, tests/chart and bench each import their helpers as top-level
	@# modules from their own directory, and two of them have a conftest.py (pyproject.toml, [tool.mypy])
	$(BIN)/mypy assayer tests --exclude '^tests/(e2e|chart)/'
	$(BIN)/mypy tests/e2e
	$(BIN)/mypy tests/chart
	$(BIN)/mypy bench

test: install ## every test but the chart's (make chart) and the Docker end-to-end one (make e2e): real Redis, real workers
	@# -n 6: the tests mostly wait on processes and Redis, so more workers than cores pay (each has its own Redis):
	@# on 2 cores 83 s with -n 6 or -n 7 and 98 s with -n 8, each worker importing torch and more;
	@# one test at a time per worker, slow ones first (tests/conftest.py), so no worker ends long after the others
	@# PYTHONDONTWRITEBYTECODE emptied: each worker would otherwise rewrite and compile every test module again
	@# (1.8 s of CPU each, 0.7 s with the cached rewrite), and every process it starts compile Assayer's modules
	PYTHONDONTWRITEBYTECODE= $(BIN)/pytest -m "not e2e and not chart" -n 6 --maxschedchunk 1 $(PYTEST_ARGS)

chart: install ## the chart tests; needs helm and checkov (bash .ci/install-helm.sh installs both)
	@helm="$${HELM:-$$(command -v helm || echo .cache/bin/helm)}"; [ -x "$$helm" ] || { \
		echo "make chart: no helm (looked at \$$HELM, PATH, .cache/bin/helm). Run \`bash .ci/install-helm.sh\`" \
			"(helm, kubernetes-validate, checkov) or install helm v3 yourself." >&2; exit 1; }
	@[ -x "$${CHECKOV:-.cache/checkov-venv/bin/checkov}" ] || command -v checkov >/dev/null || { \
		echo "make chart: no checkov (looked at \$$CHECKOV, .cache/checkov-venv, PATH). Run" \
			"\`bash .ci/install-helm.sh\` or pip install checkov yourself." >&2; exit 1; }
	$(BIN)/pytest tests/chart $(PYTEST_ARGS)

e2e: install ## the compose bundle on a running Docker engine with compose v2 (bash .ci/install-docker.sh sets one up)
	bash docker/e2e.sh

dist: install ## the wheel and the sdist in dist/, checked by twine
	rm -rf dist
	$(BIN)/python -m build --outdir dist .
	$(BIN)/twine check --strict dist/*

lock: install ## docker/requirements.lock: the image's exact dependencies, with hashes (from pyproject.toml)
	PYTHON=$(BIN)/python bash docker/lock.sh

bench: bench-watch bench-warm bench-page bench-suite bench-rotation ## every benchmark; figures printed and written to bench/out/

bench-watch: install
	$(BIN)/python bench/watch_bench.py all

bench-page: install ## the checkpoint page of a 10,000-checkpoint watch
	$(BIN)/python bench/page_bench.py

bench-warm: install
	$(BIN)/python bench/warm_eval.py

bench-suite: install ## 1,000 evaluated checkpoints gain two evaluators: backfill enqueue and drain rates, Redis bytes per result
	$(BIN)/python bench/suite_bench.py

bench-rotation: install ## a real Trainer saving every 1 s with rotation, a 4 s evaluator: today vs --snapshot auto vs the callback
	$(BIN)/python bench/rotation_bench.py

bench-tests: install ## where make test's time goes: its wall time, the machine's CPU, and that CPU by kind of process
	$(BIN)/python bench/tests_bench.py

demo: install ## local stack, a watch, a few epochs of training, results, plot, shutdown
	$(BIN)/python examples/digits/demo.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache bench/out dist build
