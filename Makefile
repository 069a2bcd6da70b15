# segflow: the two-command start is `make demo` and `make test`.
#
# The virtualenv lives outside the clone (default ~/.cache/segflow/venv) so fresh clones reuse
# the ~5 GB torch install; it is (re)synced whenever pyproject.toml changes. Commands run with
# this clone's src/ first on PYTHONPATH, so a shared venv never runs another clone's code.

SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= $(HOME)/.cache/segflow/venv
DEPS_HASH := $(shell sha256sum pyproject.toml | cut -c1-16)
STAMP := $(VENV)/.segflow-deps-$(DEPS_HASH)
CONFIG ?= config/config.yaml
# This machine's GPUs: the demo targets give each GPU job its own (config `gpus`) and run at
# most this many at once (--resources gpu). 0 without nvidia-smi.
GPUS ?= $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
GPU_FLAGS = --config gpus=$(or $(GPUS),0) --resources gpu=$(or $(GPUS),0)
RESULTS ?= results

export PATH := $(VENV)/bin:$(PATH)
export PYTHONPATH := $(CURDIR)/src

.PHONY: env demo demo-full test lint format bench clean

env: $(STAMP)
	@# The shared venv's `segflow` command should point at this clone (for plain `snakemake`).
	@python -c "import importlib.metadata as m, json, sys, sysconfig; \
	  site = [sysconfig.get_paths()['purelib']]; \
	  dist = next(m.distributions(name='segflow', path=site)); \
	  sys.exit(json.loads(dist.read_text('direct_url.json'))['url'] != 'file://$(CURDIR)')" 2>/dev/null || \
	  flock $(VENV).lock python -m pip install --quiet --no-deps --no-build-isolation -e .

$(STAMP): pyproject.toml
	@mkdir -p $(dir $(VENV))
	@# flock: two clones syncing the shared venv at once would corrupt it.
	flock $(VENV).lock bash -euo pipefail -c '\
	  $(PYTHON) -c "import sys; sys.exit(sys.version_info < (3, 11))" || \
	    { echo "segflow needs Python >= 3.11 (found $$($(PYTHON) --version)); set PYTHON=" >&2; exit 1; }; \
	  test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV); \
	  $(VENV)/bin/python -m pip install --quiet --upgrade pip; \
	  $(VENV)/bin/python -m pip install --quiet -e ".[dev]"; \
	  touch $(STAMP)'

demo: env
	snakemake --profile profiles/default --configfile $(CONFIG) $(GPU_FLAGS)
	@echo
	@python -m segflow summary $(RESULTS)
	@echo "HTML report: $(RESULTS)/report/report.html"

# Every stage on the demo data: two experiments, one pseudo-labelling round, stacking.
demo-full: env
	snakemake --profile profiles/default --configfile config/examples/demo-full.yaml $(GPU_FLAGS)
	@echo
	@python -m segflow summary results/demo-full
	@echo "HTML report: results/demo-full/report/report.html"

# Two workers, one thread each (tests/conftest.py); a test module's tests share one worker, so
# its module-scoped workflow runs are made once.
test: env
	python -m pytest -n 2 --dist loadscope --durations=25

lint: env
	ruff check src tests benchmarks
	ruff format --check src tests benchmarks
	snakefmt --check Snakefile workflow
	snakemake --lint --configfile $(CONFIG)

format: env
	ruff check --fix src tests benchmarks
	ruff format src tests benchmarks
	snakefmt Snakefile workflow

bench: env
	python benchmarks/bench_data.py

clean:
	rm -rf $(RESULTS) results/demo-full resources/demo .snakemake
