"""Every set against the full model: speed-ups, the paired test of equal quality, and per method
family the fastest setting that passes it (operating_points.csv, "Speed-up at equal quality" in
the summaries).

Every generated set starts sample i from the full model's noise and label, so its headline score
is compared with the full model's on the paired difference D = score(set) - score(full) and its
95% interval (duodiff.metrics.paired). Equal quality is non-inferiority: the interval's upper end
is at most the margin, a fraction of the full model's score (metrics.equal_quality_margin)."""

from __future__ import annotations

import math
import re

import pandas as pd

from duodiff.core.study import COMPOSED_KNOBS, SET_NAME_TEMPLATES, composed_family_label, parse_set_form

VERDICTS = ("better", "equal", "worse")


def paired_verdict(diff_high: float, limit: float) -> str:
    """Equal quality as non-inferiority on the paired difference D = score(set) - score(full):
    "better" when the upper end of D's 95% interval is below 0, "equal" when it is at most the
    margin `limit` (in the score's units), else "worse" (not shown to be within the margin). ""
    without a paired interval (the full model itself, the real images, metrics.intervals: false)."""
    if math.isnan(diff_high) or math.isnan(limit):
        return ""
    if diff_high < 0:
        return "better"
    return "equal" if diff_high <= limit else "worse"


def add_comparisons(frame: pd.DataFrame, margin: float) -> pd.DataFrame:
    """frame (one row per set, `full` among them) with every set's cost and headline score set
    against the full model's: layer ratio at the full model's depth, speed-ups, and the paired
    verdict at the equal-quality margin (a fraction of the full model's headline score)."""
    full = frame.loc[frame["set"] == "full"].iloc[0]
    # gflops.json's layer ratio is relative to the depth of the set's own (deepest) network, so a
    # shallow set alone reads 1.0; rescale every set to the full model's depth, the one reference
    # that makes the column comparable across methods.
    frame["layer_ratio"] = frame["layer_ratio"] * frame["depth"] / full["depth"]
    own = frame["timing_source"] == "sampling"  # not timed alone (no timing.json): the sampling jobs' own ratio
    frame.loc[own, "speedup_measured"] = frame.loc[own, "images_per_s"] / full["images_per_s"]
    frame.loc[own, ["speedup_measured_ci_low", "speedup_measured_ci_high"]] = math.nan
    for column in ("speedup_measured", "speedup_measured_ci_low", "speedup_measured_ci_high"):
        frame[column] = pd.to_numeric(frame[column])
    frame["speedup_theoretical"] = full["gflops_per_image"] / frame["gflops_per_image"]
    frame["margin"] = margin
    frame["quality_limit"] = margin * full["score"]
    frame["verdict"] = [paired_verdict(high, limit)
                        for high, limit in zip(frame["score_diff_ci_high"], frame["quality_limit"])]
    return frame


def passes(frame: pd.DataFrame) -> pd.Series:
    """The sets of equal (or better) quality than the full model by the paired test."""
    return frame["verdict"].isin(["equal", "better"])


OPERATING_POINT_COLUMNS = ["method", "family", "set", "setting", "setting_label", "score_name", "score", "score_ci_low",
                           "score_ci_high", "score_diff", "score_diff_ci_low", "score_diff_ci_high", "verdict",
                           "margin", "quality_limit", "full_score", "full_ci_low", "full_ci_high", "layer_ratio",
                           "speedup_measured", "speedup_measured_ci_low", "speedup_measured_ci_high",
                           "speedup_theoretical", "note"]


def with_cache_fields(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with caching's N and k as columns (cache_interval, cache_keep): the tables' csv
    files do not carry them, the cache sets' names do (cache_N<N>_k<k>)."""
    if "cache_keep" in frame and "cache_interval" in frame and "router_threshold" in frame:
        return frame
    frame = frame.copy()
    fields = [parse_set_form(name)[1] if method in ("cache", "l2c", "composed") else {}
              for name, method in zip(frame["set"], frame["method"])]
    for column in ("cache_interval", "cache_keep"):
        frame[column] = pd.array([int(f[column]) if column in f else None for f in fields], dtype="Int64")
    # Learning-to-Cache's threshold, from l2c_thr<τ>
    frame["router_threshold"] = [float(f["router_threshold"]) if "router_threshold" in f else None for f in fields]
    return frame


def method_families(frame: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """The methods an operating point is chosen for: (method, family label, its sets) for fewer
    steps, early exit per classifier type, DuoDiff per shallow depth and caching per keep_blocks."""
    families = []
    frame = with_cache_fields(frame)
    sets = frame[frame["method"] == "fewer_steps"]
    if len(sets):
        families.append(("fewer_steps", "fewer steps", sets))
    for classifier in frame.loc[frame["method"] == "early_exit", "classifier_type"].drop_duplicates():
        sets = frame[(frame["method"] == "early_exit") & (frame["classifier_type"] == classifier)]
        families.append(("early_exit", str(classifier), sets))
    for depth in frame.loc[frame["method"] == "duodiff", "shallow_depth"].drop_duplicates():
        sets = frame[(frame["method"] == "duodiff") & (frame["shallow_depth"] == depth)]
        families.append(("duodiff", f"shallow depth {depth}", sets))
    for keep in frame.loc[frame["method"] == "cache", "cache_keep"].drop_duplicates():
        sets = frame[(frame["method"] == "cache") & (frame["cache_keep"] == keep)].sort_values("cache_interval")
        families.append(("cache", f"k = {keep}", sets))
    sets = frame[frame["method"] == "l2c"]
    if len(sets):  # one router per study: one family, its threshold swept
        families.append(("l2c", "learned router", sets.sort_values("router_threshold")))
    families += [("composed", label, sets) for label, _, sets in composed_families(frame)]
    return families


def composed_families(frame: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """(family label, knob, its sets in knob order) of the composed sets, read from the set names
    as the rest of the tables are. One `composed` entry of the config sweeps one knob with the rest
    fixed, so its sets lie on a line: the same form and models, every knob but one equal. The
    families are every such line of two sets or more (a set on two lines, shared by two entries,
    is in both), and a family of its own for a set on none."""
    composed = frame[frame["method"] == "composed"]
    groups: dict[tuple, list[tuple[str, dict]]] = {}
    for name in composed["set"]:
        form, fields = parse_set_form(name)
        key = (form, fields.get("depth"), fields.get("classifier_type"), fields.get("cache_keep"))
        groups.setdefault(key, []).append((name, fields))
    families, on_a_line = [], set()
    for members in groups.values():
        knobs = [k for k in COMPOSED_KNOBS if k in members[0][1]]
        for knob in knobs:
            lines: dict[tuple, list[tuple[str, dict]]] = {}
            for name, fields in members:
                lines.setdefault(tuple(fields[k] for k in knobs if k != knob), []).append((name, fields))
            for line in (line for line in lines.values() if len(line) > 1):
                names = [name for name, _ in sorted(line, key=lambda member: float(member[1][knob]))]
                families.append((composed_family_label(line[0][1], knob), knob, _rows(composed, names)))
                on_a_line.update(names)
        for name, fields in members:
            if name not in on_a_line:  # a set alone: its label names every ingredient (knob None)
                families.append((composed_family_label(fields, None), knobs[0], _rows(composed, [name])))
    return families


def _rows(frame: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    return frame.set_index("set").loc[names].reset_index()


def search_family_ids(method: str, sets: pd.DataFrame) -> list[str]:
    """The ids `duodiff search` may have given a family (workflow/rules/common.smk,
    search_families): one, except for a composed family of a single set, whose knob the set name
    does not tell (one per knob it has)."""
    first = sets.iloc[0]
    if method == "early_exit":
        return [f"early_exit-{first['classifier_type']}"]
    if method == "duodiff":
        return [f"duodiff-d{first['shallow_depth']}"]
    if method == "cache":
        return [f"cache-k{first['cache_keep']}"]
    if method == "l2c":
        return ["l2c"]
    if method == "composed":
        # Its sets lie on a line (composed_families): the one field that varies is the knob, and
        # the name with that field as a placeholder is the config entry's template.
        form, fields = parse_set_form(first["set"])
        knobs = [knob for knob in COMPOSED_KNOBS if knob in fields]
        varying = [knob for knob in knobs if len({parse_set_form(name)[1][knob] for name in sets["set"]}) > 1]
        ids = []
        for knob in varying or knobs:
            template = SET_NAME_TEMPLATES[form].format(**{**fields, knob: ""})
            ids.append("composed-" + re.sub(r"[^A-Za-z0-9_-]", "", template))
        return ids
    return [method]


def _point(base: dict, pick, note: str) -> dict:
    return {**base, **{k: pick[k] for k in ("set", "setting", "setting_label", "score", "score_ci_low",
                                            "score_ci_high", "score_diff", "score_diff_ci_low", "score_diff_ci_high",
                                            "verdict", "layer_ratio", "speedup_measured", "speedup_measured_ci_low",
                                            "speedup_measured_ci_high", "speedup_theoretical")},
            "note": note}


def _none_passes(base: dict, sets: pd.DataFrame, full, prefix: str = "") -> dict:
    if sets["score_diff_ci_high"].isna().all():
        return {**base, "note": f"{prefix}none passes"}
    closest = sets.loc[sets["score_diff_ci_high"].idxmin()]
    return {**base, "note": f"{prefix}none passes; closest: {closest['setting_label']}, Δ{full['score_name']} "
                            f"{closest['score_diff']:+.3g} [{closest['score_diff_ci_low']:+.3g}, "
                            f"{closest['score_diff_ci_high']:+.3g}] > margin {full['quality_limit']:.3g} "
                            f"({closest['set']})"}


def _searched_point(base: dict, final: dict, rows: pd.DataFrame, full) -> dict:
    """The operating point a search found (its last round file, duodiff.search.rounds): the
    cheapest passing setting, whatever the grid's best; `rows` holds every set's and probe's row,
    of which the search's (its grid and its probes) are its pool."""
    pool = rows[rows["set"].isin([p["set"] for p in final["probes"]])]
    n = sum(p["source"] == "search" for p in final["probes"])
    said = f"found by search ({n} probe{'s' if n != 1 else ''}, {final['reason']}; search.csv)"
    said += f"; {final['note']}" if final["note"] else ""
    if final["best"] is None:
        return _none_passes(base, pool, full, prefix=said + ": ")
    pick = pool[pool["set"] == final["best"]]
    if pick.empty:  # the search's best is the grid's or a probe's; anything else is a wiring bug
        raise ValueError(f"search {final['family']}: its best set {final['best']} is not among the tables' sets")
    return _point(base, pick.iloc[0], said)


def operating_points(frame: pd.DataFrame) -> pd.DataFrame:
    """Speed-up at equal quality: per method family, the fastest set (highest theoretical speed-up,
    i.e. fewest GFLOPs per image; measured speed-up breaks ties) that passes the paired test
    (paired_verdict: the upper end of its paired difference to the full model's headline score
    at most the margin). A family with no such set gets a row that says so and names the closest
    set (the lowest upper end).

    Where a search ran (frame.attrs["search"]: {"finals": each family's last round file, "probes":
    the probe sets' rows as records}), the family's point is the setting the search found instead: the grid
    stays for the figures, the headline reports the search."""
    full = frame.loc[frame["set"] == "full"].iloc[0]
    search = frame.attrs.get("search") or {}
    searches = {final["family"]: final for final in search.get("finals", [])}
    every_row = pd.concat([frame, pd.DataFrame(search["probes"], columns=frame.columns)]) if search else frame
    rows = []
    for method, family, sets in method_families(frame):
        base = {"method": method, "family": family, "score_name": full["score_name"], "full_score": full["score"],
                "full_ci_low": full["score_ci_low"], "full_ci_high": full["score_ci_high"],
                "margin": full["margin"], "quality_limit": full["quality_limit"]}
        if sets["score_diff_ci_high"].isna().all():
            rows.append({**base, "note": "no paired intervals (metrics.intervals: false, or sets scored without "
                                         "a baseline): equal quality cannot be tested"})
            continue
        family_id = next((i for i in search_family_ids(method, sets) if i in searches), None)
        if family_id is not None:
            rows.append(_searched_point(base, searches.pop(family_id), every_row, full))
            continue
        good = sets[passes(sets)]
        if good.empty:
            rows.append(_none_passes(base, sets, full))
            continue
        pick = good.sort_values(["speedup_theoretical", "speedup_measured"], ascending=False).iloc[0]
        rows.append(_point(base, pick, ""))
    for family_id, final in searches.items():  # a searched family without grid sets of its method (composed)
        base = {"method": "search", "family": family_id, "score_name": full["score_name"],
                "full_score": full["score"], "full_ci_low": full["score_ci_low"], "full_ci_high": full["score_ci_high"],
                "margin": full["margin"], "quality_limit": full["quality_limit"]}
        rows.append(_searched_point(base, final, every_row, full))
    return pd.DataFrame(rows, columns=OPERATING_POINT_COLUMNS)
