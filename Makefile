# Z-Image job service. `make demo` runs the main job; `make test` runs every test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TINY := checkpoints/tiny/turbo

.PHONY: install checkpoint migrate up down demo test test-quick test-faults bench bench-submit bench-gpu lint check-deploy clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the project with its dev tools (and the zimage command)

TINY_EDIT := checkpoints/tiny/edit
TINY_BASE := checkpoints/tiny/base

# The Edit and Base checkpoints first: the Turbo marker, written last, is what says every build finished.
$(TINY)/tiny_checkpoint.json: $(STAMP) deploy/tiny_checkpoint.py deploy/tiny_edit_checkpoint.py
	$(PY) -m deploy.tiny_edit_checkpoint $(TINY_EDIT)
	$(PY) -m deploy.tiny_checkpoint $(TINY_BASE) --base
	$(PY) -m deploy.tiny_checkpoint $(TINY)

checkpoint: $(TINY)/tiny_checkpoint.json  ## build the tiny random-weight Turbo, Base and Edit checkpoints (offline, seconds)

migrate: install  ## create the database if needed and apply migrations
	$(VENV)/bin/zimage-admin migrate

up: install checkpoint  ## start SeaweedFS, the API and a worker in the background; writes .run/env
	$(PY) -m deploy.stack up

down:  ## stop what `make up` started
	$(PY) -m deploy.stack down

demo: install checkpoint  ## the main job: stack up, 16+ prompts, progress, images and a gallery, stack down
	$(PY) -m deploy.demo

test: install  ## every test, against real Postgres, Redis, SeaweedFS and the tiny pipeline (faults included)
	$(PY) -m pytest

test-quick: install  ## unit, API and queue tests: no worker, engine, e2e, faults or storage suites (< 2 min)
	$(PY) -m pytest tests/unit tests/api tests/queue -q

test-faults: install  ## the fault-injection suite alone; prints the fault table
	$(PY) -m pytest tests/faults

bench: install checkpoint  ## CPU benchmark, tiny checkpoint: naive loop vs engine vs whole service (≤ 5 min)
	$(PY) -m bench.engine_bench --out bench/results/engine.json
	$(PY) -m bench.service_bench --out bench/results/service.json
	$(PY) -m bench.adapter_bench --out bench/results/adapters.json
	$(PY) -m bench.fast_bench --out bench/results/fast.json

bench-submit: install  ## POST /v1/jobs from 32 connections for 30 s (group commit on and off, rate limit on, a trivial-app reference; needs wrk); a 10 000-job batch
	command -v wrk >/dev/null || (apt-get install -y -qq wrk >/dev/null)
	$(PY) -m bench.submit_bench --out bench/results/submit.json
	$(PY) -m bench.batch_bench --out bench/results/batch.json

bench-gpu: install  ## full-size random-weight benchmark on one GPU (see bench/gpu.py)
	$(PY) -m bench.gpu --out bench/results/gpu.json

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy api core worker client deploy

check-deploy: install  ## the Kubernetes manifests (deploy/k8s) and the compose profiles, checked without a cluster or Docker
	$(PY) -m pytest tests/deploy/test_k8s.py tests/deploy/test_compose.py -q

clean:
	rm -rf .run demo-output checkpoints .pytest_cache
