"""Every set against the full model: speed-ups, where its headline score stands to the full model's
95% interval, and per method family the fastest setting that matches the full model's quality
(operating_points.csv, "Speed-up at equal quality" in the summaries)."""

from __future__ import annotations

import math

import pandas as pd


def compare_to_full(score: float, low: float, high: float, full_low: float, full_high: float) -> str:
    """How a set's headline score stands to the full model's 95% interval:
    "worse" / "better" when the two intervals do not overlap (the set differs beyond the
    uncertainty of both), "within" when the score lies inside the full model's interval, else
    "overlaps" (not distinguishable, but not inside the interval either). "" when either set has
    no interval."""
    if any(math.isnan(v) for v in (score, low, high, full_low, full_high)):
        return ""
    if low > full_high:
        return "worse"
    if high < full_low:
        return "better"
    return "within" if full_low <= score <= full_high else "overlaps"


def add_comparisons(frame: pd.DataFrame) -> pd.DataFrame:
    """frame (one row per set, `full` among them) with every set's cost and headline score set
    against the full model's: layer ratio at the full model's depth, speed-ups, score_vs_full."""
    full = frame.loc[frame["set"] == "full"].iloc[0]
    # gflops.json's layer ratio is relative to the depth of the set's own (deepest) network, so a
    # shallow set alone reads 1.0; rescale every set to the full model's depth, the one reference
    # that makes the column comparable across methods.
    frame["layer_ratio"] = frame["layer_ratio"] * frame["depth"] / full["depth"]
    frame["speedup_measured"] = frame["images_per_s"] / full["images_per_s"]
    frame["speedup_theoretical"] = full["gflops_per_image"] / frame["gflops_per_image"]
    frame["score_vs_full"] = [
        "" if name == "full" else compare_to_full(score, low, high, full["score_ci_low"], full["score_ci_high"])
        for name, score, low, high in zip(frame["set"], frame["score"], frame["score_ci_low"], frame["score_ci_high"])
    ]
    return frame


def quality_limit(full) -> float:
    """The worst headline score at which a set still matches the full model: the upper end of the
    full model's 95% interval, or its score where there is no interval."""
    return float(full["score"] if pd.isna(full["score_ci_high"]) else full["score_ci_high"])


OPERATING_POINT_COLUMNS = ["method", "family", "set", "setting", "score_name", "score", "score_ci_low",
                           "score_ci_high", "full_score", "full_ci_low", "full_ci_high", "layer_ratio",
                           "speedup_measured", "speedup_theoretical", "note"]


def method_families(frame: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """The methods an operating point is chosen for: (method, family label, its sets) for fewer
    steps, early exit per classifier type and DuoDiff per shallow depth."""
    families = []
    sets = frame[frame["method"] == "fewer_steps"]
    if len(sets):
        families.append(("fewer_steps", "fewer steps", sets))
    for classifier in frame.loc[frame["method"] == "early_exit", "classifier_type"].drop_duplicates():
        sets = frame[(frame["method"] == "early_exit") & (frame["classifier_type"] == classifier)]
        families.append(("early_exit", str(classifier), sets))
    for depth in frame.loc[frame["method"] == "duodiff", "shallow_depth"].drop_duplicates():
        sets = frame[(frame["method"] == "duodiff") & (frame["shallow_depth"] == depth)]
        families.append(("duodiff", f"shallow depth {depth}", sets))
    return families


def operating_points(frame: pd.DataFrame) -> pd.DataFrame:
    """Speed-up at equal quality: per method family, the fastest set (highest theoretical speed-up,
    i.e. fewest GFLOPs per image; measured speed-up breaks ties) whose headline score is no worse
    than the upper end of the full model's 95% interval, i.e. inside that interval or below it.
    A family with no such set gets a row that says so (set and numbers empty)."""
    full = frame.loc[frame["set"] == "full"].iloc[0]
    limit = full["score_ci_high"]
    rows = []
    for method, family, sets in method_families(frame):
        base = {"method": method, "family": family, "score_name": full["score_name"], "full_score": full["score"],
                "full_ci_low": full["score_ci_low"], "full_ci_high": limit}
        if math.isnan(limit):
            rows.append({**base, "note": "the full model's score has no interval (metrics.intervals: false)"})
            continue
        good = sets[sets["score"] <= limit]
        if good.empty:
            best = sets.loc[sets["score"].idxmin()]
            rows.append({**base, "note": f"no setting within the full model's interval (best: {best['set']}, "
                                         f"{full['score_name']} {best['score']:.3g})"})
            continue
        pick = good.sort_values(["speedup_theoretical", "speedup_measured"], ascending=False).iloc[0]
        rows.append({**base, **{k: pick[k] for k in ("set", "setting", "score", "score_ci_low", "score_ci_high",
                                                     "layer_ratio", "speedup_measured", "speedup_theoretical")},
                     "note": ""})
    return pd.DataFrame(rows, columns=OPERATING_POINT_COLUMNS)
