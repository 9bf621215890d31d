# `make demo` and `make test` are the README's two commands; both build .venv/ first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export BENTOML_DO_NOT_TRACK := true

.PHONY: demo test test-slow lint bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m finetune.demo
	$(PY) -m export runs/digits --out artifacts --name digits --int8 --skip-existing

test: $(VENV)/.installed
	$(PY) -m ruff check finetune export service tests bench
	$(PY) -m pytest

test-slow: $(VENV)/.installed
	$(PY) -m pytest -m slow

bench: $(VENV)/.installed
	$(PY) bench/finetune.py
	$(PY) bench/export.py
