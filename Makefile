# One entry point for setting up, running and checking medfed.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test test-fast test-slow check lint format bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,imaging,he]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/medfed run configs/heart_disease.yaml

test: install test-fast test-slow

test-fast: install
	$(BIN)/pytest -m "not slow and not containers"

test-slow: install
	$(BIN)/pytest -m "slow"

lint: install
	$(BIN)/ruff format --check medfed tests benchmarks
	$(BIN)/ruff check medfed tests benchmarks
	$(BIN)/mypy

check: lint test-fast

bench: install
	$(BIN)/python benchmarks/heart_round_time.py
	$(BIN)/python benchmarks/codec_throughput.py

format: install
	$(BIN)/ruff format medfed tests benchmarks
	$(BIN)/ruff check --fix medfed tests benchmarks

clean:
	rm -rf $(VENV) .medfed mlflow.db mlruns mlartifacts
