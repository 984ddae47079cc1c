# grpo_fast developer entry points. `make test` is what CI runs (.ci/run).
#   make venv / install   .venv from the lock: torch and the build tools, then grpo_fast editable; the
#                         extension grpo_fast._C is rebuilt whenever setup.py, pyproject.toml or csrc/ change
#   make demo             grpo-fast train on the built-in demo (tiny model, verifiable task, CPU); each
#                         run replaces the previous demo run in runs/demo (--overwrite). Needs no dev extras.
#   make test             the dev extras (pytest, TRL, liger-kernel, deepspeed) from the lock, then pytest
#   make lint             ruff
#   make test-latest      the test suite in .latest/, a copy of this checkout with the newest release of
#                         every dependency (not CI: CI must not depend on the day's releases)
#   make lock             rewrites requirements.lock from the newest releases (the .latest/ environment)
#   make clean            build outputs (keeps .venv); make distclean removes .venv and .latest too

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Exact versions of everything that ends up in .venv: a pip constraints file, so a new upstream release
# changes nothing here until `make lock` is run and its result committed.
LOCK := requirements.lock
# What the build itself needs (pyproject.toml's [build-system]); installed first because the extension
# builds against the torch of the environment (--no-build-isolation).
BUILD_DEPS := torch setuptools wheel pybind11 ninja
# 2 cores on the dev and CI machines: more compile jobs only thrash.
MAX_JOBS ?= 2
export MAX_JOBS

BASE_STAMP := $(VENV)/.grpo_fast-installed
DEV_STAMP := $(VENV)/.grpo_fast-dev-installed
BUILD_INPUTS := pyproject.toml setup.py $(LOCK) $(shell find csrc -type f 2>/dev/null)

LATEST := .latest
LATEST_PY := $(LATEST)/venv/bin/python

.PHONY: venv install demo test lint test-latest latest-env lock clean distclean

venv install: $(BASE_STAMP)

$(VENV)/pyvenv.cfg:
	$(PYTHON) -m venv $(VENV)

# Modern (PEP 660) editable mode: grpo_fast is imported from this checkout; grpo_fast.kernels finds the
# top-level kernels/ modules through its __path__ (kernels/ itself is no package: see its __init__).
$(BASE_STAMP): $(VENV)/pyvenv.cfg $(BUILD_INPUTS)
	$(PIP) install -q -c $(LOCK) pip
	$(PIP) install -c $(LOCK) $(BUILD_DEPS)
	$(PIP) install -c $(LOCK) --no-build-isolation -e .
	$(PY) -c "import grpo_fast._C, grpo_fast.kernels; print('grpo_fast._C cuda_built:', grpo_fast._C.cuda_built())"
	rm -f $(DEV_STAMP)
	touch $@

$(DEV_STAMP): $(BASE_STAMP)
	$(PIP) install -c $(LOCK) --no-build-isolation -e ".[dev]"
	touch $@

demo: $(BASE_STAMP)
	$(VENV)/bin/grpo-fast train --output-dir runs/demo --overwrite

test: $(DEV_STAMP)
	$(PY) -m pytest -q tests

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check .

# A copy of the checkout (tracked and new files), so its in-place extension build never replaces the
# one .venv uses; every dependency at its newest release (torch within what pip here is allowed).
latest-env:
	rm -rf $(LATEST)
	mkdir -p $(LATEST)/src
	git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t $(LATEST)/src
	$(PYTHON) -m venv $(LATEST)/venv
	$(LATEST_PY) -m pip install -q --upgrade pip
	$(LATEST_PY) -m pip install --upgrade $(BUILD_DEPS)
	cd $(LATEST)/src && ../venv/bin/python -m pip install --upgrade --no-build-isolation -e ".[dev]"

test-latest: latest-env
	cd $(LATEST)/src && ../venv/bin/python -m pip freeze --all --exclude-editable > ../versions.txt
	cd $(LATEST)/src && ../venv/bin/python -m pytest -q tests

lock: latest-env
	{ echo "# Exact versions of every package in .venv: pip constraints (pip install -c $(LOCK))."; \
	  echo "# Written by 'make lock' from the newest releases; commit it once 'make test' passes with it."; \
	  $(LATEST_PY) -m pip freeze --all --exclude-editable | LC_ALL=C sort -f; } > $(LOCK)

clean:
	rm -rf build dist *.egg-info grpo_fast/_C*.so .pytest_cache .ruff_cache $(BASE_STAMP) $(DEV_STAMP)
	find . -path ./$(VENV) -prune -o -path ./$(LATEST) -prune -o -name __pycache__ -type d -print -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(LATEST)
