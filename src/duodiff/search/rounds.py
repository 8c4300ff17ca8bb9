"""`duodiff search`: one round of an operating-point search (workflow/rules/search.smk, checkpoint
search_round). Round 0 reads the family's grid sets; round r reads round r-1's file and the score
of the probe it asked for; each writes the whole trace so far and the next probe's set name (or
done, and why) to round<r>.json. bisect.py decides; this module reads the scores and writes.

A probe is an ordinary sample set named by the family's template (`ee_attention_probe_thr{threshold}`
-> ee_attention_probe_thr0.17), sampled and scored by the usual rules: the search itself computes
nothing but the next knob value.

round<r>.json: {format, family, label, template, knob, low, high, cheaper, resolution, integer, budget,
headline, score_name, margin, full_score, quality_limit, round, probes: [{round, source (grid |
search), set, value, score, diff, diff_ci_low, diff_ci_high, verdict, passed}], done, next (set
name or null), next_value, reason ("" until done), best (cheapest passing set, null: none),
best_value, note (a contradiction of monotonicity, or "")}."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from duodiff.core.errors import DuodiffError, is_number, require
from duodiff.core.flags import add_flag
from duodiff.core.io import read_json, write_json
from duodiff.report.tables.inputs import HEADLINES
from duodiff.report.tables.operating_points import paired_verdict
from duodiff.search.bisect import Family, Probe, next_probe

FORMAT = 1
FAMILY_KEYS = ("family", "template", "knob", "low", "high", "cheaper", "resolution", "integer", "budget",
               "headline", "margin")


def set_name(template: str, knob: str, value, integer: bool) -> str:
    """The sample set of a knob value: thresholds as Python's shortest float text (the workflow's
    threshold_label, common.smk), integers plainly."""
    text = str(int(value)) if integer else repr(float(value))
    return template.replace("{" + knob + "}", text)


def read_score(metrics_root: Path, name: str, headline: str) -> dict:
    """The headline score of a set and its paired difference to the full model (`paired` of
    fid.json or fd_classifier.json, duodiff.metrics.paired)."""
    path = metrics_root / name / f"{HEADLINES[headline]['file']}.json"
    require(path.is_file(), f"{path} does not exist: score the set first (duodiff score)")
    try:
        data = read_json(path)
    except ValueError as error:
        raise DuodiffError(f"{path}: not valid JSON: {error}") from None
    paired = data.get("paired") or {}
    keys = ("fid_diff", "fid_diff_ci_low", "fid_diff_ci_high")
    require(all(is_number(paired.get(key)) and math.isfinite(paired[key]) for key in keys),
            f"{path}: no paired difference to the full model (`paired`: {', '.join(keys)}); the search needs "
            f"metrics.intervals: true and the set scored with --baseline")
    return {"score": float(data["fid"]), "diff": float(paired["fid_diff"]),
            "diff_ci_low": float(paired["fid_diff_ci_low"]), "diff_ci_high": float(paired["fid_diff_ci_high"])}


def check_search_args(*, family, template, knob, low, high, cheaper, resolution, integer, budget, grid, headline,
                      margin, previous, metrics_root) -> Family:
    """The one check pass: every flag before any file is read."""
    require(bool(family) and all(ch.isalnum() or ch in "_-" for ch in family),
            f"--family must be letters, digits, _ and - (a wildcard-safe id); got {family!r}")
    require("{" + knob + "}" in template, f"--template {template!r} has no {{{knob}}} placeholder for --knob {knob}")
    require(headline in HEADLINES, f"--headline must be one of {', '.join(HEADLINES)}; got {headline!r}")
    require(0 <= margin < 1, f"--margin must be in [0, 1); got {margin}")
    require(is_number(budget) and budget >= 0, f"--budget must be >= 0; got {budget}")
    spec = Family(knob=knob, low=low, high=high, cheaper=cheaper, resolution=resolution, integer=integer)
    for value in grid or []:
        require(low <= value <= high, f"--grid {value} is outside [{low}, {high}]")
    require(previous is not None or grid is not None, "round 0 needs --grid (the family's grid values; may be empty)")
    require(Path(metrics_root).is_dir(), f"--metrics-root {metrics_root} is not a folder")
    return spec


def observe(metrics_root: Path, headline: str, limit: float, name: str, value, round_: int, source: str) -> dict:
    score = read_score(metrics_root, name, headline)
    verdict = paired_verdict(score["diff_ci_high"], limit)
    return {"round": round_, "source": source, "set": name, "value": value, **score, "verdict": verdict,
            "passed": verdict in ("equal", "better")}


def run_search(*, family: str, template: str, knob: str, low: float, high: float, cheaper: str, resolution: float,
               integer: bool, budget: int, grid: list | None, headline: str, margin: float, previous: str | None,
               metrics_root: str, output: str, label: str | None = None) -> dict:
    """One round: the trace so far plus the next probe (or done), written to `output`. `label`
    names the family in the tables and the search-trace figure (default: its id)."""
    spec = check_search_args(family=family, template=template, knob=knob, low=low, high=high, cheaper=cheaper,
                             resolution=resolution, integer=integer, budget=budget, grid=grid, headline=headline,
                             margin=margin, previous=previous, metrics_root=metrics_root)
    metrics_root = Path(metrics_root)
    head = {"format": FORMAT, "family": family, "label": label or family, "template": template, "knob": knob, "low": low, "high": high,
            "cheaper": cheaper, "resolution": resolution, "integer": integer, "budget": budget,
            "headline": headline, "margin": margin}
    if previous is None:
        full = read_json(metrics_root / "full" / f"{HEADLINES[headline]['file']}.json") \
            if (metrics_root / "full" / f"{HEADLINES[headline]['file']}.json").is_file() else None
        require(full is not None, f"{metrics_root / 'full'}: the full model's score is missing (duodiff score)")
        full_score = float(full["fid"])
        limit = margin * full_score
        round_ = 0
        grid_values = [int(v) if integer else float(v) for v in grid]
        probes = [observe(metrics_root, headline, limit, set_name(template, knob, v, integer), v, 0, "grid")
                  for v in dict.fromkeys(grid_values)]
    else:
        before = read_json(previous)
        require(before.get("format") == FORMAT, f"--previous {previous}: not a round file of duodiff search")
        changed = [key for key in FAMILY_KEYS if before.get(key) != head[key]]
        require(not changed, f"--previous {previous} was searched with other {', '.join(changed)}: start again "
                             f"from round 0")
        require(not before["done"], f"--previous {previous} is done ({before['reason']}): there is no next round")
        full_score, limit, round_ = before["full_score"], before["quality_limit"], before["round"] + 1
        probes = before["probes"] + [observe(metrics_root, headline, limit, before["next"], before["next_value"],
                                             round_, "search")]
    n_probed = sum(p["source"] == "search" for p in probes)
    result = next_probe(spec, [Probe(p["value"], p["passed"]) for p in probes], budget, n_probed)
    by_value = {p["value"]: p["set"] for p in probes}
    record = {**head, "score_name": HEADLINES[headline]["name"], "full_score": full_score, "quality_limit": limit,
              "round": round_, "probes": probes, "done": result.done,
              "next": None if result.done else set_name(template, knob, result.next, integer),
              "next_value": result.next, "reason": result.reason,
              "best": None if result.best is None else by_value[result.best], "best_value": result.best,
              "note": result.note}
    write_json(output, record)
    print(f"{family} round {round_}: " + (f"done, {result.reason}; cheapest pass: {record['best'] or 'none'}"
                                          if result.done else f"next probe {record['next']}"))
    return record


def finish_search(*, last_round: str, output: str) -> dict:
    """A family's finished search (`duodiff search-result`): its last round file, checked to be a
    round file of a search that is done, written to `output` (the workflow's search.json, a path
    known before the search runs, which the tables and the timing job read)."""
    require(Path(last_round).is_file(), f"--last-round {last_round} does not exist")
    try:
        final = read_json(last_round)
    except ValueError as error:
        raise DuodiffError(f"--last-round {last_round}: not valid JSON: {error}") from None
    require(isinstance(final, dict) and final.get("format") == FORMAT,
            f"--last-round {last_round}: not a round file of duodiff search")
    require(final["done"], f"--last-round {last_round}: the search of {final['family']} is not done "
                           f"(round {final['round']} asks for {final['next']})")
    write_json(output, final)
    print(f"{final['family']}: {final['reason']} after {final['round']} round(s); cheapest pass: {final['best'] or 'none'}")
    return final


def add_cli(subparsers):
    p = subparsers.add_parser("search", help="one round of an operating-point search: the next probe of a family")
    add_flag(p, "--family", required=True, help="the family's id (wildcard-safe: early_exit-attention_probe)")
    add_flag(p, "--label", default=None, help="the family as tables and figures name it (default: its id)")
    add_flag(p, "--template", required=True, help="its set names with the knob as placeholder: duodiff_d3_ts{t_switch}")
    add_flag(p, "--knob", required=True, help="the placeholder's name: threshold, t_switch, steps")
    add_flag(p, "--low", type=float, required=True, help="the knob's domain, low end")
    add_flag(p, "--high", type=float, required=True, help="the knob's domain, high end")
    add_flag(p, "--cheaper", choices=["higher", "lower"], required=True, help="which way the knob gets cheaper")
    add_flag(p, "--resolution", type=float, required=True, help="the smallest knob step probed")
    add_flag(p, "--integer", action=argparse.BooleanOptionalAction, default=False, help="integer knob")
    add_flag(p, "--budget", type=int, required=True, help="probes of the search (the grid's are free)")
    add_flag(p, "--grid", type=float, nargs="*", default=None, help="round 0: the family's grid values")
    add_flag(p, "--previous", default=None, help="round r > 0: round r-1's file")
    add_flag(p, "--headline", choices=list(HEADLINES), required=True, help="the headline score (metrics.headline)")
    add_flag(p, "--margin", type=float, required=True, help="equal-quality margin (metrics.equal_quality_margin)")
    add_flag(p, "--metrics-root", required=True, help="results/<experiment>/metrics")
    add_flag(p, "--output", required=True, help="round<r>.json")
    p.set_defaults(func=lambda a: run_search(
        family=a.family, label=a.label, template=a.template, knob=a.knob, low=a.low, high=a.high, cheaper=a.cheaper,
        resolution=a.resolution, integer=a.integer, budget=a.budget, grid=a.grid, headline=a.headline,
        margin=a.margin, previous=a.previous, metrics_root=a.metrics_root, output=a.output))
    p = subparsers.add_parser("search-result", help="a family's finished search: its last round, checked")
    add_flag(p, "--last-round", required=True, help="the round<r>.json that says done")
    add_flag(p, "--output", required=True, help="search.json")
    p.set_defaults(func=lambda a: finish_search(last_round=a.last_round, output=a.output))
