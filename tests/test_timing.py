"""`duodiff time`: the interleaved rounds on a fake clock, the median speed-up and its interval
against hand computations, and the command end to end with tiny random-weight sets on the CPU.

No assertion here depends on how fast anything runs (the machine is shared and noisy): the end-to-end
tests that need exact speed-ups time with a clock that counts network evaluations. Speed targets
belong in benchmarks/ (benchmarks/README.md, "Timing the sets alone").
"""

import csv
import json
import math
import random

import pytest
import torch
from _defaults import cli_args
from test_sampling import CONFIG, save  # the tiny models of the sampling tests

from duodiff import cli
from duodiff.core.errors import DuodiffError
from duodiff.models.uvit import UViT
from duodiff.sample.sample_set import run_sample
from duodiff.timing import time_sets
from duodiff.timing.intervals import interval_ranks, median_interval
from duodiff.timing.time_sets import measure, run_time, summarize

# ---- the rounds, on a fake clock ------------------------------------------------------------------


def fake_sets(costs: dict):
    """Runners that log their name and advance a fake clock by their cost; the clock logs its reads."""
    events, now = [], [0.0]

    def clock():
        events.append("clock")
        return now[0]

    def runner(name, cost):
        def run():
            events.append(name)
            now[0] += cost

        return run

    return {name: runner(name, cost) for name, cost in costs.items()}, clock, events


def test_rounds_are_interleaved_after_an_untimed_warm_up():
    runners, clock, events = fake_sets({"A": 1.0, "B": 2.0, "C": 4.0})
    seconds = measure(runners, rounds=3, clock=clock)
    warm_up = ["A", "B", "C"]  # every set once, and no clock read around it
    timed_round = ["clock", "A", "clock", "clock", "B", "clock", "clock", "C", "clock"]
    assert events == warm_up + timed_round * 3
    assert seconds == {"A": [1.0] * 3, "B": [2.0] * 3, "C": [4.0] * 3}


def test_half_the_baseline_time_measures_exactly_two():
    runners, clock, _ = fake_sets({"full": 1.0, "full_steps20": 0.5, "same": 1.0})
    result = summarize(measure(runners, rounds=7, clock=clock), "full", batch_size=64)
    assert (result["full_steps20"]["speedup"], result["full_steps20"]["speedup_ci_low"],
            result["full_steps20"]["speedup_ci_high"]) == (2.0, 2.0, 2.0)  # fmt: skip
    assert result["full"]["speedup"] == result["same"]["speedup"] == 1.0
    assert result["full_steps20"]["images_per_s"] == 128.0 and result["full"]["images_per_s"] == 64.0
    assert result["full_steps20"]["seconds"] == [0.5] * 7


def test_speedup_median_and_interval_as_computed_by_hand():
    # The baseline's times are the speed-ups themselves when the set takes 1 s a round.
    speedups = [2.0, 1.6, 2.4, 1.8, 2.2, 1.9, 3.0, 1.0, 2.1]
    result = summarize({"full": speedups, "x": [1.0] * 9}, "full", batch_size=10)["x"]
    # Sorted: 1.0 1.6 1.8 1.9 2.0 2.1 2.2 2.4 3.0; the median is the 5th. With n = 9,
    # [x(2), x(8)] covers the median with 1 - 2 (C(9,0) + C(9,1)) / 2^9 = 1 - 20/512 = 0.961 >= 0.95,
    # while [x(3), x(7)] covers only 1 - 2 (1 + 9 + 36) / 512 = 0.820.
    assert (result["speedup"], result["speedup_ci_low"], result["speedup_ci_high"]) == (2.0, 1.6, 2.4)
    assert result["speedups"] == speedups and result["images_per_s"] == 10.0
    assert interval_ranks(9) == (2, 8, 1 - 20 / 512)
    # Even n = 6: the median is the mean of the 3rd and 4th; only [min, max] reaches 95%
    # (1 - 2/64 = 0.969; [x(2), x(5)]: 1 - 2 * 7/64 = 0.781).
    six = median_interval([1.2, 1.0, 1.5, 1.1, 1.4, 1.3])
    assert six["median"] == pytest.approx(1.25) and (six["low"], six["high"]) == (1.0, 1.5)
    assert six["coverage"] == 1 - 2 / 64 and six["ranks"] == [1, 6]
    # n = 10: [x(2), x(9)], 1 - 2 * 11/1024; n = 5: nothing reaches 95%, [min, max] covers 1 - 2/32.
    assert interval_ranks(10) == (2, 9, 1 - 22 / 1024)
    assert interval_ranks(5) == (1, 5, 1 - 2 / 32)


@pytest.mark.parametrize("n", [6, 9, 10, 20])
def test_interval_covers_the_median_as_often_as_it_says(n):
    # Skewed draws (exponential, median ln 2): the coverage is distribution-free.
    rng = random.Random(n)
    trials = 20000
    covered = 0
    for _ in range(trials):
        interval = median_interval([rng.expovariate(1.0) for _ in range(n)])
        covered += interval["low"] <= math.log(2) <= interval["high"]
    coverage = interval_ranks(n)[2]
    assert coverage >= 0.95
    assert abs(covered / trials - coverage) < 0.01  # 5 standard errors at ~0.0014


# ---- the command end to end, tiny sets on the CPU ---------------------------------------------------


@pytest.fixture(scope="session")
def study(tmp_path_factory):
    """A tiny study's sample sets, named as the workflow names them: {name: folder}."""
    root = tmp_path_factory.mktemp("timing")
    full, shallow, ee = root / "full.pt", root / "shallow.pt", root / "ee.pt"
    save(full, "uvit", CONFIG)
    save(shallow, "uvit", {**CONFIG, "depth": 1}, seed=1)
    save(ee, "early_exit", CONFIG, classifier_type="mlp_probe_per_layer", seed=2)
    sets = {
        "full": dict(checkpoint_path=full, method="full"),
        "full_steps3": dict(checkpoint_path=full, method="full", steps=3),
        "shallow_d1": dict(checkpoint_path=shallow, method="shallow"),
        "ee_mlp_probe_per_layer_thr0.5": dict(checkpoint_path=ee, method="early_exit", threshold=0.5),
        "duodiff_d1_ts2": dict(checkpoint_path=shallow, method="duodiff", checkpoint_path_late=full, t_switch=2),
    }
    folders = {}
    for name, settings in sets.items():
        folders[name] = root / "samples" / name
        args = cli_args("sample", output_folder=folders[name], sampler="ddim", steps=6, n_samples=2, batch_size=2,
                        progress=False, device="cpu")  # fmt: skip
        run_sample(**{**args, **settings})
    return folders


def time_args(folders, output_dir, **given):
    return {**cli_args("time", samples=[str(f) for f in folders], output_dir=output_dir, rounds=2, batch_size=2,
                       device="cpu", progress=False), "clock": None, **given}  # fmt: skip


def test_fewer_steps_measure_exactly_their_steps_ratio_on_a_clock_that_counts_evaluations(study, tmp_path, monkeypatch):
    calls = [0]
    forward = UViT.forward

    def counting_forward(self, *args, **kwargs):
        calls[0] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(UViT, "forward", counting_forward)
    result = run_time(**time_args([study["full"], study["full_steps3"]], tmp_path, rounds=3,
                                  clock=lambda: float(calls[0])))  # fmt: skip
    fewer = result["sets"]["full_steps3"]
    # 6 network evaluations a pass against 3: exactly 2.00x in every round.
    assert fewer["speedups"] == [2.0, 2.0, 2.0] and (fewer["speedup_ci_low"], fewer["speedup_ci_high"]) == (2.0, 2.0)
    assert result["sets"]["full"]["seconds"] == [6.0, 6.0, 6.0] and fewer["images_per_s"] == 2 / 3
    assert calls[0] == (1 + 3) * (6 + 3)  # the warm-up pass and three rounds of both sets


def test_every_set_is_timed_and_written_whole(study, tmp_path, monkeypatch):
    from duodiff.models import checkpoints

    loaded = []
    load_model = checkpoints.load_model
    def counting_load(path, **kwargs):
        loaded.append(str(path))
        return load_model(path, **kwargs)

    monkeypatch.setattr(checkpoints, "load_model", counting_load)
    result = run_time(**time_args(list(study.values()), tmp_path / "out"))
    # Three checkpoints for five sets: each loaded once, shared by the sets that use it.
    root = study["full"].parent.parent
    assert sorted(loaded) == sorted(str(root / name) for name in ("full.pt", "shallow.pt", "ee.pt"))
    written = json.loads((tmp_path / "out" / "timing.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert written["format"] == "duodiff-timing" and written["baseline"] == "full"
    assert written["order"] == list(study) and list(written["sets"]) == list(study)
    assert (written["rounds"], written["batch_size"], written["threads"], written["warmup_rounds"]) == (2, 2, 1, 1)
    assert written["device"] == "cpu" and written["device_name"] and written["torch_version"] == torch.__version__
    assert written["clock"] == "time.process_time"  # one torch thread on the CPU: the process's CPU time
    assert written["interval_ranks"] == [1, 2] and written["interval_coverage"] == 0.5 and written["confidence"] == 0.95
    for name, entry in written["sets"].items():
        assert entry["samples"] == str(study[name]) and len(entry["seconds"]) == len(entry["speedups"]) == 2
        assert all(t > 0 for t in entry["seconds"]) and entry["images_per_s"] > 0
        assert entry["speedup_ci_low"] <= entry["speedup"] <= entry["speedup_ci_high"]
    assert written["sets"]["full"]["speedups"] == [1.0, 1.0]
    assert (written["sets"]["full_steps3"]["method"], written["sets"]["full_steps3"]["steps"]) == ("full", 3)
    with open(tmp_path / "out" / "timing.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["set"] for row in rows] == list(study) and list(rows[0]) == time_sets.CSV_COLUMNS
    assert all(float(row["speedup"]) == pytest.approx(written["sets"][row["set"]]["speedup"]) for row in rows)


def test_the_thread_count_is_restored(study, tmp_path):
    before = torch.get_num_threads()
    run_time(**time_args([study["full"]], tmp_path, rounds=1, batch_size=1, threads=2))
    assert torch.get_num_threads() == before


# ---- refusals: one line, before any model is loaded ---------------------------------------------------


@pytest.fixture
def no_loading(monkeypatch):
    from duodiff.models import checkpoints

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(checkpoints, "load_model", refuse)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda sets, tmp: {"samples": [*sets, str(tmp / "full_steps9")]}, "no stats.json there"),
        (lambda sets, tmp: {"baseline": "nope"},
         "--baseline nope is not among the sets (--samples names full, full_steps3)"),  # fmt: skip
        (lambda sets, tmp: {"rounds": 0}, "--rounds must be a positive integer; got 0"),
        (lambda sets, tmp: {"batch_size": 0}, "--batch-size must be a positive integer; got 0"),
        (lambda sets, tmp: {"threads": 0}, "--threads must be a positive integer; got 0"),
    ],
    ids=["missing-stats", "unknown-baseline", "no-rounds", "no-batch", "no-threads"],
)
def test_bad_input_is_refused_in_one_line_before_any_work(study, tmp_path, no_loading, edit, message):
    (tmp_path / "full_steps9").mkdir()  # a set whose sampling never finished
    sets = [str(study["full"]), str(study["full_steps3"])]
    with pytest.raises(DuodiffError) as error:
        run_time(**time_args(sets, tmp_path / "out", **edit(sets, tmp_path)))
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_a_real_image_set_is_refused(tmp_path, study, no_loading):
    real = tmp_path / "real"
    real.mkdir()
    (real / "stats.json").write_text(json.dumps({"method": "real", "n_samples": 8}))
    with pytest.raises(DuodiffError, match="a set of real images has nothing to time"):
        run_time(**time_args([study["full"], real], tmp_path / "out"))


def test_the_command_refuses_with_one_line_and_status_2(study, tmp_path, capsys, no_loading):
    status = cli.main(["time", "--samples", str(study["full"]), "--output-dir", str(tmp_path), "--rounds", "0"])
    err = capsys.readouterr().err
    assert status == 2 and err == "duodiff time: error: --rounds must be a positive integer; got 0\n"
