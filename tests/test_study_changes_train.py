"""(slow) A changed training setting on a finished study retrains its model and resamples what is
built on it, and nothing else (issue 22; the shared study: tests/_study_changes.py)."""

from __future__ import annotations

import pytest
from _study_changes import AFTER_SAMPLING, read, rerun_with


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
