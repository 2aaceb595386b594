# One entry point for setting up, running and checking medfed.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test test-fast test-slow test-containers check lint format bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,imaging,he]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/medfed run configs/heart_disease.yaml

# The tiers run in this order, so the quick failures come first; the container
# tier takes about half an hour on a loaded 2-core machine.
test: install test-fast test-slow test-containers

test-fast: install
	$(BIN)/pytest -m "not slow and not containers"

test-slow: install
	$(BIN)/pytest -m "slow and not containers"

# Builds the images and runs sites in podman containers. It needs root on
# Debian, because scripts/containers/setup.sh installs podman with apt-get on
# first use, and it stops the podman API service again at the end.
test-containers: install
	$(BIN)/pytest -m "containers"

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
