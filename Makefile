# Everything a fresh machine needs goes through these targets: no hand-installed package.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU build of PyTorch: pinned here (pip finds the wheel locally) so the project's torch>=2.1
# range never pulls a multi-GB CUDA build. Override with `make TORCH_SPEC=torch test`.
TORCH_SPEC ?= torch==2.13.0
BENCH_VENV := .bench-venv
PYTEST_ARGS ?=

.PHONY: install lint test demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The static gate (ruff: pyflakes, bugbear, pyupgrade, complexity; mypy), configured in
# pyproject.toml for the three Libs and ContrastAmplifierCommon, checked as Python 3.9 (Slicer's).
lint: $(STAMP)
	$(PY) -m ruff check
	$(PY) -m mypy

test: lint
	$(PY) -m pytest -n 2 --dist loadfile $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/contrast-amplifier demo demo-output

# antspyx downgrades numpy/scipy: it lives in its own venv, never in the project's.
$(BENCH_VENV)/.installed: $(STAMP)
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install --quiet antspyx==0.6.3 SimpleITK nilearn
	touch $@

bench: $(STAMP) $(BENCH_VENV)/.installed
	$(VENV)/bin/contrast-amplifier bench bench-output --ants-python $(BENCH_VENV)/bin/python
	$(VENV)/bin/contrast-amplifier-train bench bench-output

clean:
	rm -rf $(VENV) $(BENCH_VENV) build *.egg-info demo-output bench-output
