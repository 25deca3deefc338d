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
# The installed-extension check (Testing/InstalledExtension, part of the pytest run) uses a cached
# Python environment holding only what 3D Slicer 5.8 ships (slicer_env.py; about 1.4 GB, built once).
SLICER_SERIES ?= 5.8
SLICER_ENV := .slicer-env-$(SLICER_SERIES)
# Slicer 5.6/5.8 embed Python 3.9: the Libs' own tests also run under a 3.9 venv with Slicer 5.8's
# package versions as constraints (py39_env.py says what it holds). Without a 3.9 interpreter
# that step says so and is skipped. torch has no CPU wheel for 3.9 here: the tests needing it (and
# slicer-core, which is 3.10+) are skipped by the without_packages plugin, each with its reason;
# ContrastAmplifierTrainingLib's tests are left out (their conftest.py imports torch).
PYTHON39 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.9.*/bin/python) $(shell command -v python3.9 2>/dev/null))
VENV39 := .venv39
PY39_SUITES := Testing/ContrastAmplifierCommon Testing/ContrastAmplifierLib Testing/LesionReaderLib
PYTEST39_ARGS ?=

.PHONY: install lint test test-py39 slicer-env system-deps demo bench clean

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

test: lint system-deps slicer-env $(VENV39)/.installed
	CA_SLICER_SERIES=$(SLICER_SERIES) $(PY) -m pytest -n 2 --dist loadfile $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-py39

# Real DICOM tools for the DICOM/PACS tests: Orthanc (a PACS, with its DICOMweb plugin) and
# dicom3tools (dciodvfy, the DICOM validator). apt-get installs them where we are root and apt
# exists (as on CI); elsewhere the tests that need them are skipped, each saying why.
DICOM_TOOLS := /usr/sbin/Orthanc /usr/share/orthanc/plugins/libOrthancDicomWeb.so /usr/bin/dciodvfy
DICOM_PACKAGES := orthanc orthanc-dicomweb dicom3tools
system-deps:
	@if ls $(DICOM_TOOLS) >/dev/null 2>&1; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "Installing $(DICOM_PACKAGES) with apt-get (for the DICOM/PACS tests)"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q --no-install-recommends $(DICOM_PACKAGES) >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $(DICOM_PACKAGES) >/dev/null; } || \
		echo "apt-get could not install $(DICOM_PACKAGES): the DICOM/PACS tests that need them are skipped."; \
	else \
		echo "Not root or no apt-get: $(DICOM_PACKAGES) not installed; the DICOM/PACS tests that need them are skipped."; \
	fi

# Returns at once when the env is built and its inputs (pins, slicer-core version) are unchanged.
slicer-env: $(STAMP)
	$(PY) Testing/InstalledExtension/slicer_env.py --series $(SLICER_SERIES) --dir $(SLICER_ENV)

$(VENV39)/.installed: pyproject.toml Makefile Testing/InstalledExtension/py39_env.py Testing/InstalledExtension/slicer-5.8-packages.txt $(STAMP)
	@if [ -z "$(PYTHON39)" ]; then echo "No Python 3.9 found (pyenv 3.9.x or python3.9 on PATH; or set PYTHON39=...): $(VENV39) not built."; exit 0; fi; \
	set -e; rm -rf $(VENV39); \
	$(PYTHON39) -m venv $(VENV39); \
	$(PY) Testing/InstalledExtension/py39_env.py constraints --series 5.8 > $(VENV39)/constraints.txt; \
	$(PY) Testing/InstalledExtension/py39_env.py requirements > $(VENV39)/requirements.txt; \
	$(VENV39)/bin/python -m pip install --quiet --constraint $(VENV39)/constraints.txt -r $(VENV39)/requirements.txt; \
	$(VENV39)/bin/python -m pip install --quiet --no-deps -e .; \
	touch $@

test-py39: $(VENV39)/.installed
	@if [ ! -f $(VENV39)/.installed ]; then echo "SKIPPED: the Libs' tests under Python 3.9 (Slicer 5.6/5.8's): no Python 3.9 interpreter."; exit 0; fi; \
	echo "The Libs' tests under Python 3.9 with Slicer 5.8's package versions ($(VENV39)):"; \
	PYTHONPATH=Testing/InstalledExtension $(VENV39)/bin/python -m pytest -n 2 --dist loadfile -p no:cacheprovider \
		-p without_packages --without torch --without slicer $(PYTEST39_ARGS) $(PY39_SUITES)

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
	rm -rf $(VENV) $(BENCH_VENV) $(VENV39) .slicer-env-* build *.egg-info demo-output bench-output
