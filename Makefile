# pcdeq: every target that needs the environment depends on .venv (created on first use).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

LAUNCHER ?= basic
TABLES   ?= all
PROFILE  ?= full
TAG      ?=
EXTRA    ?=
BENCH_ARGS ?=
ROOT     ?=
OUT      ?=
AGG_ARGS ?=
DEVICE  ?= cuda
GPU_CHECK_ARGS ?=

.PHONY: install demo test test-slow test-all lint clean help reproduce-tables tables bench gpu-check

# `make help` lists every target that carries a `## ` comment on its rule line (the one source of truth).
help: ## this list
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-zA-Z_-]+):.*## (.*)$$/\1\t\2/' | \
		awk -F '\t' '{ printf "make %-17s %s\n", $$1, $$2 }'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,sweep,tables]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install pcdeq in editable mode (idempotent)

demo: $(STAMP) ## train pcDEQ-1 (tanh) and pcDEQ-2 (sigmoid) on the embedded digits, print a table
	$(BIN)/python scripts/demo.py

test: $(STAMP) ## the fast test suite (tests not marked slow)
	WANDB_MODE=disabled $(BIN)/python -m pytest -q

test-slow: $(STAMP) ## only the tests marked slow
	WANDB_MODE=disabled $(BIN)/python -m pytest -q -m slow

test-all: $(STAMP) ## every test, slow ones included
	WANDB_MODE=disabled $(BIN)/python -m pytest -q -m ''

lint: $(STAMP) ## ruff and mypy
	$(BIN)/ruff check pcdeq tests scripts train.py eval.py
	$(BIN)/mypy

reproduce-tables: $(STAMP) ## train what the tables need, then aggregate [TABLES=mnist,tolerance LAUNCHER=basic|joblib|slurm PROFILE=full|smoke TAG=cpu EXTRA=trainer=gpu]
	WANDB_MODE=$${WANDB_MODE:-disabled} $(BIN)/python -m pcdeq.reproduce --tables $(TABLES) --profile $(PROFILE) \
		--launcher $(LAUNCHER) $(if $(TAG),--tag $(TAG)) $(if $(EXTRA),--extra "$(EXTRA)")
	$(BIN)/python -m pcdeq.aggregate --profile $(PROFILE) --tables $(TABLES)

tables: $(STAMP) ## aggregate existing runs into tables and plots, no training [PROFILE=full|smoke] or your sweeps [ROOT=<dir> OUT=<dir> AGG_ARGS='--group-by K --metric M --name N'] (docs/sweeps.md)
	$(BIN)/python -m pcdeq.aggregate $(if $(ROOT),--root $(ROOT) $(if $(OUT),--out $(OUT)),--profile $(PROFILE) --tables $(TABLES)) $(AGG_ARGS)

bench: $(STAMP) ## step times of every paper architecture vs its compute floor; results/bench/bench.json [BENCH_ARGS='--plain --memory --epoch ...']
	$(BIN)/python -m pcdeq.bench $(BENCH_ARGS)

gpu-check: $(STAMP) ## the prepared GPU check: device tests, benchmarks, one epoch per MNIST architecture [DEVICE=cuda|cpu GPU_CHECK_ARGS=...]
	$(BIN)/python -m pcdeq.bench.gpu_check --device $(DEVICE) $(if $(filter cpu,$(DEVICE)),--quick) $(GPU_CHECK_ARGS)

clean: ## remove logs, outputs, multirun and the pytest cache
	rm -rf logs outputs multirun .pytest_cache
