"""The one-node CI Slurm cluster, and the study run through `profiles/slurm` on it.

These run in CI's Slurm stage (.ci/run -> .ci/slurm/start-cluster.sh, run-pipeline.sh) and are
skipped everywhere else:

- DUODIFF_SLURM=1: a cluster started by .ci/slurm/start-cluster.sh is up. The cluster tests check
  what the Snakemake executor plugin relies on: a GPU request is scheduled and handed devices,
  a request for more GPUs than exist is refused, and a finished job stays visible to squeue
  (accounting is off, so squeue is the plugin's only source of job states).
- DUODIFF_SLURM_RUN_DIR=DIR as well: run-pipeline.sh ran the tiny study twice, through Slurm in
  DIR/slurm and locally in DIR/local, and saved Slurm's job list in DIR/slurm_jobs.psv. The
  pipeline tests check that every job Snakemake planned ran as a completed Slurm job, that
  exactly the rules the profile gives a GPU (training among them) were given one, and that both
  runs produced the same tables: same sample sets, equal values in every column but the timing
  ones.
"""

import csv
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.skipif(
    os.environ.get("DUODIFF_SLURM") != "1",
    reason="needs the CI Slurm cluster (.ci/slurm/start-cluster.sh) and DUODIFF_SLURM=1",
)

RUN_DIR = os.environ.get("DUODIFF_SLURM_RUN_DIR")
needs_run = pytest.mark.skipif(
    not RUN_DIR, reason="needs DUODIFF_SLURM_RUN_DIR from .ci/slurm/run-pipeline.sh"
)

TABLES = ["scores.csv", "fid.csv", "kid.csv", "cmmd.csv", "gflops.csv"]
# Wall-clock measurements: they differ between any two runs.
TIMING_COLUMNS = {"images_per_s", "speedup_measured", "speedup_measured_ci_low", "speedup_measured_ci_high"}
# Columns of the squeue dump written by run-pipeline.sh, in its order.
JOB_FIELDS = ["job_id", "name", "state", "comment", "tres_per_job", "tres_per_node", "cpus",
              "min_memory"]


def run(*args, check=True):
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=check)


def sbatch_wait(tmp_path, *options, command):
    """Submit `command` as a batch job, wait for it to end, return (job id, its output)."""
    out = tmp_path / "job.out"
    job = run("sbatch", "--parsable", "--wait", "--time=2", f"--output={out}", *options,
              f"--wrap={command}")
    return job.stdout.strip().split(";")[0], out.read_text()


# --- the cluster -------------------------------------------------------------------------------

def test_gpu_request_is_scheduled_and_given_the_device(tmp_path):
    job_id, output = sbatch_wait(tmp_path, "--gres=gpu:2", command="printenv CUDA_VISIBLE_DEVICES")
    # The node's two GPUs, devices 0 and 1.
    assert output.strip() == "0,1", f"job {job_id} saw CUDA_VISIBLE_DEVICES={output.strip()!r}"


def test_more_gpus_than_the_node_has_are_refused():
    job = run("sbatch", "--parsable", "--time=1", "--gres=gpu:3", "--wrap=true", check=False)
    assert job.returncode != 0
    assert "Requested node configuration is not available" in job.stderr


def test_finished_job_stays_visible_to_squeue(tmp_path):
    job_id, _ = sbatch_wait(tmp_path, command="true")
    # The plugin's status query (--slurm-status-command squeue), with a job id filter added.
    listed = run("squeue", "--format=%i|%T", "--states=all", "--noheader", f"--jobs={job_id}")
    assert listed.stdout.split() == [f"{job_id}|COMPLETED"]


# --- the study through profiles/slurm ----------------------------------------------------------

def read_table(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows, f"{path} has no rows"
    return {row["set"]: row for row in rows}


def slurm_jobs():
    """The run's Slurm jobs as Slurm recorded them, each with the rule it ran."""
    with open(Path(RUN_DIR) / "slurm_jobs.psv") as f:
        jobs = [dict(zip(JOB_FIELDS, line.rstrip("\n").split("|"))) for line in f if line.strip()]
    # The plugin sets each job's comment to rule_<rule>[_wildcards_<values>].
    for job in jobs:
        job["rule"] = job["comment"].removeprefix("rule_").split("_wildcards_")[0]
    return jobs


def local_rules() -> set:
    """The rules Snakemake runs itself, not through Slurm: `all` and every rule or checkpoint of
    workflow/rules/ that says `localrule: True`."""
    rules, current = {"all"}, None
    for path in (Path(__file__).resolve().parents[1] / "workflow" / "rules").glob("*.smk"):
        for line in path.read_text().splitlines():
            match = re.match(r"(?:rule|checkpoint) (\w+):", line)
            current = match[1] if match else current
            if line.strip() == "localrule: True":
                rules.add(current)
    return rules


LOCAL_RULES = local_rules()


def snakemake_log() -> Path:
    logs = sorted((Path(RUN_DIR) / "slurm" / ".snakemake" / "log").glob("*.snakemake.log"))
    assert len(logs) == 1, f"expected one Snakemake run in the Slurm copy, found {logs}"
    return logs[0]


def finished_jobs() -> dict:
    """Jobs per rule that Snakemake reported finished ("Finished jobid: N (Rule: name)"): the
    first plan and every job the search's checkpoints added after it."""
    counts = {}
    for rule in re.findall(r"Finished jobid: \d+ \(Rule: (\w+)\)", snakemake_log().read_text()):
        counts[rule] = counts.get(rule, 0) + 1
    return counts


def planned_jobs():
    """Jobs per rule from the "Job stats" table Snakemake printed when it planned the Slurm run."""
    logs = [snakemake_log()]
    lines = logs[0].read_text().splitlines()
    start = lines.index("Job stats:") + 3  # title, header, dashes
    counts = {}
    for line in lines[start:]:
        rule, count = line.split()
        if rule == "total":
            return counts
        counts[rule] = int(count)
    raise AssertionError(f"no end to the Job stats table in {logs[0]}")


@needs_run
def test_every_planned_job_ran_as_a_completed_slurm_job():
    jobs = slurm_jobs()
    assert jobs, "no Slurm job of the run is listed"
    assert [j for j in jobs if j["state"] != "COMPLETED"] == []
    ran = {}
    for job in jobs:
        ran[job["rule"]] = ran.get(job["rule"], 0) + 1
    planned = planned_jobs()
    # `all` only collects files; Snakemake runs it itself.
    assert planned.pop("all") == 1
    # The first plan knows round 0 of each search; the checkpoints add each probe's jobs after it.
    assert all(ran.get(rule, 0) >= count for rule, count in planned.items() if rule not in LOCAL_RULES), (ran, planned)
    # Every job Snakemake ran went through Slurm and completed, but the local ones (the search's
    # rounds and results, the table copy, all: localrule in the workflow).
    finished = {rule: count for rule, count in finished_jobs().items() if rule not in LOCAL_RULES}
    assert ran == finished


@needs_run
def test_exactly_the_rules_the_profile_gives_a_gpu_got_one():
    profile = yaml.safe_load((Path(RUN_DIR) / "slurm" / "profiles" / "slurm-ci" / "config.yaml").read_text())
    gpu_rules = {rule for rule, res in (profile.get("set-resources") or {}).items()
                 if int(res.get("gpu", 0)) > 0}
    assert {"train_full", "train_shallow", "train_early_exit"} <= gpu_rules
    for job in slurm_jobs():
        got_gpu = "gres:gpu" in job["tres_per_job"] + job["tres_per_node"]
        assert got_gpu == (job["rule"] in gpu_rules), job


def tables_dir(run: str) -> Path:
    """results/<experiment>/tables of one run's copy: each copy ran one study (one experiment)."""
    (tables,) = sorted((Path(RUN_DIR) / run / "results").glob("*/tables"))
    return tables


@needs_run
@pytest.mark.parametrize("table", TABLES)
def test_slurm_and_local_runs_give_the_same_table(table):
    slurm = read_table(tables_dir("slurm") / table)
    local = read_table(tables_dir("local") / table)
    assert sorted(slurm) == sorted(local), "the two runs made different sample sets"
    columns = next(iter(local.values())).keys()
    assert next(iter(slurm.values())).keys() == columns
    compared = [c for c in columns if c not in TIMING_COLUMNS]
    # The csv files hold full precision, so equal numbers are equal strings.
    differences = [(name, c, slurm[name][c], local[name][c])
                   for name in local for c in compared if slurm[name][c] != local[name][c]]
    assert not differences, f"{table}: (set, column, slurm, local): {differences}"
