#!/usr/bin/env bash
# Snakemake runs this inside the environment it has just created from duodiff.yaml: install the
# duodiff package from this repository (editable, so jobs run the checked-out code). The
# repository is found from this script's own location, not the working directory.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python -m pip install --no-deps -e "$repo"
