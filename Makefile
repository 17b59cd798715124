# Two commands on a fresh machine: `make run` trains the default profile, `make test` runs the tests.
# Both create the virtual environment first (once; again when pyproject.toml changes).

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# The shared CIFAR-10 image folder beside the checkout, unless CIFAR10_DIR says otherwise.
SHARED_CIFAR10 := $(abspath ../shared/datasets/cifar10)
export CIFAR10_DIR ?= $(if $(wildcard $(SHARED_CIFAR10)/train),$(SHARED_CIFAR10),)
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: install install-serve lock run test test-quick lint

# The exact set every install gets, hashes checked: pyproject.toml's ranges resolved by `make lock`.
LOCK := requirements.lock
EXTRAS := train dev dask jax s3 onnx
# Serving alone (predict, app, watch, models on a version with TFLite exports): no TensorFlow, no Keras.
SERVE_LOCK := requirements-serve.lock
SERVE_EXTRAS := s3

$(BIN)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --require-hashes -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

install: $(BIN)/.installed

# A second environment with the serving install alone, as a machine that only predicts would have it: the tests
# run `predict` and `app` in it (tests/flows/test_serving_install.py).
SERVE_VENV ?= .venv-serve
$(SERVE_VENV)/bin/.installed: pyproject.toml $(SERVE_LOCK)
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(SERVE_VENV)/bin/python -m pip install --quiet --require-hashes -r $(SERVE_LOCK)
	$(SERVE_VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $@

install-serve: $(SERVE_VENV)/bin/.installed

# After editing pyproject.toml's dependencies, or to take upgrades: its own commit, with the whole suite run.
# Universal: one lock for Linux, macOS and Windows, Python 3.11 and newer.
# The serving lock takes the full lock's versions (its pins as constraints): both installs run the same code.
lock:
	test -x $(BIN)/uv || $(BIN)/python -m pip install --quiet uv
	UV_CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/uv pip compile pyproject.toml $(addprefix --extra ,$(EXTRAS)) \
		--universal --python-version 3.11 --generate-hashes --quiet -o $(LOCK)
	sed -n 's/^\([A-Za-z0-9][^ ]*==[^ ]*\)\( ;[^\\]*\)\{0,1\} \\$$/\1\2/p' $(LOCK) > $(VENV)/lock-pins.txt
	UV_CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/uv pip compile pyproject.toml $(addprefix --extra ,$(SERVE_EXTRAS)) \
		--universal --python-version 3.11 --generate-hashes --quiet -c $(VENV)/lock-pins.txt -o $(SERVE_LOCK)

run: install
	$(BIN)/cifar-pipeline train $(ARGS)

# One pytest-xdist worker per core and one more, each with its own Prefect server: many tests wait on
# servers and subprocesses, and on 2 cores three workers took the TensorFlow pass from 982 s to 753 s
# (bench/RESULTS.md). worksteal evens out the long tests.
# Counted by Python rather than nproc, which macOS lacks.
WORKERS ?= $(shell $(PYTHON) -c 'import os; print((os.cpu_count() or 1) + 1)')
PARALLEL ?= -n $(WORKERS) --dist worksteal

# The lane for every change: each test that takes under about 4 s on two cores (no real training beyond a few
# steps, no service of its own), about 2 minutes in all. `make test` runs everything, as CI does.
test-quick: install
	$(BIN)/python -m pytest -m "not slow" $(PARALLEL) $(PYTEST_ARGS)

test: install install-serve
	$(BIN)/python -m pytest $(PARALLEL) $(PYTEST_ARGS)
	KERAS_BACKEND=jax $(BIN)/python -m pytest -m backends $(PARALLEL) $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
