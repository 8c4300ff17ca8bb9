"""What tests/test_study_changes_*.py share: one finished tiny study and a rerun of a copy of it.

The README's promise, run for real: on a finished study, changing a setting reruns exactly the jobs
it affects, the run completes, and their outputs change (issue 22). Each test changes one key
family on a copy of the same finished study (a smaller grid than tests/configs/tiny.yaml) and
reruns it. The tests are split over several files so that pytest-xdist (`make test`: --dist
loadfile) runs them on several workers at once; the finished study is built once per session,
by the first worker that asks for it, and the others wait for it (`finished_study`), instead of
each building its own.

Before resumable state was keyed by content, a changed training setting left the retrained model's
sample sets byte-identical to the old model's (same path, same step), and a changed sampler stopped
every sampling job with exit 2.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import yaml
from test_workflow import TINY, load, make_workdir, modified, snakemake


def smaller(cfg):
    # Four sets (full, shallow, one threshold, one t_switch) and the real-data row; no CMMD (CLIP), no
    # composed, caching or Learning-to-Cache sets, no search.
    cfg["early_exit"]["thresholds"] = [0.1]
    cfg["sampling"]["fewer_steps"] = []
    cfg["metrics"]["cmmd"] = {"enabled": False}
    cfg["search"]["enabled"] = False  # the search and the composed sets have their own tests (test_tiny_study.py)
    cfg["composed"] = []
    cfg["cache"]["interval"] = []  # no caching sets either
    cfg["learning_to_cache"]["thresholds"] = []  # nor a router and its sets


BASE = modified(load(TINY), smaller)
STUDY = Path("results") / "tiny"
SETS = ["full", "shallow_d1", "ee_attention_probe_thr0.1", "duodiff_d1_ts3"]
AFTER_SAMPLING = {"flops": 1, "timing": 1, "tables": 1, "plots": 1, "all": 1}
BUILD_TIMEOUT_S = 1800


def session_folder(tmp_path_factory) -> Path:
    """A folder shared by this session's xdist workers (and by no other session): the parent of the
    worker's own base temp under xdist, the base temp itself without it."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def finished_study(tmp_path_factory) -> Path:
    """The finished study's folder: built by the first worker to get here (mkdir is the lock),
    waited for by the others. A failed build is reported to every worker that waits for it."""
    shared = session_folder(tmp_path_factory) / "study-changes"
    workdir, done, failed = shared / "base", shared / "done", shared / "failed"
    try:
        shared.mkdir()
    except FileExistsError:
        deadline = time.monotonic() + BUILD_TIMEOUT_S
        while not (done.exists() or failed.exists()):
            assert time.monotonic() < deadline, f"no finished study in {shared} after {BUILD_TIMEOUT_S} s"
            time.sleep(1)
        assert not failed.exists(), f"the finished study's build failed (in another worker):\n{failed.read_text()}"
        return workdir
    try:
        make_workdir(workdir)
        (workdir / "base.yaml").write_text(yaml.safe_dump(BASE))
        result = snakemake(workdir, "--configfile", "base.yaml", "--cores", "2", timeout=BUILD_TIMEOUT_S)
        assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    except BaseException as error:
        failed.write_text(f"{type(error).__name__}: {error}")
        raise
    done.write_text("")
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
