# pcdeq: every target that needs the environment depends on .venv (created on first use).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: install demo test test-slow test-all lint clean help

help:
	@echo "make demo        train pcDEQ-1 (tanh) and pcDEQ-2 (sigmoid) on the embedded digits, print a table"
	@echo "make test        the test suite (fast tests, ~5 min on 2 cores)"
	@echo "make test-slow   only the tests marked slow"
	@echo "make lint        ruff and mypy"
	@echo "make install     create $(VENV) and install pcdeq in editable mode (idempotent)"

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

clean:
	rm -rf logs outputs multirun .pytest_cache
