# Quick start (each target sets itself up on a fresh machine):
#   make demo   - the main job: a smoke search with the tiny model on an embedded local Ray (CPU)
#   make test   - the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
TORCH   = torch==2.13.0

.PHONY: setup demo demo-vlsp test test-fast bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned to the CPU build; then the project, with torch held to that version
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]" "$(TORCH)"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) run_tune.py --model tiny --smoke-test

# A search on the real corpus (tiny model, CPU, about 25 minutes on 2 cores).
demo-vlsp: setup
	$(PY) run_tune.py --model tiny --search-space tiny_cpu --data-dir ../shared/data/vlsp2025

test: setup
	$(PY) -m pytest -q -rs

test-fast: setup
	$(PY) -m pytest -q -rs -m "not integration and not slow"

bench: setup
	$(PY) bench/bench_smatch.py
	$(PY) bench/bench_batching.py
	$(VENV)/bin/torchrun --nproc_per_node 2 bench/bench_train.py --model tiny --steps 5 --rounds 2
	$(VENV)/bin/torchrun --nproc_per_node 2 bench/bench_eval_replica.py --model tiny --n-prompts 16 --max-new-tokens 48 --rounds 2
	$(PY) bench/bench_generate.py --model tiny --max-new-tokens 128
	$(PY) bench/bench_smoke_search.py

clean:
	rm -rf runs .pytest_cache
