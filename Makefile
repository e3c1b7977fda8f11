# Everything runs from ./.venv, created on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test lint demo bench bench-memory clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: pip takes the CPU build from this machine's disk instead of a CUDA download
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(VENV)/bin/ruff check .

test: install lint
	$(PY) -m pytest -q

demo: install
	$(PY) scripts/demo.py

# Not in CI: about 40 minutes on 2 CPU cores. Each command writes its report to docs/.
bench: install
	$(PY) benchmarks/bench_optimizers.py --repeat 3 --out docs/benchmarks.md
	$(PY) benchmarks/bench_optimizers.py --repeat 3 --loss-chunk 256 \
	    --methods forward_graph,sgd,ref_lomo,ref_lomo_clip,lomo,lomo_clip --out docs/benchmarks-chunked-loss.md
	$(PY) benchmarks/bench_hook_overhead.py --layers 8 32 96 > docs/benchmarks-hook-overhead.md
	$(PY) benchmarks/bench_zero3.py --out docs/benchmarks-zero3.md

# Not in CI: the memory model against 20 measured configurations (about 2 minutes on 2 CPU cores).
bench-memory: install
	$(PY) benchmarks/bench_memory.py --out docs/benchmarks-memory.md

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
