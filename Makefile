# The README's two commands: `make run` (main job on its embedded default) and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install run test bench

install:
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e ".[test,data]"

# Main job. Until the training scripts land this is the attention benchmark on a small default.
run: install
	$(PYTHON) experiments/bench_attention.py --quick

test: install
	$(PYTHON) -m pytest -q -n 2

# Full benchmark (peers: jax.nn, tokamax and PyTorch when installed); see BENCHMARKS.md.
bench: install
	$(PYTHON) experiments/bench_attention.py
