"""The operating-point search (duodiff.search): the next probe on hand-made pass/fail functions,
each sequence of probes worked out by hand, and one round file chained to the next."""

from __future__ import annotations

import json

import pytest

from duodiff.core.errors import DuodiffError
from duodiff.search.bisect import (
    BUDGET,
    CHEAPEST_END_PASSES,
    CONVERGED,
    NONE_PASSES,
    Family,
    Probe,
    next_probe,
)
from duodiff.search.rounds import run_search, set_name

THRESHOLD = Family(knob="threshold", low=0.0, high=1.0, cheaper="higher", resolution=0.01)
T_SWITCH = Family(knob="t_switch", low=0, high=40, cheaper="higher", resolution=1, integer=True)
STEPS = Family(knob="steps", low=1, high=40, cheaper="lower", resolution=1, integer=True)


def search(family, grid, passes, budget):
    """Drive next_probe to the end: (the search's probes in order, the last result)."""
    probes = [Probe(v, passes(v)) for v in grid]
    done = []
    while True:
        result = next_probe(family, probes, budget, len(done))
        if result.done:
            return done, result
        assert result.next not in [p.value for p in probes], "a setting probed twice"
        done.append(result.next)
        probes.append(Probe(result.next, passes(result.next)))


def test_monotone_threshold_is_bisected_to_the_resolution():
    # Passes up to 0.18. Bracket (0.15, 0.2): 0.17 (floor of 17.5) passes, (0.17, 0.2): 0.18 passes,
    # (0.18, 0.2): 0.19 fails, (0.18, 0.19): one step apart.
    probes, result = search(THRESHOLD, [0.15, 0.2, 0.3], lambda t: t <= 0.18, budget=5)
    assert probes == [0.17, 0.18, 0.19]
    assert (result.reason, result.best, result.note) == (CONVERGED, 0.18, "")


def test_fewer_steps_are_bisected_downwards_from_the_full_model():
    # Passes from 27 steps up; the grid's 20 and 10 fail, the full model's 40 passes unprobed.
    # (40, 20): 30 passes; (30, 20): 25 fails; (30, 25): 28 (the more expensive of 27.5's
    # neighbours) passes; (28, 25): 27 passes; (27, 25): 26 fails; converged.
    probes, result = search(STEPS, [20, 10], lambda s: s >= 27, budget=5)
    assert probes == [30, 25, 28, 27, 26]
    assert (result.reason, result.best) == (CONVERGED, 27)
    assert all(isinstance(p, int) for p in probes)


def test_a_failure_more_expensive_than_a_pass_is_reported_and_the_cheapest_pass_kept():
    passes = {0.15: False, 0.2: True, 0.3: False, 0.25: False, 0.22: True, 0.23: False}
    probes, result = search(THRESHOLD, [0.15, 0.2, 0.3], passes.__getitem__, budget=3)
    # (0.2, 0.3): 0.25 fails; (0.2, 0.25): 0.22 passes; (0.22, 0.25): 0.23 fails.
    assert probes == [0.25, 0.22, 0.23]
    assert result.best == 0.22 and result.reason == CONVERGED  # 0.22 and 0.23 one step apart
    assert "not monotone" in result.note and "0.15" in result.note


def test_none_passing_converges_on_the_full_model():
    family = Family(knob="threshold", low=0.0, high=1.0, cheaper="higher", resolution=0.05)
    # (0, 0.15) in steps of 0.05: 0.05 (floor of 1.5) fails; (0, 0.05): nothing between.
    probes, result = search(family, [0.15], lambda t: False, budget=4)
    assert probes == [0.05]
    assert (result.reason, result.best) == (NONE_PASSES, None)


def test_budget_exhausted_keeps_the_cheapest_pass_so_far():
    probes, result = search(THRESHOLD, [0.15, 0.2, 0.3], lambda t: t <= 0.18, budget=1)
    assert probes == [0.17]
    assert (result.reason, result.best, result.bracket) == (BUDGET, 0.17, (0.17, 0.2))
    probes, result = search(THRESHOLD, [0.15, 0.2], lambda t: False, budget=0)
    assert probes == [] and (result.reason, result.best) == (BUDGET, None)


def test_the_cheapest_end_is_probed_when_nothing_failed():
    probes, result = search(T_SWITCH, [10, 20, 30], lambda t: True, budget=2)
    assert probes == [40] and (result.reason, result.best) == (CHEAPEST_END_PASSES, 40)
    # The cheapest end fails: bisection between the grid's 30 and it.
    probes, result = search(T_SWITCH, [10, 20, 30], lambda t: t <= 33, budget=9)
    assert probes == [40, 35, 32, 33, 34] and (result.reason, result.best) == (CONVERGED, 33)


@pytest.mark.parametrize("family", [T_SWITCH, STEPS, Family("threshold", 0.0, 1.0, "higher", 0.05)])
def test_every_border_is_found_without_repeating_a_probe(family):
    n = round((family.high - family.low) / family.resolution)
    lattice = [family.value(k) for k in range(round(family.low / family.resolution), n + 1)]
    grid = lattice[len(lattice) // 4 :: max(1, len(lattice) // 4)]
    for border in lattice:  # passes are the settings at most as cheap as `border`
        probes, result = search(family, grid, lambda v, b=border: family.cheapness(v) <= family.cheapness(b), budget=50)
        assert len(set(probes)) == len(probes) and not set(probes) & set(grid)
        assert len(probes) <= 8  # bisection: log2 of the bracket plus the cheapest end
        expected = None if border == family.expensive_end else border
        assert result.best == expected, border


def test_bad_input_is_one_clear_error():
    with pytest.raises(DuodiffError, match="outside the domain"):
        next_probe(THRESHOLD, [Probe(1.5, True)], 2, 0)
    with pytest.raises(DuodiffError, match="integer resolution"):
        Family("steps", 1, 40, "lower", 0.5, integer=True)


def write_score(metrics, name, score, diff, high):
    folder = metrics / name
    folder.mkdir(parents=True)
    paired = {} if diff is None else {"fid_diff": diff, "fid_diff_ci_low": diff - 0.1, "fid_diff_ci_high": high}
    (folder / "fd_classifier.json").write_text(json.dumps({"fid": score, "paired": paired}))


def test_round_files_chain_the_trace_and_name_the_next_probe(tmp_path):
    metrics = tmp_path / "metrics"
    write_score(metrics, "full", 1.0, None, None)
    write_score(metrics, "duodiff_d3_ts10", 1.0, 0.0, 0.05)  # equal: 0.05 <= 0.1 x 1.0
    write_score(metrics, "duodiff_d3_ts20", 1.2, 0.2, 0.3)  # worse
    common = {"family": "duodiff-d3", "template": "duodiff_d3_ts{t_switch}", "knob": "t_switch", "low": 0,
              "high": 40, "cheaper": "higher", "resolution": 1, "integer": True, "budget": 2,
              "headline": "classifier", "margin": 0.1, "metrics_root": str(metrics)}
    first = run_search(**common, grid=[10, 20], previous=None, output=str(tmp_path / "round0.json"))
    assert (first["round"], first["next"], first["done"]) == (0, "duodiff_d3_ts15", False)
    assert [p["verdict"] for p in first["probes"]] == ["equal", "worse"]
    write_score(metrics, "duodiff_d3_ts15", 1.05, -0.2, -0.01)  # better
    second = run_search(**common, grid=None, previous=str(tmp_path / "round0.json"),
                        output=str(tmp_path / "round1.json"))
    assert second["probes"][-1] == {**second["probes"][-1], "round": 1, "source": "search", "verdict": "better",
                                    "value": 15}
    assert second["next"] == "duodiff_d3_ts17" and second["best"] == "duodiff_d3_ts15"
    with pytest.raises(DuodiffError, match="other budget"):
        run_search(**{**common, "budget": 3}, grid=None, previous=str(tmp_path / "round0.json"),
                   output=str(tmp_path / "x.json"))


def test_set_names_follow_the_workflow_spelling():
    assert set_name("ee_attention_probe_thr{threshold}", "threshold", 0.17, False) == "ee_attention_probe_thr0.17"
    assert set_name("ee_attention_probe_thr{threshold}", "threshold", 1, False) == "ee_attention_probe_thr1.0"
    assert set_name("full_steps{steps}", "steps", 27, True) == "full_steps27"
