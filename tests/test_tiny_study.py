"""(slow) The whole tiny study end to end: one session-scoped run of tests/configs/tiny.yaml
through Snakemake, its tables, plots, sets and timing, and what a changed setting reruns."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from test_workflow import (
    PLOTS,
    TINY,
    composed_rule,
    composed_sets,
    expected_sets,
    job_counts,
    load,
    make_workdir,
    modified,
    scored_sets,
    search_family_count,
    snakemake,
)

# ---- the whole tiny study, end to end -------------------------------------------------------------

ID_COLUMNS = ["set", "method", "setting", "classifier_type", "threshold", "t_switch", "shallow_depth", "n_samples"]
TABLE_COLUMNS = {
    "scores": ["score_name", "score", "score_ci_low", "score_ci_high", "score_diff", "score_diff_ci_low",
               "score_diff_ci_high", "verdict", "margin", "quality_limit", "speedup_measured", "speedup_theoretical"],
    "fid": ["fid", "gflops_per_forward", "gflops_per_image", "layer_ratio", "images_per_s", "speedup_measured",
            "speedup_theoretical", "feature_network"],
    "kid": ["kid", "kid_std", "feature_network"],
    "cmmd": ["cmmd", "available", "reason", "embedding_model"],
    "gflops": ["gflops_per_forward", "gflops_per_forward_linear_conv", "gflops_per_image", "layer_ratio",
               "images_per_s", "speedup_measured", "speedup_theoretical"],
}  # fmt: skip


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory):
    workdir = make_workdir(tmp_path_factory.mktemp("tiny"))
    result = snakemake(workdir, "--configfile", TINY, "--cores", "2", timeout=1800)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    return workdir


@pytest.mark.slow
def test_tiny_study_tables_have_one_row_per_set_and_the_contract_columns(tiny_study):
    for table, columns in TABLE_COLUMNS.items():
        with open(tiny_study / "results" / "tiny" / "tables" / f"{table}.csv") as f:
            rows = list(csv.DictReader(f))
        assert sorted(row["set"] for row in rows) == sorted(scored_sets(load(TINY))), table
        assert set(ID_COLUMNS + columns) <= set(rows[0]), table
    for name in ("summary.md", "summary.tex", "summary.html"):
        assert (tiny_study / "results" / "tiny" / "tables" / name).stat().st_size > 0


@pytest.mark.slow
def test_tiny_study_has_the_fewer_steps_baseline_the_floor_and_operating_points(tiny_study):
    tables = tiny_study / "results" / "tiny" / "tables"
    with open(tables / "scores.csv") as f:
        rows = {row["set"]: row for row in csv.DictReader(f)}
    fewer = rows["full_steps3"]
    # The full model, 3 of the 6 sampling steps: half the network evaluations, same network.
    assert (fewer["method"], fewer["steps"], fewer["score_name"]) == ("fewer_steps", "3", "FD")
    assert float(fewer["speedup_theoretical"]) == pytest.approx(6 / 3)
    assert float(fewer["layer_ratio"]) == pytest.approx(1.0) and float(fewer["speedup_measured"]) > 0
    real = rows["real"]
    assert real["method"] == "real" and real["speedup_theoretical"] == "" and float(real["score"]) >= 0
    for row in rows.values():  # every headline score carries its interval
        assert float(row["score_ci_low"]) <= float(row["score_ci_high"]), row["set"]
    with open(tables / "operating_points.csv") as f:
        points = list(csv.DictReader(f))
    assert [p["family"] for p in points] == ["fewer steps", "attention_probe", "shallow depth 1", "k = 1",
                                             "learned router",
                                             "DuoDiff d1, t_switch 2 + caching k = 1, N 2",
                                             "DuoDiff d1, t_switch 2 + attention_probe τ 0.5 at 4 steps"]
    info = json.loads((tiny_study / "results" / "tiny" / "feature_net" / "feature_net.json").read_text())
    assert 0 <= info["heldout_accuracy"] <= 1 and info["n_heldout"] == 359


@pytest.mark.slow
def test_tiny_study_draws_every_generated_set_in_the_quality_figure(tiny_study):
    # Each method family's panel draws its sets: a family whose line the figure forgot (caching's
    # panel once stood empty) leaves its sets' points out of every series.
    study = tiny_study / "results" / "tiny"
    figure = json.loads((study / "plots" / "quality_vs_gflops.json").read_text())
    drawn = {(round(x, 9), round(y, 9)) for series in figure["series"] for x, y in zip(series["x"], series["y"])}
    with open(study / "tables" / "scores.csv") as f:
        rows = [row for row in csv.DictReader(f) if row["method"] != "real"]
    assert {row["method"] for row in rows} >= {"full", "fewer_steps", "early_exit", "duodiff", "cache", "l2c", "composed"}
    for row in rows:
        point = (round(float(row["gflops_per_image"]), 9), round(float(row["score"]), 9))
        assert point in drawn, row["set"]


@pytest.mark.slow
def test_tiny_study_plots_and_grids_exist(tiny_study):
    for name in PLOTS:
        for suffix in (".png", ".pdf"):
            assert (tiny_study / "results" / "tiny" / "plots" / f"{name}{suffix}").stat().st_size > 0
    for name in expected_sets(load(TINY)):
        assert (tiny_study / "results" / "tiny" / "samples" / name / "grid.png").stat().st_size > 0


@pytest.mark.slow
def test_tiny_study_sample_sets_were_made_with_the_configured_settings(tiny_study):
    cfg = load(TINY)
    sampling = cfg["sampling"]
    for name in expected_sets(cfg):
        stats = json.loads((tiny_study / "results" / "tiny" / "samples" / name / "stats.json").read_text())
        steps = int(name.removeprefix("full_steps")) if name.startswith("full_steps") else sampling["steps"]
        steps = int(name.rsplit("_steps", 1)[1]) if "_steps" in name and name.startswith(("ee", "duodiff")) else steps
        assert (stats["sampler"], stats["steps"], stats["n_samples"], stats["batch_size"], stats["seed"]) == (
            sampling["sampler"], steps, sampling["n_samples"], sampling["batch_size"], sampling["seed"])
        method = {"full": "full", "shallow": "shallow", "ee": "early_exit", "duodiff": "duodiff",
                  "cache": "cache", "l2c": "l2c"}[name.split("_")[0]]
        assert stats["method"] == method
        if method == "cache":  # cache_N<interval>_k<keep>
            assert (stats["cache_interval"], stats["cache_keep"]) == tuple(int(part[1:]) for part in name.split("_")[1:])
        if method == "l2c":  # l2c_thr<τ>, the study's router
            assert stats["router_threshold"] == float(name.removeprefix("l2c_thr"))
            assert stats["router"] == "results/tiny/models/router/router.pt"
            assert (tiny_study / "results" / "tiny" / "models" / "router" / "loss.csv").is_file()
        elif "_thr" in name:  # early exit, alone or in DuoDiff's late phase (composed)
            assert stats["threshold"] == float(name.rsplit("_thr", 1)[1].split("_")[0])
            assert stats["classifier_type"] == name[name.index("ee_") + len("ee_"):name.rindex("_thr")]
        if method == "duodiff":
            assert stats["t_switch"] == int(name.split("_ts", 1)[1].split("_")[0])
            assert stats["shallow_depth"] == int(name.split("_")[1][1:])
        for metric in ("fid", "cmmd", "gflops"):
            assert (tiny_study / "results" / "tiny" / "metrics" / name / f"{metric}.json").is_file()
        rule = {"full": "sample_full", "shallow": "sample_shallow", "early_exit": "sample_early_exit",
                "duodiff": "sample_duodiff", "cache": "sample_cache", "l2c": "sample_l2c"}[method]
        rule = "sample_fewer_steps" if name.startswith("full_steps") else rule
        rule = composed_rule(name) if name in composed_sets(load(TINY)) else rule
        assert (tiny_study / "results" / "tiny" / "logs" / rule / f"{name}.log").is_file()
        assert (tiny_study / "results" / "tiny" / "benchmarks" / rule / f"{name}.tsv").is_file()


@pytest.mark.slow
def test_tiny_study_times_every_set_alone(tiny_study):
    study = tiny_study / "results" / "tiny"
    timing = json.loads((study / "timing" / "timing.json").read_text())
    cfg = load(TINY)
    # The grid's sets, then the search's probes (ordinary sets, timed with the others).
    with open(study / "tables" / "search.csv") as f:
        probes = list(dict.fromkeys(row["set"] for row in csv.DictReader(f) if row["source"] == "search"))
    timed = expected_sets(cfg) + probes
    assert list(timing["sets"]) == timed and timing["baseline"] == "full"
    assert (timing["rounds"], timing["batch_size"], timing["threads"]) == tuple(
        cfg["timing"][key] for key in ("rounds", "batch_size", "threads"))  # fmt: skip
    assert timing["sets"]["full"]["speedups"] == [1.0] * cfg["timing"]["rounds"]
    with open(study / "timing" / "timing.csv") as f:
        assert [row["set"] for row in csv.DictReader(f)] == timed
    assert (study / "logs" / "timing.log").is_file() and (study / "benchmarks" / "timing.tsv").is_file()


@pytest.mark.slow
def test_tiny_study_report_builds(tiny_study):
    result = snakemake(tiny_study, "--configfile", TINY, "--report", "results/tiny/report.html")
    assert result.returncode == 0, result.stderr
    page = (tiny_study / "results" / "tiny" / "report.html").read_text()
    assert "quality_vs_gflops.png" in page and "fid.csv" in page


@pytest.mark.slow
def test_tiny_study_second_run_has_nothing_to_do(tiny_study):
    result = snakemake(tiny_study, "--configfile", TINY, "-n")
    assert result.returncode == 0, result.stderr
    assert "Nothing to be done" in result.stdout + result.stderr


def changed_jobs(workdir: Path, name: str, edit) -> dict:
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(modified(load(TINY), edit)))
    result = snakemake(workdir, "--configfile", path, "-n")
    assert result.returncode == 0, result.stderr
    return job_counts(result.stdout)


@pytest.mark.slow
def test_tiny_study_same_settings_in_another_key_order_change_nothing(tiny_study):
    def reverse(mapping):
        if not isinstance(mapping, dict):
            return mapping
        return {key: reverse(mapping[key]) for key in reversed(list(mapping))}

    path = tiny_study / "reversed.yaml"
    path.write_text(yaml.safe_dump(reverse(load(TINY)), sort_keys=False))
    result = snakemake(tiny_study, "--configfile", path, "-n")
    assert result.returncode == 0, result.stderr
    assert "Nothing to be done" in result.stdout + result.stderr


@pytest.mark.slow
def test_tiny_study_changing_one_threshold_reruns_only_what_depends_on_it(tiny_study):
    cfg = load(TINY)
    n_classifiers = len(cfg["early_exit"]["classifier_types"])

    def edit(c):
        c["early_exit"]["thresholds"][-1] = 0.3

    # One new sample set per classifier type, its scores (one job for FID and FD, one for CMMD),
    # GFLOPs and timing (one job each for every set), and the tables and plots. Each early-exit
    # family's search starts again from its new grid: round 0 and its result is all a dry run can
    # know (the later rounds join once round 0 has run).
    assert changed_jobs(tiny_study, "threshold", edit) == {
        "sample_early_exit": n_classifiers, "score": n_classifiers, "search_round": n_classifiers,
        "search_result": n_classifiers, "cmmd": n_classifiers, "flops": 1, "timing": 1, "tables": 1, "plots": 1,
        "all": 1,
    }  # fmt: skip


@pytest.mark.slow
def test_tiny_study_changing_a_training_setting_reruns_that_model_and_its_sets(tiny_study):
    n_t_switch = len(load(TINY)["duodiff"]["t_switch"])
    composed = [composed_rule(name) for name in composed_sets(load(TINY)) if name.startswith("duodiff")]

    def edit(c):
        c["train"]["shallow"]["lr"] = 0.002

    # The shallow model, the shallow set and every DuoDiff set, composed ones too (they use it), their
    # scores, and from round 0 the search of every family with such sets (DuoDiff's and each composed one's).
    n_sets = 1 + n_t_switch + len(composed)
    assert changed_jobs(tiny_study, "shallow_lr", edit) == {
        **{rule: composed.count(rule) for rule in composed},
        "train_shallow": 1, "sample_shallow": 1, "sample_duodiff": n_t_switch,
        "search_round": 1 + len(composed), "search_result": 1 + len(composed),
        "score": n_sets, "cmmd": n_sets, "flops": 1, "timing": 1, "tables": 1, "plots": 1, "all": 1,
    }  # fmt: skip


@pytest.mark.slow
def test_tiny_study_changing_a_metric_setting_rescores_only(tiny_study):
    def edit(c):
        c.setdefault("metrics", {}).setdefault("fid", {})["kid_subsets"] = 50

    n_scored = len(scored_sets(load(TINY)))
    # kid_subsets is a metrics.fid key, shared by the Inception and the classifier scores. Every
    # search reads the new scores from round 0, and the timing job waits for the probes they name.
    n_families = search_family_count(load(TINY))
    assert changed_jobs(tiny_study, "kid_subsets", edit) == {
        "score": n_scored, "search_round": n_families, "search_result": n_families, "timing": 1, "tables": 1,
        "plots": 1, "all": 1}




@pytest.mark.slow
def test_tiny_study_searches_each_family_and_reports_the_setting_found(tiny_study):
    # search.budget 1 (tests/configs/tiny.yaml): each family ran round 0 (the grid) and at most one probe.
    study = tiny_study / "results" / "tiny"
    with open(study / "tables" / "search.csv") as f:
        rows = list(csv.DictReader(f))
    composed = "composed-duodiff_d1_ts2_ee_attention_probe_thr_steps4"  # tiny.yaml's entry, its knob the threshold
    cached = "composed-duodiff_d1_ts2_cache_N_k1"  # DuoDiff with caching, its knob the interval
    families = {"fewer_steps", "early_exit-attention_probe", "duodiff-d1", "cache-k1", "l2c", composed, cached}
    assert {row["family"] for row in rows} == families
    for family in families:
        trace = [row for row in rows if row["family"] == family]
        final = json.loads(max((study / "search" / family).glob("round*.json"), key=lambda p: int(p.stem[5:])).read_text())
        assert final["done"] and [row["set"] for row in trace] == [p["set"] for p in final["probes"]]
        probes = [row for row in trace if row["source"] == "search"]
        assert len(probes) <= 1 and all(row["round"] == "1" for row in probes)
        for row in probes:  # an ordinary sample set: sampled, scored, counted and timed
            assert (study / "samples" / row["set"] / "stats.json").is_file()
            assert (study / "metrics" / row["set"] / "gflops.json").is_file()
            assert float(row["speedup_theoretical"]) > 0
        assert {row["stopped"] for row in trace} == {final["reason"]}
    with open(study / "tables" / "operating_points.csv") as f:
        points = {p["family"]: p for p in csv.DictReader(f)}
    with open(study / "tables" / "scores.csv") as f:
        grid = {row["set"] for row in csv.DictReader(f)}
    for label, family in [("fewer steps", "fewer_steps"), ("attention_probe", "early_exit-attention_probe"),
                          ("shallow depth 1", "duodiff-d1"), ("k = 1", "cache-k1"), ("learned router", "l2c")]:
        final = next(row for row in rows if row["family"] == family)
        assert "found by search" in points[label]["note"]
        assert points[label]["set"] == final["best"]  # "" when none passes: the note names the closest
    # The composed family's row (method composed) reports its search too.
    composed_points = {p["family"]: p for p in points.values() if p["method"] == "composed"}
    for label, family in [("DuoDiff d1, t_switch 2 + attention_probe τ 0.5 at 4 steps", composed),
                          ("DuoDiff d1, t_switch 2 + caching k = 1, N 2", cached)]:
        final = next(row for row in rows if row["family"] == family)
        point = composed_points[label]
        assert "found by search" in point["note"] and point["set"] == final["best"]
    assert not {row["set"] for row in rows if row["source"] == "search"} & grid  # probes stay out of scores.csv
    timed = json.loads((study / "timing" / "timing.json").read_text())["sets"]
    assert {row["set"] for row in rows if row["source"] == "search"} <= set(timed)
    assert (study / "plots" / "search_trace.png").stat().st_size > 0
