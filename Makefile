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
CONFIG ?= config/config.yaml

# Rules call `duodiff` and `snakemake` from the project's environment.
export PATH := $(BIN):$(PATH)

.PHONY: run test report dry-run clean-results install

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]" -c constraints.txt
	@touch $@

run: $(STAMP)
	$(BIN)/snakemake --profile profiles/default --configfile $(CONFIG) --cores $(CORES)
	$(BIN)/snakemake --profile profiles/default --configfile $(CONFIG) --report results/report.html

report: $(STAMP)
	$(BIN)/snakemake --profile profiles/default --configfile $(CONFIG) --report results/report.html

dry-run: $(STAMP)
	$(BIN)/snakemake --profile profiles/default --configfile $(CONFIG) --dry-run

test: $(STAMP)
	$(BIN)/python -m pytest

clean-results:
	rm -rf results/*/ results/report.html .snakemake
