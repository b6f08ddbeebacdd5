# The README's two commands: `make run` (main job on its embedded default) and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install run test bench

install:
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e ".[test,data]"

# Main job: train the tiny byte-level LM on the embedded corpus (the Python standard library's
# sources) on CPU; prints eval bits/byte next to a unigram baseline and a generated sample.
run: install
	$(PYTHON) experiments/train.py --config configs/lm_tiny.py --workdir runs/lm_tiny-$$(date +%Y%m%d-%H%M%S)

test: install
	$(PYTHON) -m pytest -q -n 2

# Full benchmark (peers: jax.nn, tokamax and PyTorch when installed); see BENCHMARKS.md.
bench: install
	$(PYTHON) experiments/bench_attention.py
