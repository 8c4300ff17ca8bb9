# Two commands on a fresh machine:
#   make run    the whole study on the embedded default (config/config.yaml: sklearn digits, CPU)
#   make test   the test suite
# Both create .venv when missing and install the project into it with every direct dependency
# pinned by constraints.txt.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(abspath $(VENV))/bin
STAMP  := $(VENV)/.installed
CORES  ?= all
TEST_WORKERS ?= auto
CONFIG ?= config/config.yaml
# The config's `experiment:` (no Python needed): each study, its report included, lies under
# results/<experiment>/, so `make run CONFIG=config/cifar10.yaml` keeps the digits study's files.
EXPERIMENT ?= $(shell sed -n 's/^experiment:[^A-Za-z0-9]*\([A-Za-z0-9_-]*\).*/\1/p' $(CONFIG) | head -n 1)
REPORT := results/$(EXPERIMENT)/report.html

# Rules call `duodiff` and `snakemake` from the project's environment.
export PATH := $(BIN):$(PATH)

.PHONY: run test report dry-run clean-results install check-experiment

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]" -c constraints.txt
	@touch $@

run: check-experiment $(STAMP)
	$(BIN)/snakemake --profile profiles/default --configfile $(CONFIG) --cores $(CORES)
	$(BIN)/snakemake --profile profiles/default --configfile $(CONFIG) --report $(REPORT)

report: check-experiment $(STAMP)
	$(BIN)/snakemake --profile profiles/default --configfile $(CONFIG) --report $(REPORT)

check-experiment:
	@test -n "$(EXPERIMENT)" || { echo "no 'experiment:' line in $(CONFIG) (or pass EXPERIMENT=name)" >&2; exit 1; }

dry-run: $(STAMP)
	$(BIN)/snakemake --profile profiles/default --configfile $(CONFIG) --dry-run

# The suite on every core (pytest-xdist), one test file per worker at a time (--dist loadfile), so each
# file's session-scoped set-up (a whole tiny study, ...) is built once. The studies have files of
# their own (tests/test_tiny_study.py, test_latent_study.py, test_workflow_configs.py) to run side by side.
test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

# Every experiment's folder (results/report.html: where the report went before one study per folder).
clean-results:
	rm -rf results/*/ results/report.html .snakemake
