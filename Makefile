# One-command set-up: `make demo` (the main job) and `make test`.
# torch==2.13.0 is installed *before* the project: on our machines that is the
# CPU wheel; letting pip resolve `torch>=2.4` itself pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
TORCH  ?= torch==2.13.0
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1

.PHONY: setup demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,demo]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/torchfreeze demo

test: setup
	$(PY) -m ruff check src tests bench examples
	$(PY) -m pytest -n 2 -q

lint: setup
	$(PY) -m ruff check src tests bench examples

bench: setup
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) torchfreeze-demo .pytest_cache
