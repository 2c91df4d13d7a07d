# Two commands do everything on a fresh CPU-only machine:
#   make demo   - create .venv, install, run the main job
#   make test   - create .venv, install, run the test suite
# GPU users: make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
# (or install the CUDA torch of your choice first: an installed torch is kept only when it is at
# least the floor in pyproject.toml, torch>=2.6; an older one is replaced by TORCH_SPEC).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# the torch floor, read from pyproject.toml's "torch>=X.Y" so it is written down once
TORCH_MIN := $(shell sed -n 's/.*"torch>=\([0-9][0-9.]*\)".*/\1/p' pyproject.toml)
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# exit status 0 when the venv's torch imports and its major.minor is at least TORCH_MIN
TORCH_OK := import sys, torch; v = [int(p) for p in torch.__version__.split("+")[0].split(".")[:2]]; \
	sys.exit(v < [int(p) for p in "$(TORCH_MIN)".split(".")[:2]])

.PHONY: install demo test test-slow test-gpu bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c '$(TORCH_OK)' 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev,hf,vision]"
	@echo "building the CPU kernels (hyperbit/nn/native.c: once per machine and version, ~10 s)"
	$(PY) -c 'from hyperbit.nn import native; native.library()'
	touch $(STAMP)

install: $(STAMP)

# The main job: DHC x4 on the Python standard library (README: how long), then a sample.
demo: $(STAMP)
	$(VENV)/bin/hyperbit train --preset demo --out runs/demo --overwrite
	$(VENV)/bin/hyperbit generate runs/demo --prompt "def " --max-tokens 120 --temperature 0.8 --top-k 50

test: $(STAMP)
	$(PY) -m pytest

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

# The CUDA paths (tests marked `cuda`); they skip themselves on a machine without a GPU.
test-gpu: $(STAMP)
	$(PY) -m pytest -m cuda

bench: $(STAMP)
	$(PY) benchmarks/pathway_overhead.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
