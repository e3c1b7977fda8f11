# Everything runs from ./.venv, created on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test lint demo bench clean

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

bench: install
	$(PY) benchmarks/bench_optimizers.py --out docs/benchmarks.md

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
