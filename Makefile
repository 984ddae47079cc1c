# grpo_fast developer entry points. `make test` is what CI runs (.ci/run).
#   make venv / install   .venv with torch, then grpo_fast editable with the dev extras; the extension
#                         grpo_fast._C is rebuilt whenever setup.py, pyproject.toml or csrc/ change
#   make demo             grpo-fast train on the built-in demo (tiny model, verifiable task, CPU); each
#                         run replaces the previous demo run in runs/demo (--overwrite)
#   make test             pytest
#   make lint             ruff
#   make clean            build outputs (keeps .venv); make distclean removes .venv too

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# 2 cores on the dev and CI machines: more compile jobs only thrash.
MAX_JOBS ?= 2
export MAX_JOBS

STAMP := $(VENV)/.grpo_fast-installed
BUILD_INPUTS := pyproject.toml setup.py $(shell find csrc -type f 2>/dev/null)

.PHONY: venv install demo test lint clean distclean

venv install: $(STAMP)

$(VENV)/pyvenv.cfg:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

# --no-build-isolation: the extension must build against the torch installed in the venv.
# Modern (PEP 660) editable mode: kernels/ is mapped to grpo_fast.kernels by an import hook; the
# "compat" mode would put the repo root on sys.path and expose kernels/ as a top-level `kernels`.
$(STAMP): $(VENV)/pyvenv.cfg $(BUILD_INPUTS)
	$(PIP) install torch
	$(PIP) install --no-build-isolation -e ".[dev]"
	$(PY) -c "import grpo_fast._C, grpo_fast.kernels; print('grpo_fast._C cuda_built:', grpo_fast._C.cuda_built())"
	touch $@

demo: $(STAMP)
	$(VENV)/bin/grpo-fast train --output-dir runs/demo --overwrite

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf build dist *.egg-info grpo_fast/_C*.so .pytest_cache .ruff_cache $(STAMP)
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -print -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
