# Two commands on a fresh machine: `make demo` and `make test`.
# Every step prints a line (==> ...) and pip shows its own progress.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch is pinned: pip takes the local CPU wheel; an unpinned torch pulls a CUDA build.
TORCH  := torch==2.13.0
# Every extra the tests use: under CI=true a test skipped for a missing one fails.
EXTRAS ?= dev,serve,minilm,metrics,viz,ray,hf
PIP_INSTALL := $(PIP) install --disable-pip-version-check --progress-bar on

.PHONY: venv install base system demo test lint typecheck pytest bench clean

$(PY):
	@echo "==> creating $(VENV) with $(PYTHON)"
	$(PYTHON) -m venv $(VENV)

# The demo needs only the core: dataflow-engine and torch.
$(VENV)/.base: pyproject.toml | $(PY)
	@echo "==> installing dataflow-engine and $(TORCH) into $(VENV)"
	$(PIP_INSTALL) "$(TORCH)" -e .
	@touch $@

# The tests need every extra.
$(VENV)/.installed: pyproject.toml Makefile $(VENV)/.base
	@echo "==> installing the extras the tests use: $(EXTRAS)"
	$(PIP_INSTALL) "$(TORCH)" -e ".[$(EXTRAS)]"
	@touch $@

venv: $(PY)
base: $(VENV)/.base
install: $(VENV)/.installed

# Debian packages the tests need (Graphviz, a headless browser): see .ci/apt-packages.txt
system:
	@bash .ci/install-system

demo: base
	@echo "==> streaming from graphs/tiny_lm.py"
	@$(VENV)/bin/dataflow run graphs/tiny_lm.py --prompt "def main(" --max-tokens 200 --seed 1

lint: install
	@echo "==> ruff"
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install
	@echo "==> mypy --strict"
	$(VENV)/bin/mypy

pytest: install system
	@echo "==> pytest"
	$(PY) -m pytest -q

test: lint typecheck pytest

bench: install
	$(PY) benchmarks/hop_cost.py
	$(PY) benchmarks/latency.py
	$(PY) benchmarks/thread_overlap.py

clean:
	rm -rf $(VENV) build *.egg-info
