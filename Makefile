# Quickstart: `make run` trains the quick MNIST DDPM; `make test` runs the tests.
# Both create .venv and install the project (with pip) when missing, with MKL
# for the CPU's matrix products on x86-64 Linux (nnbase/blas.py).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= runs/mnist_ddpm_quick
PRESET ?= quick

.PHONY: run test lint format install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,mkl]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) -m experiments.mnist_ddpm --workdir $(WORKDIR) --preset $(PRESET)

# The tests run on up to 4 worker processes (one per core); TEST_WORKERS=0 runs them in one.
TEST_WORKERS ?= auto
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --maxprocesses 4 --dist worksteal

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache
