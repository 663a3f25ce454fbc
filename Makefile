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

help:
	@echo "make demo        train pcDEQ-1 (tanh) and pcDEQ-2 (sigmoid) on the embedded digits, print a table"
	@echo "make test        the test suite (fast tests, 9-10 min on 2 idle cores)"
	@echo "make test-slow   only the tests marked slow"
	@echo "make lint        ruff and mypy"
	@echo "make install     create $(VENV) and install pcdeq in editable mode (idempotent)"
	@echo "make reproduce-tables [TABLES=mnist,tolerance] [LAUNCHER=basic|joblib|slurm] [PROFILE=full|smoke] [TAG=cpu] [EXTRA=trainer=gpu]"
	@echo "                 train what the tables need (skipping what is done), then aggregate"
	@echo "make tables [PROFILE=full|smoke]   aggregate the existing runs into tables and plots, no training"
	@echo "make tables ROOT=<dir> [OUT=<dir>] [AGG_ARGS='--group-by K --metric M --name N']"
	@echo "                 tables of your own sweeps under <dir> (one row per configuration; docs/sweeps.md)"
	@echo "make bench [BENCH_ARGS='--plain --reference PATH --memory --epoch --archs pcdeq --device cuda ...']"
	@echo "                 step times of every paper architecture vs its compute floor; table + results/bench/bench.json"
	@echo "make gpu-check [DEVICE=cuda|cpu] [GPU_CHECK_ARGS='--reference PATH --data-dir DIR']"
	@echo "                 the prepared GPU check (< 8 min): device tests, benchmarks, switches, one epoch per"
	@echo "                 MNIST architecture; results/bench/gpu_*.txt (DEVICE=cpu: a quick dry run, logs/gpu_check/)"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,sweep,tables]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

test: $(STAMP)
	WANDB_MODE=disabled $(BIN)/python -m pytest -q

test-slow: $(STAMP)
	WANDB_MODE=disabled $(BIN)/python -m pytest -q -m slow

test-all: $(STAMP)
	WANDB_MODE=disabled $(BIN)/python -m pytest -q -m ''

lint: $(STAMP)
	$(BIN)/ruff check pcdeq tests scripts train.py eval.py
	$(BIN)/mypy

reproduce-tables: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-disabled} $(BIN)/python -m pcdeq.reproduce --tables $(TABLES) --profile $(PROFILE) \
		--launcher $(LAUNCHER) $(if $(TAG),--tag $(TAG)) $(if $(EXTRA),--extra "$(EXTRA)")
	$(BIN)/python -m pcdeq.aggregate --profile $(PROFILE) --tables $(TABLES)

tables: $(STAMP)
	$(BIN)/python -m pcdeq.aggregate $(if $(ROOT),--root $(ROOT) $(if $(OUT),--out $(OUT)),--profile $(PROFILE) --tables $(TABLES)) $(AGG_ARGS)

bench: $(STAMP)
	$(BIN)/python -m pcdeq.bench $(BENCH_ARGS)

gpu-check: $(STAMP)
	$(BIN)/python -m pcdeq.bench.gpu_check --device $(DEVICE) $(if $(filter cpu,$(DEVICE)),--quick) $(GPU_CHECK_ARGS)

clean:
	rm -rf logs outputs multirun .pytest_cache
