"""(slow) A changed sampling setting on a finished study resamples and rescores exactly the sets it
touches (issue 22; the shared study: tests/_study_changes.py)."""

from __future__ import annotations

import json

import pytest
from _study_changes import AFTER_SAMPLING, SETS, read, rerun_with


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
