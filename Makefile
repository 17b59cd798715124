# Two commands on a fresh machine: `make run` trains the default profile, `make test` runs the tests.
# Both create the virtual environment first (once; again when pyproject.toml changes).

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# The shared CIFAR-10 image folder beside the checkout, unless CIFAR10_DIR says otherwise.
SHARED_CIFAR10 := $(abspath ../shared/datasets/cifar10)
export CIFAR10_DIR ?= $(if $(wildcard $(SHARED_CIFAR10)/train),$(SHARED_CIFAR10),)
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: install run test lint

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,dask,jax,s3]"
	touch $@

install: $(BIN)/.installed

run: install
	$(BIN)/cifar-pipeline train $(ARGS)

# One pytest-xdist worker per core and one more, each with its own Prefect server: many tests wait on
# servers and subprocesses, and on 2 cores three workers took the TensorFlow pass from 982 s to 753 s
# (bench/RESULTS.md). worksteal evens out the long tests.
# Counted by Python rather than nproc, which macOS lacks.
WORKERS ?= $(shell $(PYTHON) -c 'import os; print((os.cpu_count() or 1) + 1)')
PARALLEL ?= -n $(WORKERS) --dist worksteal

test: install
	$(BIN)/python -m pytest $(PARALLEL) $(PYTEST_ARGS)
	KERAS_BACKEND=jax $(BIN)/python -m pytest -m backends $(PARALLEL) $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
