# outbox — every entry bootstraps its own virtualenv from pyproject.toml.
PY       ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.installed
export OUTBOX_DATABASE_URL ?= postgresql://postgres@127.0.0.1:5432/postgres
export OUTBOX_AMQP_URL     ?= amqp://guest:guest@127.0.0.1:5672/

.PHONY: help install demo test test-cluster test-unit test-integration test-faults chaos lint bench bench-long bench-cluster clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install outbox with its dev tools

demo: $(STAMP)  ## migrate a demo schema, produce events with plain SQL, relay, consume, summarise
	$(BIN)/python -m outbox.demo

test: $(STAMP)  ## the whole suite: unit, contract, integration, faults, manifests (not the 3-node cluster)
	$(BIN)/pytest -q -p no:cacheprovider --hypothesis-show-statistics -m "not cluster"

test-cluster: $(STAMP)  ## fault tests on a private 3-node RabbitMQ cluster with quorum queues; CI runs it after make test (2-5 min on 2 cores)
	$(BIN)/pytest -q -p no:cacheprovider -m cluster tests/faults/test_cluster.py

test-unit: $(STAMP)  ## unit tests only (no services)
	$(BIN)/pytest -q -p no:cacheprovider --hypothesis-show-statistics tests/unit

test-integration: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider --hypothesis-show-statistics tests/contract tests/integration

test-faults: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider tests/faults

CHAOS_ITERATIONS ?= 100
chaos: $(STAMP)  ## random faults while producers insert, then count (not in `make test`; CHAOS_ITERATIONS, CHAOS_SEED)
	$(BIN)/python -m tests.chaos --iterations $(CHAOS_ITERATIONS) $(if $(CHAOS_SEED),--seed $(CHAOS_SEED))

lint: $(STAMP)  ## ruff and mypy --strict
	$(BIN)/ruff check outbox tests bench
	$(BIN)/mypy

bench: $(STAMP)  ## throughput, ratios and latency, medians of 5 rounds, in one run (private stock PostgreSQL)
	$(BIN)/python -m bench

bench-long: $(STAMP)  ## adds the 1M backlog, peak RSS and the bloat soak
	$(BIN)/python -m bench --long

bench-cluster: $(STAMP)  ## 1, 2, 4, 8 relays on one table; the relay on a private 3-node cluster, quorum queue (~8 min)
	$(BIN)/python -m bench.cluster

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
