"""(slow) The README's promise, run for real: on a finished study, changing a setting reruns exactly
the jobs it affects, the run completes, and their outputs change (issue 22). One session-scoped
finished study (a smaller grid than tests/configs/tiny.yaml: its own file, so pytest-xdist builds
it beside the other studies), copied per change.

Before resumable state was keyed by content, a changed training setting left the retrained model's
sample sets byte-identical to the old model's (same path, same step), and a changed sampler stopped
every sampling job with exit 2."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from test_workflow import TINY, load, make_workdir, modified, snakemake


def smaller(cfg):
    # Four sets (full, shallow, one threshold, one t_switch) and the real-data row; no CMMD (CLIP), no
    # composed or caching sets, no search.
    cfg["early_exit"]["thresholds"] = [0.1]
    cfg["sampling"]["fewer_steps"] = []
    cfg["metrics"]["cmmd"] = {"enabled": False}
    cfg["search"]["enabled"] = False  # the search and the composed sets have their own tests (test_tiny_study.py)
    cfg["composed"] = []
    cfg["cache"]["interval"] = []  # no caching sets either


BASE = modified(load(TINY), smaller)
STUDY = Path("results") / "tiny"


@pytest.fixture(scope="session")
def finished_study(tmp_path_factory):
    workdir = make_workdir(tmp_path_factory.mktemp("changes") / "base")
    (workdir / "base.yaml").write_text(yaml.safe_dump(BASE))
    result = snakemake(workdir, "--configfile", "base.yaml", "--cores", "2", timeout=1800)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    return workdir


def ran_jobs(output: str) -> dict:
    """{rule: jobs that finished} from a real run's log ("Finished jobid: N (Rule: name)")."""
    counts = {}
    for rule in re.findall(r"Finished jobid: \d+ \(Rule: (\w+)\)", output):
        counts[rule] = counts.get(rule, 0) + 1
    return counts


def rerun_with(finished_study: Path, tmp_path: Path, edit) -> tuple[Path, dict]:
    """A copy of the finished study, rerun with `edit` applied to its config -> (its folder, the
    jobs that ran)."""
    workdir = tmp_path / "study"
    shutil.copytree(finished_study, workdir, symlinks=True)
    (workdir / "changed.yaml").write_text(yaml.safe_dump(modified(BASE, edit)))
    result = snakemake(workdir, "--configfile", "changed.yaml", "--cores", "2", timeout=1800)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    return workdir, ran_jobs(result.stdout + result.stderr)


def read(workdir: Path, path: str) -> bytes:
    return (workdir / STUDY / path).read_bytes()


SETS = ["full", "shallow_d1", "ee_attention_probe_thr0.1", "duodiff_d1_ts3"]
AFTER_SAMPLING = {"flops": 1, "timing": 1, "tables": 1, "plots": 1, "all": 1}


@pytest.mark.slow
def test_a_training_setting_retrains_its_model_and_resamples_everything_built_on_it(finished_study, tmp_path):
    def edit(c):
        c["train"]["full"]["lr"] = 0.002

    workdir, ran = rerun_with(finished_study, tmp_path, edit)
    # The full model, the early-exit model on it, and every set that uses either (not the shallow
    # set); every generated set is rescored, the shallow one too: its paired difference is to the
    # full model's samples (score --baseline).
    assert ran == {"train_full": 1, "train_early_exit": 1, "sample_full": 1, "sample_early_exit": 1,
                   "sample_duodiff": 1, "score": 4, **AFTER_SAMPLING}  # fmt: skip
    for path in ("models/full/model.pt", "models/ee_attention_probe/model.pt", "samples/full/images/000000.png",
                 "samples/ee_attention_probe_thr0.1/images/000007.png", "samples/duodiff_d1_ts3/images/000000.png",
                 "metrics/full/fd_classifier.json"):  # fmt: skip
        assert read(workdir, path) != read(finished_study, path), path
    assert read(workdir, "samples/shallow_d1/images/000000.png") == read(finished_study, "samples/shallow_d1/images/000000.png")


@pytest.mark.slow
def test_the_sampler_resamples_and_rescores_every_set(finished_study, tmp_path):
    def edit(c):
        c["sampling"]["sampler"] = "dpm_solver"

    workdir, ran = rerun_with(finished_study, tmp_path, edit)
    assert ran == {"sample_full": 1, "sample_shallow": 1, "sample_early_exit": 1, "sample_duodiff": 1, "score": 4,
                   **AFTER_SAMPLING}  # fmt: skip
    for name in SETS:
        assert json.loads(read(workdir, f"samples/{name}/stats.json"))["sampler"] == "dpm_solver"
        assert read(workdir, f"samples/{name}/images/000000.png") != read(finished_study, f"samples/{name}/images/000000.png")


@pytest.mark.slow
def test_a_threshold_samples_only_its_new_set(finished_study, tmp_path):
    def edit(c):
        c["early_exit"]["thresholds"] = [0.3]

    workdir, ran = rerun_with(finished_study, tmp_path, edit)
    assert ran == {"sample_early_exit": 1, "score": 1, **AFTER_SAMPLING}
    assert json.loads(read(workdir, "samples/ee_attention_probe_thr0.3/stats.json"))["threshold"] == 0.3
    assert "ee_attention_probe_thr0.3" in read(workdir, "tables/scores.csv").decode()


@pytest.mark.slow
def test_a_metric_setting_and_the_reference_size_rescore_only(finished_study, tmp_path):
    # Two families in one rerun (each rescores every set; one run keeps the suite short): a
    # metrics.fid key, and the reference's size, which also moves the real-data row after it.
    def edit(c):
        c["metrics"]["fid"]["kid_subsets"] = 50
        c["reference"]["n_reference"] = 20

    workdir, ran = rerun_with(finished_study, tmp_path, edit)
    assert ran == {"reference": 1, "real_set": 1, "score": 5, "tables": 1, "plots": 1, "all": 1}
    assert json.loads(read(workdir, "reference/reference.json"))["n"] == 20
    for name in [*SETS, "real"]:
        fid = json.loads(read(workdir, f"metrics/{name}/fid.json"))
        assert fid["n_reference"] == 20 and fid["kid_subsets"] == 50, name
