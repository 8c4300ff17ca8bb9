"""(slow) A changed metric setting on a finished study rescores and nothing else (issue 22; the
shared study: tests/_study_changes.py)."""

from __future__ import annotations

import json

import pytest
from _study_changes import SETS, read, rerun_with


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
