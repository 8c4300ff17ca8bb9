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

Rows are ordered like the papers' tables: full model, shallow model alone, early exit (by
classifier, then threshold), DuoDiff (by shallow depth, then t_switch). Speed-ups are relative to
the `full` set, which must be among the sets.
"""

from __future__ import annotations

import argparse

import html
import math
from pathlib import Path

import pandas as pd

from duodiff.errors import DuodiffError, require
from duodiff.flags import add_flag
from duodiff.io import atomic_path, read_json, write_text
from duodiff.study import METHOD_ORDER, STATS_METHOD, method_of_set, setting_label

# The headline score (metrics.headline): which metric file it is read from and how it is named.
HEADLINES = {
    "inception": {"file": "fid", "name": "FID", "kid_name": "KID", "long": "FID (Inception, clean-fid)"},
    "classifier": {"file": "fd_classifier", "name": "FD", "kid_name": "KD",
                   "long": "Fréchet distance in the features of the dataset's own classifier"},
}

# Keys each input file must have (the contract); anything else in them is ignored.
REQUIRED_KEYS = {
    "stats.json": ["method", "setting", "threshold", "t_switch", "classifier_type", "sampler",
                   "steps", "n_samples", "batch_size", "seed", "depth", "shallow_depth",
                   "images_per_s", "device", "torch_version"],
    "fid.json": ["fid", "kid", "kid_std", "n_samples", "n_reference", "feature_network",
                 "feature_network_sha256", "notes"],
    "fd_classifier.json": ["fid", "fid_ci_low", "fid_ci_high", "kid", "kid_ci_low", "kid_ci_high", "n_samples",
                           "n_reference", "feature_network", "feature_network_sha256", "notes"],
    "real_stats.json": ["method", "n_samples", "notes"],
    "cmmd.json": ["cmmd", "available", "reason", "n_samples", "embedding_model"],
    "gflops.json": ["gflops_per_forward", "gflops_per_forward_linear_conv", "gflops_per_image",
                    "layer_ratio", "theoretical"],
}

# The columns every csv starts with (the contract's list, plus the sampling set-up the plots
# need: sampler, steps, depth, seed).
ID_COLUMNS = ["set", "method", "setting", "classifier_type", "threshold", "t_switch",
              "shallow_depth", "depth", "sampler", "steps", "seed", "n_samples"]
INTEGER_COLUMNS = ["t_switch", "shallow_depth", "depth", "steps", "seed", "n_samples"]
SPEED_COLUMNS = ["gflops_per_forward", "gflops_per_image", "layer_ratio", "images_per_s",
                 "speedup_measured", "speedup_theoretical"]
SCORE_COLUMNS = ["score_name", "score", "score_ci_low", "score_ci_high", "score_vs_full"]
CSV_COLUMNS = {
    "scores": ID_COLUMNS + SCORE_COLUMNS + ["kid_headline", "kid_headline_ci_low", "kid_headline_ci_high"]
    + SPEED_COLUMNS + ["score_n_samples", "score_n_reference", "score_network"],
    "fid": ID_COLUMNS + ["fid", "fid_ci_low", "fid_ci_high"] + SPEED_COLUMNS + ["feature_network", "n_reference"],
    "kid": ID_COLUMNS + ["kid", "kid_std", "kid_ci_low", "kid_ci_high", "feature_network", "n_reference"],
    "cmmd": ID_COLUMNS + ["cmmd", "available", "reason", "embedding_model"],
    "gflops": ID_COLUMNS + ["gflops_per_forward", "gflops_per_forward_linear_conv",
                            "gflops_per_image", "layer_ratio", "images_per_s",
                            "speedup_measured", "speedup_theoretical"],
}

# Summary columns: (column in the data, Markdown header, LaTeX header, which value is best). The
# headline score's two columns come first, named by the headline (summary_columns).
SUMMARY_COLUMNS = [
    ("fid", "FID ↓", r"FID$\downarrow$", "min"),
    ("kid", "KID×10³ ↓", r"KID$\times10^3\downarrow$", "min"),
    ("cmmd", "CMMD ↓", r"CMMD$\downarrow$", "min"),
    ("gflops_per_forward", "GFLOPs/fwd ↓", r"GFLOPs/fwd$\downarrow$", "min"),
    ("layer_ratio", "Layer ratio", "Layer ratio", None),
    ("images_per_s", "Images/s ↑", r"Images/s$\uparrow$", "max"),
    ("speedup_measured", "Speed-up (measured) ↑", r"Speed-up (meas.)$\uparrow$", "max"),
    ("speedup_theoretical", "Speed-up (theoretical) ↑", r"Speed-up (theor.)$\uparrow$", "max"),
]
# Marks on a headline score whose interval does not overlap the full model's (compare_to_full).
DIFFERS_MARK = {"worse": ("†", r"\textsuperscript{\dag}"), "better": ("‡", r"\textsuperscript{\ddag}")}


def cmmd_computed(frame: pd.DataFrame) -> bool:
    """Whether any set has a CMMD value; without one (no CLIP weights) the summary has no CMMD
    column, only a note that says why (_cmmd_notes)."""
    return bool(frame["cmmd"].notna().any())


def summary_columns(frame: pd.DataFrame) -> list[tuple[str, str, str, str | None]]:
    """SUMMARY_COLUMNS, led by the headline score and its KID when the headline is not Inception;
    CMMD only where some set has it."""
    name = frame["score_name"].iloc[0]
    # "[95% CI]" only where intervals were computed (metrics.intervals).
    ci, ci_tex = (" [95% CI]", r" [95\% CI]") if frame["score_ci_low"].notna().any() else ("", "")
    metrics = [c for c in SUMMARY_COLUMNS if c[0] != "cmmd" or cmmd_computed(frame)]
    if name == "FID":
        return [("score", f"FID{ci} ↓", rf"FID{ci_tex}$\downarrow$", "min")] + metrics[1:]
    return [
        ("score", f"{name}{ci} ↓", rf"{name}{ci_tex}$\downarrow$", "min"),
        ("kid_headline", f"KD×10³{ci} ↓", rf"KD$\times10^3${ci_tex}$\downarrow$", "min"),
    ] + metrics


# Least display precision of each summary column; a column of small numbers (the GFLOPs of an
# 8x8 model) gets more, see `decimals`. Best-value marking compares the displayed (rounded)
# values, so two numbers that print the same are both bold.
DECIMALS = {"score": 2, "kid_headline": 2, "fid": 2, "kid": 2, "cmmd": 3, "gflops_per_forward": 2,
            "layer_ratio": 3, "images_per_s": 1, "speedup_measured": 2, "speedup_theoretical": 2}
SIGNIFICANT_DIGITS = 2  # at least this many for the smallest non-zero value of a column
KID_SCALE = 1e3  # KID is printed x10^3, as is usual in papers
KID_COLUMNS = ("kid", "kid_headline")
COST_COLUMNS = ("gflops_per_forward", "images_per_s", "speedup_measured", "speedup_theoretical")
SUPERSCRIPTS = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


def check_sets(sets) -> list[str]:
    sets = list(sets or [])
    require(len(sets) > 0, "--sets must name at least one sample set; got none")
    duplicates = sorted({s for s in sets if sets.count(s) > 1})
    require(not duplicates, f"--sets names {', '.join(duplicates)} more than once")
    for name in sets:
        method_of_set(name)
    require("full" in sets, f"--sets must include 'full' (speed-ups are relative to it); got {' '.join(sets)}")
    return sets


def _read(path: Path, contract: str | None = None) -> dict:
    """A JSON input, checked against REQUIRED_KEYS[contract] (default: its file name)."""
    require(path.is_file(), f"{path} does not exist")
    try:
        data = read_json(path)
    except ValueError as error:
        raise DuodiffError(f"{path}: not valid JSON: {error}") from None
    require(isinstance(data, dict), f"{path}: expected a JSON object, found {type(data).__name__}")
    missing = [key for key in REQUIRED_KEYS[contract or path.name] if key not in data]
    require(not missing, f"{path}: missing {', '.join(missing)}")
    return data


def _number(path: Path, data: dict, key: str, positive: bool = False) -> float:
    value = data[key]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    require(ok and (value > 0 or not positive),
            f"{path}: {key} must be a {'positive' if positive else 'finite'} number; got {value!r}")
    return float(value)


def _interval(path: Path, data: dict, key: str) -> tuple[float, float]:
    """(low, high) of a score's 95% interval; NaNs when the file has none (intervals off, or a
    file from before intervals existed)."""
    low, high = data.get(f"{key}_ci_low"), data.get(f"{key}_ci_high")
    if low is None or high is None:
        return math.nan, math.nan
    return _number(path, data, f"{key}_ci_low"), _number(path, data, f"{key}_ci_high")


def _scores(metrics_root, name: str, headline: str) -> dict:
    """The set's Inception FID/KID and its headline score, with their intervals, as columns."""
    fid_path = Path(metrics_root) / name / "fid.json"
    fid = _read(fid_path)
    row = {
        "fid": _number(fid_path, fid, "fid"),
        "kid": _number(fid_path, fid, "kid"),
        "kid_std": _number(fid_path, fid, "kid_std"),
        "fid_n_samples": fid["n_samples"], "n_reference": fid["n_reference"],
        "feature_network": fid["feature_network"],
        "feature_network_sha256": fid["feature_network_sha256"], "fid_notes": list(fid["notes"] or []),
    }
    row["fid_ci_low"], row["fid_ci_high"] = _interval(fid_path, fid, "fid")
    row["kid_ci_low"], row["kid_ci_high"] = _interval(fid_path, fid, "kid")
    spec = HEADLINES[headline]
    score_path = Path(metrics_root) / name / f"{spec['file']}.json"
    score = fid if spec["file"] == "fid" else _read(score_path)
    row.update({
        "score_name": spec["name"], "score": _number(score_path, score, "fid"),
        "kid_headline": _number(score_path, score, "kid"),
        "score_n_samples": score["n_samples"], "score_n_reference": score["n_reference"],
        "score_network": score["feature_network"], "score_notes": list(score["notes"] or []),
    })  # fmt: skip
    row["score_ci_low"], row["score_ci_high"] = _interval(score_path, score, "fid")
    row["kid_headline_ci_low"], row["kid_headline_ci_high"] = _interval(score_path, score, "kid")
    return row


CMMD_OFF = "not computed: CMMD is switched off for this experiment (metrics.cmmd.enabled: false)"


def _cmmd(metrics_root, name: str, cmmd: bool) -> dict:
    if not cmmd:
        return {"cmmd": None, "available": False, "reason": CMMD_OFF, "cmmd_n_samples": None, "embedding_model": None}
    path = Path(metrics_root) / name / "cmmd.json"
    cmmd = _read(path)
    value = cmmd["cmmd"] if cmmd["available"] else None
    if value is not None:
        value = _number(path, cmmd, "cmmd")
    reason = cmmd["reason"]
    if value is None and not reason:
        reason = "CMMD was not computed"
    return {
        "cmmd": value, "available": bool(cmmd["available"]) and value is not None,
        "reason": None if value is not None else reason,
        "cmmd_n_samples": cmmd["n_samples"], "embedding_model": cmmd["embedding_model"],
    }


def read_real(samples_root, metrics_root, headline: str, cmmd: bool = True) -> dict:
    """The real-data row: held-out real images scored like a sample set (no sampling, no cost)."""
    stats_path = Path(samples_root) / "real" / "stats.json"
    stats = _read(stats_path, "real_stats.json")
    require(stats["method"] == "real", f"{stats_path}: method is {stats['method']!r}, expected 'real'")
    return {
        "set": "real", "method": "real", "setting": setting_label({"method": "real"}, style="stats"),
        "n_samples": stats["n_samples"], "real_notes": list(stats["notes"] or []),
        **_scores(metrics_root, "real", headline), **_cmmd(metrics_root, "real", cmmd),
    }  # fmt: skip


def read_set(samples_root, metrics_root, name: str, headline: str = "inception", cmmd: bool = True) -> dict:
    """One sample set's row: its stats.json and metric files merged into flat columns."""
    if name == "real":
        return read_real(samples_root, metrics_root, headline, cmmd)
    stats_path = Path(samples_root) / name / "stats.json"
    gflops_path = Path(metrics_root) / name / "gflops.json"
    stats = _read(stats_path)
    gflops = _read(gflops_path)

    method = method_of_set(name)
    recorded = STATS_METHOD.get(method, method)
    require(stats["method"] == recorded,
            f"{stats_path}: method is {stats['method']!r} but the set name {name!r} says {recorded!r}")
    shallow_depth = stats["shallow_depth"]
    if method == "shallow" and shallow_depth is None:
        shallow_depth = stats["depth"]  # a shallow set is one U-ViT: its depth is the shallow depth

    return {
        "set": name, "method": method, "setting": stats["setting"],
        "classifier_type": stats["classifier_type"], "threshold": stats["threshold"],
        "t_switch": stats["t_switch"], "shallow_depth": shallow_depth, "depth": stats["depth"],
        "sampler": stats["sampler"], "steps": stats["steps"], "seed": stats["seed"],
        "n_samples": stats["n_samples"], "batch_size": stats["batch_size"],
        "device": stats["device"], "torch_version": stats["torch_version"],
        "timing_clock": stats.get("timing_clock", "wall"),  # sets sampled before it was recorded: wall
        "precision": stats.get("precision", "fp32"),  # sets sampled before --precision existed: fp32
        **_scores(metrics_root, name, headline),
        **_cmmd(metrics_root, name, cmmd),
        "gflops_per_forward": _number(gflops_path, gflops, "gflops_per_forward", positive=True),
        "gflops_per_forward_linear_conv": _number(gflops_path, gflops, "gflops_per_forward_linear_conv", positive=True),
        "gflops_per_image": _number(gflops_path, gflops, "gflops_per_image", positive=True),
        "layer_ratio": _number(gflops_path, gflops, "layer_ratio"),
        "gflops_convention": gflops["theoretical"],
        "images_per_s": _number(stats_path, stats, "images_per_s", positive=True),
    }


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
    return (METHOD_ORDER.index(method), "", number(row["shallow_depth"]), 0.0)


def collect(samples_root, metrics_root, sets, headline: str = "inception", cmmd: bool = True) -> pd.DataFrame:
    """All sets' rows in paper order, with speed-ups relative to `full` and each headline score
    placed against the full model's interval (score_vs_full, see compare_to_full)."""
    sets = check_sets(sets)
    rows = sorted((read_set(samples_root, metrics_root, name, headline, cmmd) for name in sets), key=_order_key)
    frame = pd.DataFrame(rows)
    for column in ID_COLUMNS + SPEED_COLUMNS + ["batch_size", "device", "torch_version", "timing_clock",
                                                "precision", "gflops_per_forward_linear_conv", "gflops_convention"]:
        if column not in frame:  # a study of the real set alone has no sampling columns
            frame[column] = None
    for column in INTEGER_COLUMNS:  # nullable integers, so t_switch 300 stays "300", not "300.0"
        frame[column] = frame[column].astype("Int64")
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


# ---- speed-up at equal quality ---------------------------------------------------------------------

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


def decimals(column: str, values) -> int:
    """Decimals that show every value of a summary column with SIGNIFICANT_DIGITS digits."""
    values = pd.to_numeric(pd.Series(values), errors="coerce").abs()
    values = values[values > 0]
    if values.empty:
        return DECIMALS[column]
    return max(DECIMALS[column], SIGNIFICANT_DIGITS - 1 - math.floor(math.log10(values.min())))


def blocks(n) -> str:
    return f"{n} block" if n == 1 else f"{n} blocks"


def method_label(row) -> str:
    """How a set's method reads in tables and legends."""
    method = row["method"]
    if method == "real":
        return "Real data (held out)"
    if method == "full":
        return f"U-ViT ({blocks(row['depth'])})"
    if method == "fewer_steps":
        return f"U-ViT ({blocks(row['depth'])}), fewer steps"
    if method == "shallow":
        return f"U-ViT shallow ({blocks(row['shallow_depth'])})"
    if method == "early_exit":
        return f"Early exit, {row['classifier_type']}"
    return f"DuoDiff ({row['shallow_depth']} + {row['depth']} blocks)"


def quality_limit(full) -> float:
    """The worst headline score at which a set still matches the full model: the upper end of the
    full model's 95% interval, or its score where there is no interval."""
    return float(full["score"] if pd.isna(full["score_ci_high"]) else full["score_ci_high"])


def contenders(frame: pd.DataFrame, column: str) -> pd.Series:
    """The rows that may hold a summary column's best value. Quality: every generated set (the
    real-data row is the floor, not a contender). Cost: only the compared methods' sets (not the
    shallow model alone, DuoDiff's first stage, cheapest by construction) whose headline score
    matches the full model's (quality_limit): a cheaper set of worse quality is no better trade."""
    generated = frame["method"] != "real"
    if column not in COST_COLUMNS:
        return generated
    full = frame.loc[frame["set"] == "full"].iloc[0]
    return generated & (frame["method"] != "shallow") & (frame["score"] <= quality_limit(full))


def best_mask(frame: pd.DataFrame) -> pd.DataFrame:
    """True where a summary cell holds its column's best value (compared as displayed) among the
    column's contenders."""
    columns = summary_columns(frame)
    mask = pd.DataFrame(False, index=frame.index, columns=[c for c, *_ in columns])
    for column, _, _, best in columns:
        if best is None:
            continue
        scale = KID_SCALE if column in KID_COLUMNS else 1.0
        values = pd.to_numeric(frame[column], errors="coerce").mul(scale).where(contenders(frame, column))
        values = values.round(decimals(column, values))
        if values.notna().any():
            target = values.min() if best == "min" else values.max()
            mask[column] = values == target
    return mask


def _footnotes(frame: pd.DataFrame) -> dict[str, int]:
    """Number each distinct reason CMMD is missing (1, 2, ...), in row order; none when no set has
    CMMD (the column is left out and one note says why)."""
    numbers: dict[str, int] = {}
    if not cmmd_computed(frame):
        return numbers
    for reason in frame.loc[frame["cmmd"].isna(), "reason"]:
        numbers.setdefault(str(reason), len(numbers) + 1)
    return numbers


def _fmt(value, digits: int, suffix: str = "") -> str:
    return "–" if value is None or pd.isna(value) else f"{value:,.{digits}f}{suffix}"


def _summary_cells(frame: pd.DataFrame, footnotes: dict[str, int], latex: bool) -> pd.DataFrame:
    """The summary's cells as text (numbers rounded; n/a with a footnote mark; – where a column
    does not apply, as the cost of the real-data row), not yet bolded."""
    cells = pd.DataFrame(index=frame.index)
    cells["Method"] = frame.apply(method_label, axis=1)
    cells["Setting"] = frame.apply(setting_label, axis=1)
    pm = r" $\pm$ " if latex else " ± "
    for column, *_ in summary_columns(frame):
        scale = KID_SCALE if column in KID_COLUMNS else 1.0
        digits = decimals(column, frame[column] * scale)
        if column == "score":
            text = []
            for row in frame.itertuples():
                cell = _fmt(row.score, digits)
                if not pd.isna(row.score_ci_low):
                    cell += f" [{row.score_ci_low:.{digits}f}, {row.score_ci_high:.{digits}f}]"
                mark = DIFFERS_MARK.get(row.score_vs_full)
                text.append(cell + (mark[1 if latex else 0] if mark else ""))
        elif column == "kid_headline":
            text = [_fmt(v * KID_SCALE, digits) + ("" if pd.isna(lo) else f" [{lo * KID_SCALE:.{digits}f}, {hi * KID_SCALE:.{digits}f}]")
                    for v, lo, hi in zip(frame["kid_headline"], frame["kid_headline_ci_low"], frame["kid_headline_ci_high"])]
        elif column == "fid":
            text = [_fmt(v, digits) + ("" if pd.isna(lo) else f" [{lo:.{digits}f}, {hi:.{digits}f}]")
                    for v, lo, hi in zip(frame["fid"], frame["fid_ci_low"], frame["fid_ci_high"])]
        elif column == "kid":
            text = [f"{k * KID_SCALE:.{digits}f}{pm}{s * KID_SCALE:.{digits}f}"
                    for k, s in zip(frame["kid"], frame["kid_std"])]
        elif column == "cmmd":
            mark = (lambda n: f"\\textsuperscript{{{n}}}") if latex else (lambda n: str(n).translate(SUPERSCRIPTS))
            text = [f"n/a{mark(footnotes[str(r)])}" if pd.isna(v) else f"{v:.{digits}f}"
                    for v, r in zip(frame["cmmd"], frame["reason"])]
        elif column.startswith("speedup"):
            times = r"$\times$" if latex else "×"
            text = [_fmt(v, digits, times) for v in frame[column]]
        else:
            text = [_fmt(v, digits) for v in frame[column]]
        cells[column] = text
    return cells


def sentence(text) -> str:
    """Notes from other files, ended with exactly one full stop."""
    text = str(text).strip()
    return text if text.endswith((".", "!", "?")) else text + "."


def _notes(frame: pd.DataFrame, footnotes: dict[str, int]) -> list[str]:
    """Conventions and caveats printed under the table (plain text; the LaTeX writer escapes it)."""
    full = frame.loc[frame["set"] == "full"].iloc[0]
    real = frame[frame["method"] == "real"]
    cmmd = cmmd_computed(frame)
    frame = frame[frame["method"] != "real"]  # the notes on sampling and cost are about generated sets
    notes = [_headline_note(full)]
    if len(real):
        row = real.iloc[0]
        notes.append(f"Real data: {row['n_samples']} real images that are not in the reference, scored against it "
                     f"like a sample set: the floor no method can beat except by chance"
                     + (f" ({' '.join(sentence(n) for n in row['real_notes'])})" if row["real_notes"] else "") + ".")
    marks = frame["score_vs_full"]
    notes.append(f"† / ‡: the set's 95% interval lies wholly above / below the full model's "
                 f"({full['score_ci_low']:.4g} to {full['score_ci_high']:.4g}): worse / better beyond the uncertainty "
                 f"of both; {int((marks == 'worse').sum())} worse, {int((marks == 'better').sum())} better, "
                 f"{int(marks.isin(['within', 'overlaps']).sum())} indistinguishable."
                 if not pd.isna(full["score_ci_low"]) else
                 "No confidence intervals (metrics.intervals: false): sets cannot be told apart from noise.")

    setups = frame[["sampler", "steps", "seed"]].drop_duplicates()
    if len(setups) == 1:
        notes.append(f"Sampling: {full['sampler']} with {full['steps']} steps, seed {full['seed']} for every set.")
    elif (frame["method"] != "fewer_steps").all() or len(frame[frame["method"] != "fewer_steps"][["sampler", "steps", "seed"]].drop_duplicates()) > 1:
        per_set = "; ".join(f"{r.set}: {r.sampler} {r.steps} steps, seed {r.seed}" for r in frame.itertuples())
        notes.append(f"Sampling differs between sets ({per_set}).")
    else:
        fewer = ", ".join(str(v) for v in frame.loc[frame["method"] == "fewer_steps", "steps"])
        notes.append(f"Sampling: {full['sampler']} with {full['steps']} steps, seed {full['seed']} for every set; "
                     f"the fewer-steps sets run the full model with {fewer} steps from the same noise.")

    notes.append(_samples_note(frame, full, cmmd))

    networks = frame[["feature_network", "feature_network_sha256"]].drop_duplicates()
    described = ", ".join(f"{r.feature_network} (sha256 {str(r.feature_network_sha256)[:12]}…)"
                          for r in networks.itertuples())
    notes.append(f"FID (Inception) and KID: clean-fid, mode clean, features from {described}"
                 + (" — feature networks differ between sets, so their FIDs are not comparable." if len(networks) > 1 else "."))

    fid_notes: dict[str, list[str]] = {}
    for row in frame.itertuples():
        for text in row.fid_notes:
            fid_notes.setdefault(str(text), []).append(row.set)
    for text, sets in fid_notes.items():
        where = "all sets" if len(sets) == len(frame) else ", ".join(sets)
        notes.append(f"FID caveat ({where}): {sentence(text)}")

    conventions = frame["gflops_convention"].drop_duplicates()
    linear_conv = full["gflops_per_forward_linear_conv"]
    notes.append("GFLOPs/fwd: mean over sampling steps and samples of one network evaluation. "
                 + " ".join(sentence(c) for c in conventions)
                 + " Counting linear and conv layers only (the DeeDiff and DuoDiff papers' convention) the full "
                 f"model costs {linear_conv:.{decimals('gflops_per_forward', [linear_conv])}f} GFLOPs per forward "
                 "(gflops.csv: gflops_per_forward_linear_conv).")
    notes.append(f"Layer ratio: transformer blocks executed per network evaluation, averaged over steps and "
                 f"samples, as a fraction of the full model's {full['depth']} (1 = full model).")

    devices = frame[["device", "torch_version", "batch_size", "precision", "timing_clock"]].drop_duplicates()
    clocks = {"cpu": "timed by the CPU time of the single-threaded sampling process, which other jobs running side "
                     "by side do not slow down", "wall": "timed by the wall clock"}
    measured = ", ".join(f"{r.device} (torch {r.torch_version}, batch size {r.batch_size}, {r.precision}, "
                         f"{clocks[r.timing_clock]})" for r in devices.itertuples())
    notes.append(f"Images/s: measured sampling throughput on {measured}. Speed-up (measured) = images/s ÷ the "
                 f"full model's; speed-up (theoretical) = the full model's GFLOPs per image ÷ the set's."
                 + (" Sets were timed on different set-ups, so measured speed-ups mix them." if len(devices) > 1 else ""))

    notes.extend(_cmmd_notes(frame, footnotes, cmmd))
    notes.append(_bold_note(full))
    return notes


def _bold_note(full) -> str:
    """The rule of best_mask, in words."""
    name, limit = full["score_name"], quality_limit(full)
    bound = (f"the full model's ({limit:.4g})" if pd.isna(full["score_ci_high"])
             else f"the upper end of the full model's 95% interval ({limit:.4g})")
    return ("Bold: the best value of each column. Quality columns: the lowest among the generated sets. Cost "
            "columns (GFLOPs/fwd, images/s, speed-ups): the best among the sets of the full model, fewer steps, "
            f"early exit and DuoDiff whose {name} is at most {bound}, so that a cheaper set of worse quality is not "
            "crowned; the shallow model alone (DuoDiff's first stage, the cheapest by construction) is never a "
            "cost contender.")


def _samples_note(frame: pd.DataFrame, full, cmmd: bool) -> str:
    """How many samples each score used; CMMD's count only where CMMD was computed."""
    columns = ["n_samples", "fid_n_samples", "n_reference"] + (["cmmd_n_samples"] if cmmd else [])
    if len(frame[columns].drop_duplicates()) == 1:
        return (f"Samples: {full['n_samples']} per set; FID and KID from {full['fid_n_samples']} samples "
                f"against {full['n_reference']} real images"
                + (f"; CMMD from {full['cmmd_n_samples']} samples." if cmmd else "."))
    per_set = "; ".join(f"{r.set}: {r.n_samples} (FID/KID {r.fid_n_samples} vs {r.n_reference} real"
                        + (f", CMMD {r.cmmd_n_samples})" if cmmd else ")") for r in frame.itertuples())
    return f"Samples per set: {per_set}."


def _cmmd_notes(frame: pd.DataFrame, footnotes: dict[str, int], cmmd: bool) -> list[str]:
    """The footnotes of the sets without CMMD, or, when no set has it, one note instead of a
    column of n/a."""
    if cmmd:
        return [f"[{number}] CMMD n/a: {sentence(reason)}" for reason, number in footnotes.items()]
    reasons = " ".join(sentence(reason) for reason in frame["reason"].dropna().astype(str).drop_duplicates())
    return [f"CMMD: not computed for any set, so the table has no CMMD column. {reasons}".strip()]


def _headline_note(full) -> str:
    name = full["score_name"]
    if name == "FID":
        what = "FID: clean-fid's Fréchet Inception distance"
    else:
        what = (f"{name} / KD: Fréchet distance / KID in the features of a classifier trained on the dataset "
                f"({full['score_network']}; duodiff feature-net), the headline scores")
    return (f"{what}, each with its 95% confidence interval (score ± 1.96 jackknife standard errors over the set's images, the reference "
            f"fixed), from {full['score_n_samples']} images per set against {full['score_n_reference']} reference "
            "images. Lower is better.")


def summary_markdown(frame: pd.DataFrame) -> str:
    footnotes = _footnotes(frame)
    cells = _summary_cells(frame, footnotes, latex=False)
    mask = best_mask(frame)
    for column in mask.columns:
        cells[column] = [f"**{text}**" if best else text for text, best in zip(cells[column], mask[column])]
    columns = summary_columns(frame)
    cells.columns = ["Method", "Setting"] + [md for _, md, _, _ in columns]
    # disable_numparse: the cells are already formatted; tabulate would re-format "1.000" as "1".
    table = cells.to_markdown(index=False, disable_numparse=True, colalign=["left", "left"] + ["right"] * len(columns))
    notes = "\n".join(f"- {note}" for note in _notes(frame, footnotes))
    points = operating_point_cells(operating_points(frame))
    points_table = points.to_markdown(index=False, disable_numparse=True)
    return ("# Results: sample quality and cost per method\n\n"
            "Full U-ViT, the fewer-steps baseline, the shallow U-ViT alone, early exit (DeeDiff/AdaDiff) and "
            "DuoDiff, one row per sample set, below the real-data floor.\n\n" + table + "\n\n" + notes + "\n\n"
            "## Speed-up at equal quality\n\n" + OPERATING_POINTS_TEXT + "\n\n" + points_table + "\n")


OPERATING_POINTS_TEXT = (
    "Per method, the fastest setting (most theoretical speed-up) whose headline score is no worse than the "
    "upper end of the full model's 95% interval (operating_points.csv)."
)


def operating_point_cells(points: pd.DataFrame) -> pd.DataFrame:
    """operating_points() as display text: one row per method family."""
    rows = []
    for p in points.itertuples():
        if not isinstance(p.set, str):
            rows.append({"Method": _family_label(p), "Set": "–", p.score_name + " [95% CI]": "–",
                         "Layer ratio": "–", "Speed-up (measured)": "–", "Speed-up (theoretical)": "–",
                         "Note": p.note})
            continue
        rows.append({"Method": _family_label(p), "Set": p.set,
                     p.score_name + " [95% CI]": f"{p.score:.2f} [{p.score_ci_low:.2f}, {p.score_ci_high:.2f}]",
                     "Layer ratio": f"{p.layer_ratio:.3f}", "Speed-up (measured)": f"{p.speedup_measured:.2f}×",
                     "Speed-up (theoretical)": f"{p.speedup_theoretical:.2f}×", "Note": p.note or ""})
    return pd.DataFrame(rows)


def _family_label(point) -> str:
    return {"fewer_steps": "Fewer steps", "early_exit": f"Early exit, {point.family}",
            "duodiff": f"DuoDiff, {point.family}"}[point.method]


# Characters of the notes (free text, some from other files) that LaTeX would fail on or
# mis-typeset: specials, and "<", ">", "|", which the default OT1 encoding prints as other glyphs
# ("100 < 2048" as "100 ¡ 2048"). Non-ASCII letters pass: LaTeX reads UTF-8.
LATEX_TEXT = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
              "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
              "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}",
              "÷": r"$\div$", "×": r"$\times$", "±": r"$\pm$", "≤": r"$\leq$", "≥": r"$\geq$", "≈": r"$\approx$",
              "→": r"$\rightarrow$", "↑": r"$\uparrow$", "↓": r"$\downarrow$", "µ": r"$\mu$",
              "²": r"\textsuperscript{2}", "³": r"\textsuperscript{3}",
              "…": r"\ldots{}", "—": "---", "–": "--"}


def _escape_latex(text: str) -> str:
    return "".join(LATEX_TEXT.get(char, char) for char in text)


def _stacked_header(tex: str) -> str:
    """A header over two lines at its first space outside math ("Layer ratio", "Speed-up
    (meas.)$\\uparrow$"), bottom-aligned, so that headers are no wider than their numbers."""
    head, space, tail = tex.partition(" ")
    if not space or head.count("$") % 2:
        return tex
    return f"\\shortstack[r]{{{head}\\\\{tail}}}"


def summary_latex(frame: pd.DataFrame) -> str:
    r"""summary.tex: the summary as a booktabs table* with its notes below, to \input in a paper.

    Readable as it is: \footnotesize type (8 pt in a 10 pt document), never scaled to fit. To fit
    the text width of a two-column paper (table*; in a one-column document table* is a plain
    table), rows are grouped the papers' way: a method with swept settings (early exit, DuoDiff)
    gets a heading row and one indented row per setting, so the first column is only as wide as
    a setting; long headers take two lines. The notes follow in the same size. Needs booktabs.
    """
    footnotes = _footnotes(frame)
    cells = _summary_cells(frame, footnotes, latex=True)
    mask = best_mask(frame)
    columns = summary_columns(frame)
    numbers = [column for column, *_ in columns]
    width = 1 + len(numbers)
    rows, group = [], None
    for index, row in cells.iterrows():
        # Numeric cells already hold LaTeX ($\pm$, \textsuperscript); method and setting are free text.
        values = [f"\\textbf{{{row[c]}}}" if mask.at[index, c] else row[c] for c in numbers]
        if row["Setting"] == setting_label({"method": None}):  # no swept setting: one row, its method
            label, group = _escape_latex(row["Method"]), None
        else:
            if row["Method"] != group:
                rows.append(f"\\multicolumn{{{width}}}{{@{{}}l}}{{{_escape_latex(row['Method'])}}} \\\\")
                group = row["Method"]
            label = "\\quad " + _escape_latex(row["Setting"])
        rows.append(" & ".join([label, *values]) + " \\\\")
    header = " & ".join(["Method, setting"] + [_stacked_header(tex) for _, _, tex, _ in columns]) + " \\\\"
    tabular = ("\\begin{tabular}{@{}l" + "r" * len(numbers) + "@{}}\n\\toprule\n" + header + "\n\\midrule\n"
               + "\n".join(rows) + "\n\\bottomrule\n\\end{tabular}\n")
    notes = "\n".join(f"{_escape_latex(note)}\\par" for note in _notes(frame, footnotes))
    return ("% duodiff summary table (`duodiff tables`: results/<experiment>/tables/summary.tex), to \\input in a paper.\n"
            "% Needs \\usepackage{booktabs} (TeX Live: texlive-latex-recommended); nothing else.\n"
            "% A table* (in a one-column document, the same as table) in footnotesize type, never scaled:\n"
            "% about 450 pt wide with a study's labels, it fits a two-column paper's text width. For a\n"
            "% narrower text block, \\scriptsize (7 pt) instead. Rewritten by `duodiff tables`: edit a copy.\n"
            "\\begin{table*}[t]\n\\centering\n\\footnotesize\n\\setlength{\\tabcolsep}{4pt}\n"
            "\\caption{Sample quality and cost: full U-ViT, the shallow U-ViT alone, early exit "
            "(DeeDiff/AdaDiff) and DuoDiff.}\n\\label{tab:duodiff-summary}\n"
            + tabular
            + "\n\\smallskip\n\\begingroup\\raggedright\\setlength{\\parskip}{1pt}\n" + notes + "\n\\endgroup\n"
            "\\end{table*}\n")


# The HTML summary is what the Snakemake report shows in the browser (it cannot display Markdown),
# in a pane about 1000 px wide at a 1400 px window: headers and the method column wrap, numbers
# and settings do not, and the padding is tight, so that the table fits without sideways scrolling.
HTML_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1em 1.25em; color: #1a1a1a; }
h1 { font-size: 1.3em; }
table { border-collapse: collapse; font-size: 0.85em; }
thead th { border-top: 2px solid #333; border-bottom: 1px solid #333; padding: 0.35em 0.45em; text-align: right;
           vertical-align: bottom; }
thead th:nth-child(-n+2) { text-align: left; }
tbody td { padding: 0.3em 0.45em; text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tbody td:nth-child(-n+2) { text-align: left; }
tbody td:first-child { white-space: normal; min-width: 9em; }
tbody tr:last-child td { border-bottom: 2px solid #333; }
ul { font-size: 0.85em; max-width: 70em; line-height: 1.4; padding-left: 1.25em; }
"""


def summary_html(frame: pd.DataFrame) -> str:
    footnotes = _footnotes(frame)
    cells = _summary_cells(frame, footnotes, latex=False)
    mask = best_mask(frame)
    styler = cells.style.set_uuid("summary").hide(axis="index")
    styler = styler.format(escape="html")
    styler = styler.apply(lambda column: ["font-weight: bold" if best else "" for best in mask[column.name]],
                          axis=0, subset=list(mask.columns))
    styler = styler.relabel_index(["Method", "Setting"] + [md for _, md, _, _ in summary_columns(frame)], axis=1)
    notes = "\n".join(f"<li>{html.escape(note)}</li>" for note in _notes(frame, footnotes))
    points = operating_point_cells(operating_points(frame)).style.hide(axis="index").format(escape="html")
    points_html = (f"<h2>Speed-up at equal quality</h2>\n<p>{html.escape(OPERATING_POINTS_TEXT)}</p>\n"
                   + points.set_uuid("operating_points").to_html())
    return ("<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n"
            "<title>duodiff results: sample quality and cost per method</title>\n"
            f"<style>{HTML_STYLE}</style>\n</head>\n<body>\n"
            "<h1>Results: sample quality and cost per method</h1>\n"
            "<p>Full U-ViT, the shallow U-ViT alone, early exit (DeeDiff/AdaDiff) and DuoDiff, one row per "
            "sample set.</p>\n" + styler.to_html() + f"\n<ul>\n{notes}\n</ul>\n{points_html}\n</body>\n</html>\n")


def _write_frame(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def run_tables(samples_root, metrics_root, sets, output_dir, headline: str = "inception", cmmd: bool = True) -> dict[str, Path]:
    """Write scores/fid/kid/cmmd/gflops.csv, operating_points.csv, summary.md, summary.tex and
    summary.html to output_dir; return their paths."""
    require(headline in HEADLINES, f"--headline must be one of {', '.join(HEADLINES)}; got {headline!r}")
    frame = collect(samples_root, metrics_root, sets, headline, cmmd)  # reads and checks everything before writing
    output_dir = Path(output_dir)
    paths = {}
    for name, columns in CSV_COLUMNS.items():
        paths[f"{name}.csv"] = output_dir / f"{name}.csv"
        _write_frame(frame[columns], paths[f"{name}.csv"])
    paths["operating_points.csv"] = output_dir / "operating_points.csv"
    _write_frame(operating_points(frame), paths["operating_points.csv"])
    paths["summary.md"] = output_dir / "summary.md"
    write_text(paths["summary.md"], summary_markdown(frame))
    paths["summary.tex"] = output_dir / "summary.tex"
    write_text(paths["summary.tex"], summary_latex(frame))
    paths["summary.html"] = output_dir / "summary.html"
    write_text(paths["summary.html"], summary_html(frame))
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
    parser.set_defaults(func=lambda args: run_tables(samples_root=args.samples_root, metrics_root=args.metrics_root,
                                                     sets=args.sets, output_dir=args.output_dir, headline=args.headline,
                                                     cmmd=args.cmmd))
