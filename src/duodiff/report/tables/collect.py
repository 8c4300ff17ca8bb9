"""`duodiff tables`: the study's numbers, one row per sample set, as csv, Markdown, LaTeX and HTML.

Inputs are the files of docs/architecture.md: per sample set `samples/{set}/stats.json` and
`metrics/{set}/{fid,cmmd,gflops}.json`. Outputs (all written atomically, fixed names):

    fid.csv, kid.csv, cmmd.csv, gflops.csv   data, full precision, one row per set
    summary.md, summary.tex, summary.html   the table researchers read: FID, KID, CMMD (where any
                                            set has it; else one note), GFLOPs, layer ratio,
                                            throughput and speed-ups, best per column in bold
                                            (cost: among the sets as good as the full model, see
                                            contenders), conventions and caveats below it
                                            (html: for the Snakemake report, which shows html)
    operating_points.html, <csv name>.html  the report's pages: the answer (front page, readable
                                            names) and each CSV rendered as a table

Rows are ordered like the papers' tables: full model, shallow model alone, early exit (by
classifier, then threshold), DuoDiff (by shallow depth, then t_switch). Speed-ups are relative to
the `full` set, which must be among the sets.

The work is split by what it does: inputs.py reads and checks each set's files,
operating_points.py sets every set against the full model, cells.py, notes.py
and formats.py make the summaries. This module holds the sets' names and labels, puts the
rows together in paper order and writes the files.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pandas as pd

from duodiff.core.errors import DuodiffError, is_number, require
from duodiff.core.flags import add_flag
from duodiff.core.io import atomic_path, read_json, write_text
from duodiff.core.study import METHOD_ORDER, method_of_set, parse_set_form, setting_label
from duodiff.report.tables.formats import csv_html, operating_points_html, summary_html, summary_latex, summary_markdown
from duodiff.report.tables.inputs import (
    HEADLINES,
    TableSettings,
    check_one_mode,
    check_one_reference,
    read_real,
    read_set,
    read_timing,
)
from duodiff.report.tables.operating_points import add_comparisons, operating_points

# The columns every csv starts with (the contract's list, plus the sampling set-up the plots
# need: sampler, steps, depth, seed).
ID_COLUMNS = ["set", "method", "setting", "classifier_type", "threshold", "t_switch",
              "shallow_depth", "depth", "sampler", "steps", "seed", "n_samples"]
INTEGER_COLUMNS = ["t_switch", "shallow_depth", "depth", "steps", "seed", "n_samples", "cache_interval", "cache_keep"]
SPEED_COLUMNS = ["gflops_per_forward", "gflops_per_image", "layer_ratio", "images_per_s",
                 "speedup_measured", "speedup_measured_ci_low", "speedup_measured_ci_high", "speedup_theoretical"]
SCORE_COLUMNS = ["score_name", "score", "score_ci_low", "score_ci_high", "score_diff", "score_diff_ci_low",
                 "score_diff_ci_high", "verdict", "margin", "quality_limit"]
CSV_COLUMNS = {
    "scores": ID_COLUMNS + SCORE_COLUMNS + ["kid_headline", "kid_headline_ci_low", "kid_headline_ci_high",
                                            "kid_headline_diff", "kid_headline_diff_ci_low", "kid_headline_diff_ci_high"]
    + SPEED_COLUMNS + ["score_n_samples", "score_n_reference", "score_network"],
    "fid": ID_COLUMNS + ["fid", "fid_ci_low", "fid_ci_high", "fid_diff", "fid_diff_ci_low", "fid_diff_ci_high"]
    + SPEED_COLUMNS
    + ["feature_network", "fid_mode", "reference_source", "fid_n_samples", "n_reference"],
    # fid_n_samples: the images Inception scored (metrics.fid.max_samples), not the set's n_samples.
    "kid": ID_COLUMNS + ["kid", "kid_std", "kid_ci_low", "kid_ci_high", "feature_network", "fid_mode", "fid_n_samples",
                         "n_reference"],
    "cmmd": ID_COLUMNS + ["cmmd", "available", "reason", "embedding_model"],
    "gflops": ID_COLUMNS + ["gflops_per_forward", "gflops_per_forward_linear_conv",
                            "gflops_per_image", "layer_ratio", "images_per_s",
                            "speedup_measured", "speedup_measured_ci_low", "speedup_measured_ci_high",
                            "speedup_theoretical"],
}


def check_sets(sets) -> list[str]:
    sets = list(sets or [])
    require(len(sets) > 0, "--sets must name at least one sample set; got none")
    duplicates = sorted({s for s in sets if sets.count(s) > 1})
    require(not duplicates, f"--sets names {', '.join(duplicates)} more than once")
    for name in sets:
        method_of_set(name)
    require("full" in sets, f"--sets must include 'full' (speed-ups are relative to it); got {' '.join(sets)}")
    return sets


def blocks(n) -> str:
    return f"{n} block" if n == 1 else f"{n} blocks"


def method_label(row) -> str:
    """How a set's method reads in tables and legends."""
    method = row["method"]
    if method == "real":
        return "Real data (floor)"
    if method == "full":
        return f"U-ViT ({blocks(row['depth'])})"
    if method == "fewer_steps":
        return f"U-ViT ({blocks(row['depth'])}), fewer steps"
    if method == "shallow":
        return f"U-ViT shallow ({blocks(row['shallow_depth'])})"
    if method == "early_exit":
        return f"Early exit, {row['classifier_type']}"
    if method == "composed":  # what it combines; the Setting column gives the values
        fields = parse_set_form(row["set"])[1]
        parts = [f"DuoDiff ({fields['depth']} + {row['depth']} blocks)"] if "depth" in fields else []
        parts += [f"early exit, {fields['classifier_type']}"] if "classifier_type" in fields else []
        parts += [f"caching (k = {fields['cache_keep']})"] if "cache_keep" in fields else []
        return " + ".join(parts) + (", fewer steps" if "steps" in fields else "")
    if method == "cache":  # k from the set's name: the csv tables have no cache_keep column
        return f"Caching (k = {parse_set_form(row['set'])[1]['cache_keep']})"
    if method == "l2c":
        return "Learning-to-Cache"
    return f"DuoDiff ({row['shallow_depth']} + {row['depth']} blocks)"


def _order_key(row) -> tuple:
    """Paper order: real data, full, fewer steps (most first), shallow (by depth), early exit
    (classifier, threshold), DuoDiff (depth, t_switch)."""
    method = row["method"]
    number = lambda v: float("inf") if v is None or pd.isna(v) else float(v)  # noqa: E731
    if method == "fewer_steps":
        return (METHOD_ORDER.index(method), "", -number(row["steps"]), 0.0)
    if method == "real":
        return (0, "", 0.0, 0.0)
    if method == "early_exit":
        return (METHOD_ORDER.index(method), str(row["classifier_type"]), number(row["threshold"]), 0.0)
    if method == "duodiff":
        return (METHOD_ORDER.index(method), "", number(row["shallow_depth"]), number(row["t_switch"]))
    if method == "cache":
        return (METHOD_ORDER.index(method), "", number(row["cache_keep"]), number(row["cache_interval"]))
    if method == "l2c":
        return (METHOD_ORDER.index(method), "", number(row["router_threshold"]), 0.0)
    if method == "composed":  # by form (the set name up to its numbers), then t_switch, threshold, fewer steps
        return (METHOD_ORDER.index(method), re.sub(r"\d+(\.\d+)?(e-\d+)?", "#", row["set"]),
                tuple(number(row.get(key)) for key in ("t_switch", "threshold", "cache_interval")), -number(row["steps"]))
    return (METHOD_ORDER.index(method), "", number(row["shallow_depth"]), 0.0)


def _read_row(settings: TableSettings, name: str) -> dict:
    method = method_of_set(name)
    return read_real(settings) if method == "real" else read_set(settings, name, method)


def collect(settings: TableSettings, sets: list[str], margin: float, probes: list[str] = ()) -> pd.DataFrame:
    """All sets' rows in paper order (sets as check_sets passed them, then the search's probe sets),
    with their labels, speed-ups relative to `full` and each headline score's paired verdict
    against the full model's at the equal-quality margin (operating_points.paired_verdict).
    Probes are read without CMMD: the search judges the headline score only, and the workflow
    computes CMMD for the grid's sets alone (it is the costly score on a cluster)."""
    without_cmmd = dataclasses.replace(settings, cmmd=False)
    rows = sorted([_read_row(settings, name) for name in sets] + [_read_row(without_cmmd, name) for name in probes],
                  key=_order_key)
    frame = pd.DataFrame(rows)
    for column in ID_COLUMNS + SPEED_COLUMNS + ["real_mode", "batch_size", "device", "torch_version", "timing_clock",
                                                "precision", "gflops_per_forward_linear_conv", "gflops_convention",
                                                "timing_source", "cache_interval", "cache_keep", "router_threshold"]:
        if column not in frame:  # a study of the real set alone has no sampling columns
            frame[column] = None
    for column in INTEGER_COLUMNS:  # nullable integers, so t_switch 300 stays "300", not "300.0"
        frame[column] = frame[column].astype("Int64")
    # The labels the summaries print, from the study's vocabulary above.
    frame["method_label"] = frame.apply(method_label, axis=1)
    frame["setting_label"] = frame.apply(setting_label, axis=1)
    frame["has_setting"] = frame["setting_label"] != setting_label({"method": None})
    check_one_mode(frame)
    check_one_reference(frame)
    frame.attrs["timing"] = settings.timing  # the notes say how the speed-ups were measured
    return add_comparisons(frame, margin)


def _write_frame(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


SEARCH_COLUMNS = ["family", "label", "round", "source", "set", "knob", "value", "score_name", "score", "score_diff",
                  "score_diff_ci_low", "score_diff_ci_high", "verdict", "margin", "quality_limit", "speedup_theoretical",
                  "speedup_measured", "stopped", "best", "note"]


def read_searches(paths) -> list[dict]:
    """The last round file of each family's search (duodiff.search.rounds), checked: done."""
    finals = []
    for path in paths or []:
        path = Path(path)
        require(path.is_file(), f"--search {path} does not exist")
        try:
            final = read_json(path)
        except ValueError as error:
            raise DuodiffError(f"--search {path}: not valid JSON: {error}") from None
        missing = [key for key in ("family", "knob", "probes", "done", "reason", "best", "note") if key not in final]
        require(not missing, f"--search {path}: missing {', '.join(missing)} (not a round file of duodiff search)")
        require(final["done"], f"--search {path}: the search of {final['family']} is not done (round {final.get('round')})")
        finals.append(final)
    families = [final["family"] for final in finals]
    require(len(set(families)) == len(families), f"--search names a family twice: {' '.join(families)}")
    return finals


def search_table(finals: list[dict], rows: pd.DataFrame) -> pd.DataFrame:
    """search.csv: every probe of every family in order (the grid's seeds as round 0), with its
    score, paired difference, verdict and cost as the tables compute them, and why the search stopped."""
    by_set = rows.set_index("set")
    records = []
    for final in finals:
        for probe in final["probes"]:
            row = by_set.loc[probe["set"]]
            records.append({"family": final["family"], "label": final.get("label", final["family"]),
                            "round": probe["round"], "source": probe["source"],
                            "set": probe["set"], "knob": final["knob"], "value": probe["value"],
                            **{key: row[key] for key in SEARCH_COLUMNS if key in row.index and key != "set"},
                            "stopped": final["reason"], "best": final["best"] or "", "note": final["note"]})
    return pd.DataFrame(records, columns=SEARCH_COLUMNS)


def run_tables(*, samples_root, metrics_root, sets, output_dir, headline: str, cmmd: bool, margin: float,
               timing, search=None) -> dict[str, Path]:
    """Write scores/fid/kid/cmmd/gflops.csv, operating_points.csv, summary.md, summary.tex and
    summary.html to output_dir, with the report's html pages (operating_points.html, and
    <name>.html of each other CSV); return their paths. margin: equal quality's non-inferiority margin,
    a fraction of the full model's headline score. timing: timing.json of `duodiff time`, whose
    speed-ups (every set timed alone) the tables report; None: the sampling jobs' own timings.
    search: the last round file of each family's search (`duodiff search`): its probe sets are read
    like the grid's, but stay out of the per-set tables and the summaries' rows (the grid is what
    the figures draw); operating_points.csv and the summaries report the settings found, and
    search.csv every probe."""
    require(headline in HEADLINES, f"--headline must be one of {', '.join(HEADLINES)}; got {headline!r}")
    require(is_number(margin) and 0 <= margin < 1,
            f"--margin must be a fraction of the full model's score in [0, 1); got {margin!r}")
    sets = check_sets(sets)
    settings = TableSettings(samples_root=Path(samples_root), metrics_root=Path(metrics_root), headline=headline,
                             cmmd=cmmd, timing=read_timing(timing))
    finals = read_searches(search)
    probe_sets = [p["set"] for final in finals for p in final["probes"] if p["set"] not in sets]
    # Read and checked everything before writing, probes with the grid (one reference, one margin).
    every = collect(settings, sets, float(margin), probes=list(dict.fromkeys(probe_sets)))
    probe = every["set"].isin(probe_sets)
    frame = every[~probe].reset_index(drop=True)
    # attrs hold plain data (pandas copies and compares them on every operation): the probes as records.
    frame.attrs = {**every.attrs, "search": {"finals": finals, "probes": every[probe].to_dict("records")}}
    output_dir = Path(output_dir)
    paths = {}
    for name, columns in CSV_COLUMNS.items():
        paths[f"{name}.csv"] = output_dir / f"{name}.csv"
        _write_frame(frame[columns], paths[f"{name}.csv"])
    paths["operating_points.csv"] = output_dir / "operating_points.csv"
    _write_frame(operating_points(frame), paths["operating_points.csv"])
    paths["search.csv"] = output_dir / "search.csv"
    _write_frame(search_table(finals, every), paths["search.csv"])
    paths["summary.md"] = output_dir / "summary.md"
    write_text(paths["summary.md"], summary_markdown(frame))
    paths["summary.tex"] = output_dir / "summary.tex"
    write_text(paths["summary.tex"], summary_latex(frame))
    paths["summary.html"] = output_dir / "summary.html"
    write_text(paths["summary.html"], summary_html(frame))
    # For the Snakemake report, which shows html and only offers CSVs as downloads: the answer for
    # its front page, and every CSV as a table.
    paths["operating_points.html"] = output_dir / "operating_points.html"
    write_text(paths["operating_points.html"], operating_points_html(frame))
    for name in [*CSV_COLUMNS, "search"]:
        paths[f"{name}.html"] = output_dir / f"{name}.html"
        write_text(paths[f"{name}.html"], csv_html(paths[f"{name}.csv"]))
    return paths


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser("tables", help="csv, Markdown and LaTeX tables of every sample set's metrics",
                                   description=__doc__.split("\n\n")[0])
    add_flag(parser, "--samples-root", required=True, help="results/<dataset>/samples")
    add_flag(parser, "--metrics-root", required=True, help="results/<dataset>/metrics")
    add_flag(parser, "--sets", nargs="+", required=True, help="sample-set names, e.g. full shallow_d3 ee_attention_probe_thr0.1")
    add_flag(parser, "--output-dir", required=True, help="where the tables go, e.g. results/digits/tables")
    add_flag(parser, "--headline", default="inception", choices=list(HEADLINES),
             help="the score the summary, marks and operating points use: inception (fid.json) or classifier "
                  "(fd_classifier.json)")
    add_flag(parser, "--cmmd", action=argparse.BooleanOptionalAction, default=True,
             help="read each set's cmmd.json (--no-cmmd: CMMD was switched off; the tables say so in one note)")
    add_flag(parser, "--margin", type=float, default=0.10,
             help="equal quality: the upper end of a set's paired 95%% interval of its headline score minus the full "
                  "model's is at most this fraction of the full model's score (non-inferiority margin)")
    add_flag(parser, "--timing", default=None,
             help="timing.json of `duodiff time` (every set timed alone): its speed-ups and images/s; without it the "
                  "sampling jobs' own timings")
    add_flag(parser, "--search", nargs="*", default=None,
             help="the last round file of each family's search (`duodiff search`): operating_points.csv reports the "
                  "settings found, search.csv every probe (without: the grid's best, and an empty search.csv)")
    parser.set_defaults(func=lambda args: run_tables(samples_root=args.samples_root, metrics_root=args.metrics_root,
                                                     sets=args.sets, output_dir=args.output_dir, headline=args.headline,
                                                     cmmd=args.cmmd, margin=args.margin, timing=args.timing,
                                                     search=args.search))
