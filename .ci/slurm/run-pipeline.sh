#!/usr/bin/env bash
# Run the tiny test study through `snakemake --profile profiles/slurm` on the CI cluster
# (start-cluster.sh must have started it), run the same study locally, and check with
# tests/test_slurm.py that the two agree: same sample sets, and equal FID, KID, CMMD,
# GFLOPs and layer ratios (the timing columns differ by nature).
#
# Each run works in its own scratch copy of the checkout (tracked and untracked,
# non-ignored files), so neither touches the checkout's results/ or .snakemake/.
#
# Settings (environment): SLURM_CI_WORK (scratch folder; default: a new /tmp folder, kept
# afterwards for inspection), SLURM_CI_CONFIG (default tests/configs/tiny.yaml).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
source "$root/.ci/slurm/common.sh"

config=${SLURM_CI_CONFIG:-tests/configs/tiny.yaml}
work=${SLURM_CI_WORK:-$(mktemp -d /tmp/duodiff-slurm-ci.XXXXXX)}
cores=$(nproc)

# Rules call `duodiff` and `snakemake` from the project's environment; Slurm jobs inherit
# this PATH and PYTHONPATH (the plugin submits with --export=ALL).
export PATH="$root/.venv/bin:$PATH"
# The venv's editable install imports duodiff from the checkout, which may change while the
# stage runs (not in CI, but on a shared working tree); each run imports its own copy instead
# (PYTHONPATH comes first), so both runs use the code as it was when the stage started.
with_copy_src() { PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" "$@"; }

copy_checkout() {
    local dest=$1
    rm -rf "$dest"
    mkdir -p "$dest"
    git -C "$root" ls-files -z --cached --others --exclude-standard |
        tar -C "$root" --null --files-from=- --ignore-failed-read -cf - |
        tar -C "$dest" -xf -
}

stage_start=$SECONDS
stage() {
    slurm_ci_log "$1 took $((SECONDS - stage_start)) s"
    stage_start=$SECONDS
}

slurm_ci_log "scratch folder: $work"
copy_checkout "$work/slurm"
copy_checkout "$work/local"

# Through Slurm, with profiles/slurm edited for this cluster the way its header asks users to
# ("edit the partition, account and GPU lines"), as profiles/slurm-ci in the scratch copy:
# - the partition is this cluster's; the account stays (without accounting Slurm takes any);
# - at most one GPU per job (the CI node has two, for two jobs side by side);
# - no conda: CI has no network; the jobs use the project's .venv, which is on PATH;
# - accounting is off, so job states come from squeue (MinJobAge keeps finished jobs
#   listed); the plugin would otherwise pick sacct because the binary is installed;
# - status checks after 2 s instead of the profile's 60 s: these jobs take seconds;
# - no retries: a failing job should fail the stage at once, not after three attempts.
python - "$work/slurm/profiles/slurm/config.yaml" "$work/slurm/profiles/slurm-ci/config.yaml" \
    "$SLURM_CI_PARTITION" <<'PY'
import sys
from pathlib import Path

import yaml

source, target, partition = sys.argv[1:]
profile = yaml.safe_load(Path(source).read_text())
resources = profile.get("default-resources") or {}
if isinstance(resources, list):  # the other spelling: ["name=value", ...]
    resources = dict(item.split("=", 1) for item in resources)
resources["slurm_partition"] = partition
profile["default-resources"] = resources
for rule_resources in (profile.get("set-resources") or {}).values():
    if int(rule_resources.get("gpu", 0)) > 1:
        rule_resources["gpu"] = 1
profile.pop("software-deployment-method", None)
profile["slurm-status-command"] = "squeue"
profile["slurm-init-seconds-before-status-checks"] = 2
profile["seconds-between-status-checks"] = 2
profile["retries"] = 0
Path(target).parent.mkdir(parents=True, exist_ok=True)
Path(target).write_text(yaml.safe_dump(profile, sort_keys=False))
PY
slurm_ci_log "running $config through profiles/slurm (as profiles/slurm-ci for this cluster)"
(
    cd "$work/slurm"
    with_copy_src snakemake --profile profiles/slurm-ci --configfile "$config" --max-threads "$cores"
) || {
    slurm_ci_log "the Slurm run failed; Slurm job logs and daemon logs follow"
    find "$work"/slurm/results/*/logs "$work/slurm/.snakemake/slurm_logs" -name '*.log' \
        -newer "$work/slurm/profiles/slurm-ci/config.yaml" -print -exec tail -n 30 {} \; >&2 || true
    dump_logs
    exit 1
}
# What Slurm saw of every job of this run (finished jobs stay listed for MinJobAge seconds;
# the plugin names every job after the run's id): the test checks that each planned job ran
# as a completed Slurm job and that exactly the GPU rules got a GPU.
run_id=$(sed -n 's/^SLURM run ID: //p' "$work"/slurm/.snakemake/log/*.snakemake.log | head -n 1)
if [[ -z $run_id ]]; then
    slurm_ci_log "no 'SLURM run ID' line in the Snakemake log of the Slurm run"
    exit 1
fi
squeue --states=all --noheader --name="$run_id" \
    --Format='JobID:|,Name:|,State:|,Comment:|,tres-per-job:|,tres-per-node:|,NumCPUs:|,MinMemory:|' \
    >"$work/slurm_jobs.psv"
stage "Slurm run"

slurm_ci_log "running $config locally (profiles/default)"
(
    cd "$work/local"
    with_copy_src snakemake --profile profiles/default --configfile "$config" --cores "$cores"
)
stage "local run"

slurm_ci_log "comparing the two runs (tests/test_slurm.py)"
cd "$root"
DUODIFF_SLURM=1 DUODIFF_SLURM_RUN_DIR="$work" python -m pytest -p no:cacheprovider -q tests/test_slurm.py
stage "comparison"
