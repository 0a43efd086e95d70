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

$(VENV)/.installed-dev: $(VENV)/.installed-core
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[dev]"
	touch $@

install: $(VENV)/.installed-core
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed-core
	$(PY) train.py experiment=demo

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(VENV)/.installed-dev
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: $(VENV)/.installed-dev
	$(PY) benchmarks/train_throughput.py

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check tokenmill tests scripts benchmarks train.py

clean:
	rm -rf outputs multirun .pytest_cache
