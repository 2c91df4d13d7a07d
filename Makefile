# Two commands do everything on a fresh CPU-only machine:
#   make demo   - create .venv, install, run the main job
#   make test   - create .venv, install, run the test suite
# GPU users: make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
# (or install the CUDA torch of your choice first; an already-installed torch >= 2.4 is kept).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The main job: DHC x4 on the Python standard library (~3-5 min on 2 cores), then a sample.
demo: $(STAMP)
	$(VENV)/bin/hyperbit train --preset demo --out runs/demo --overwrite
	$(VENV)/bin/hyperbit generate runs/demo --prompt "def " --max-tokens 120 --temperature 0.8 --top-k 50

test: $(STAMP)
	$(PY) -m pytest

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

bench: $(STAMP)
	$(PY) benchmarks/pathway_overhead.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
