"""The summary table's cells: which columns it has, how each number is rounded and printed, and
which cells are bold (the best of their column among its contenders). Shared by the Markdown,
LaTeX and HTML summaries (formats.py), so the three always show the same cells.

The method and setting labels come with the frame (collect adds method_label, setting_label and
has_setting from the study's vocabulary).
"""

from __future__ import annotations

import math
import re

import pandas as pd

from duodiff.core.study import SET_NAME_PATTERNS
from duodiff.report.tables.operating_points import passes

# Summary columns: (column in the data, Markdown header, LaTeX header, which value is best). The
# headline score's two columns come first, named by the headline (summary_columns).
SUMMARY_COLUMNS = [
    ("fid", "FID ↓", r"FID$\downarrow$", "min"),
    ("kid", "KID×10³ ↓", r"KID$\times10^3\downarrow$", "min"),
    ("cmmd", "CMMD ↓", r"CMMD$\downarrow$", "min"),
    # Per image (all sampling steps, both guidance branches): the one FLOPs unit of the tables and
    # plots; per network evaluation it would hide what fewer steps save.
    ("gflops_per_image", "GFLOPs/image ↓", r"GFLOPs/image$\downarrow$", "min"),
    ("layer_ratio", "Layer ratio", "Layer ratio", None),
    ("images_per_s", "Images/s ↑", r"Images/s$\uparrow$", "max"),
    ("speedup_measured", "Speed-up (measured) ↑", r"Speed-up (meas.)$\uparrow$", "max"),
    ("speedup_theoretical", "Speed-up (theoretical) ↑", r"Speed-up (theor.)$\uparrow$", "max"),
]
# Marks on a headline score by its paired verdict (operating_points.paired_verdict).
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
    # KID only where some set has it (none against a reference from published statistics: a note says so).
    metrics = [c for c in SUMMARY_COLUMNS if (c[0] != "cmmd" or cmmd_computed(frame))
               and (c[0] != "kid" or frame["kid"].notna().any())]
    # The paired difference to the full model, where the sets were scored against it.
    pm_ci, pm_ci_tex = (" ± 95% CI", r" $\pm$ 95\% CI") if ci else ("", "")
    diff = [("score_diff", f"Δ{name} vs full{pm_ci}", rf"$\Delta${name} vs full{pm_ci_tex}", None)]
    if frame["score_diff"].isna().all():
        diff = []
    if name == "FID":
        return [("score", f"FID{ci} ↓", rf"FID{ci_tex}$\downarrow$", "min")] + diff + metrics[1:]
    # Beside another headline, Inception's FID and KID are computed on a few samples (fid.json's
    # n_samples) and cannot separate the sets: shown in a table of their own, never bold.
    metrics = [(c, md, tex, None if c in INCEPTION_COLUMNS else best) for c, md, tex, best in metrics]
    return [
        ("score", f"{name}{ci} ↓", rf"{name}{ci_tex}$\downarrow$", "min"),
        *diff,
        ("kid_headline", f"KD×10³{ci} ↓", rf"KD$\times10^3${ci_tex}$\downarrow$", "min"),
    ] + metrics


def summary_parts(frame: pd.DataFrame, columns: list | None = None) -> dict[str, list]:
    """The summary's columns as the tables every writer shows, in order: quality (the headline),
    inception (FID and KID beside another headline: a secondary table that states its N), cost."""
    columns = summary_columns(frame) if columns is None else columns
    cost = [c for c in columns if c[0] in COST_COLUMNS or c[0] == "layer_ratio"]
    secondary = frame["score_name"].iloc[0] != "FID"
    inception = [c for c in columns if secondary and c[0] in INCEPTION_COLUMNS]
    return {"quality": [c for c in columns if c not in cost and c not in inception], "inception": inception,
            "cost": cost}


def inception_caption(frame: pd.DataFrame) -> str:
    """What the secondary Inception table is, with its N, and why it does not decide."""
    row = frame.iloc[0]
    return (f"clean-fid's Inception FID and KID, from the first {row['fid_n_samples']} samples of each set against "
            f"{row['n_reference']} reference images: at this N they cannot tell the sets apart, so the headline "
            f"({row['score_name']}) decides and nothing here is bold.")


# Least display precision of each summary column; a column of small numbers (the GFLOPs of an
# 8x8 model) gets more, see `decimals`. Best-value marking compares the displayed (rounded)
# values, so two numbers that print the same are both bold.
DECIMALS = {"score": 2, "score_diff": 2, "kid_headline": 2, "fid": 2, "kid": 2, "cmmd": 3, "gflops_per_image": 2,
            "layer_ratio": 3, "images_per_s": 1, "speedup_measured": 2, "speedup_theoretical": 2}
SIGNIFICANT_DIGITS = 2  # at least this many for the smallest non-zero value of a column
KID_SCALE = 1e3  # KID is printed x10^3, as is usual in papers
KID_COLUMNS = ("kid", "kid_headline")
INCEPTION_COLUMNS = ("fid", "kid")
COST_COLUMNS = ("gflops_per_image", "images_per_s", "speedup_measured", "speedup_theoretical")
SUPERSCRIPTS = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


def decimals(column: str, values) -> int:
    """Decimals that show every value of a summary column with SIGNIFICANT_DIGITS digits."""
    values = pd.to_numeric(pd.Series(values), errors="coerce").abs()
    values = values[values > 0]
    if values.empty:
        return DECIMALS[column]
    return max(DECIMALS[column], SIGNIFICANT_DIGITS - 1 - math.floor(math.log10(values.min())))


def contenders(frame: pd.DataFrame, column: str) -> pd.Series:
    """The rows that may hold a summary column's best value. Quality: every generated set (the
    real-data row is the floor, not a contender). Cost: only the compared methods' sets (not the
    shallow model alone, DuoDiff's first stage, cheapest by construction): the full model and the
    sets that pass the paired test of equal quality (operating_points.passes); a cheaper set of
    worse quality is no better trade."""
    generated = frame["method"] != "real"
    if column not in COST_COLUMNS:
        return generated
    return generated & (frame["method"] != "shallow") & ((frame["set"] == "full") | passes(frame))


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


def footnotes(frame: pd.DataFrame) -> dict[str, int]:
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


def summary_cells(frame: pd.DataFrame, footnotes: dict[str, int], latex: bool) -> pd.DataFrame:
    """The summary's cells as text (numbers rounded; n/a with a footnote mark; – where a column
    does not apply, as the cost of the real-data row), not yet bolded."""
    cells = pd.DataFrame(index=frame.index)
    cells["Method"] = frame["method_label"]
    cells["Setting"] = frame["setting_label"]
    pm = r" $\pm$ " if latex else " ± "
    for column, *_ in summary_columns(frame):
        scale = KID_SCALE if column in KID_COLUMNS else 1.0
        # A difference is printed to the score's precision: near 0 it would otherwise get more digits.
        digits = decimals("score", frame["score"]) if column == "score_diff" else decimals(column, frame[column] * scale)
        if column == "score":
            text = []
            for row in frame.itertuples():
                cell = _fmt(row.score, digits)
                if not pd.isna(row.score_ci_low):
                    cell += f" [{row.score_ci_low:.{digits}f}, {row.score_ci_high:.{digits}f}]"
                mark = DIFFERS_MARK.get(row.verdict)
                text.append(cell + (mark[1 if latex else 0] if mark else ""))
        elif column == "score_diff":
            # The jackknife interval is symmetric: ± its half-width, narrower to print than [low, high].
            text = ["–" if pd.isna(v) else f"{v:+.{digits}f}" + ("" if pd.isna(lo) else f"{pm}{(hi - lo) / 2:.{digits}f}")
                    for v, lo, hi in zip(frame["score_diff"], frame["score_diff_ci_low"], frame["score_diff_ci_high"])]
        elif column == "kid_headline":
            text = [_fmt(v * KID_SCALE, digits) + ("" if pd.isna(lo) else f" [{lo * KID_SCALE:.{digits}f}, {hi * KID_SCALE:.{digits}f}]")
                    for v, lo, hi in zip(frame["kid_headline"], frame["kid_headline_ci_low"], frame["kid_headline_ci_high"])]
        elif column == "fid":
            text = [_fmt(v, digits) + ("" if pd.isna(lo) else f" [{lo:.{digits}f}, {hi:.{digits}f}]")
                    for v, lo, hi in zip(frame["fid"], frame["fid_ci_low"], frame["fid_ci_high"])]
        elif column == "kid":
            text = [_fmt(k, digits) if pd.isna(k) else f"{k * KID_SCALE:.{digits}f}{pm}{s * KID_SCALE:.{digits}f}"
                    for k, s in zip(frame["kid"], frame["kid_std"])]
        elif column == "cmmd":
            mark = (lambda n: f"\\textsuperscript{{{n}}}") if latex else (lambda n: str(n).translate(SUPERSCRIPTS))
            text = [f"n/a{mark(footnotes[str(r)])}" if pd.isna(v) else f"{v:.{digits}f}"
                    for v, r in zip(frame["cmmd"], frame["reason"])]
        elif column == "speedup_measured":  # timed alone: the median ratio with its 95% interval
            times = r"$\times$" if latex else "×"
            text = [_fmt(v, digits, times) + ("" if pd.isna(lo) else f" [{lo:.{digits}f}, {hi:.{digits}f}]")
                    for v, lo, hi in zip(frame[column], frame["speedup_measured_ci_low"],
                                         frame["speedup_measured_ci_high"])]
        elif column.startswith("speedup"):
            times = r"$\times$" if latex else "×"
            text = [_fmt(v, digits, times) for v in frame[column]]
        else:
            text = [_fmt(v, digits) for v in frame[column]]
        cells[column] = text
    return cells


def operating_point_cells(points: pd.DataFrame) -> pd.DataFrame:
    """operating_points() as display text, one row per method family: the answer a reader wants
    first (setting, speed-ups, the paired difference that makes it equal quality); the set's own
    score and layer ratio are in the tables of every set (and operating_points.csv). Readable
    names only: families and notes with the probes spelled out and no set ids (operating_points.csv
    keeps those); the Note column only when some row has a note."""
    rows = []
    for p in points.itertuples():
        diff = f"Δ{p.score_name} vs full [95% CI]"
        if not isinstance(p.set, str):
            rows.append({"Method": _family_label(p), "Setting": "–", "Speed-up (measured)": "–",
                         "Speed-up (theoretical)": "–", diff: "–", "Note": readable(p.note)})
            continue
        better = " (better)" if p.verdict == "better" else ""
        rows.append({"Method": _family_label(p), "Setting": p.setting_label,
                     "Speed-up (measured)": f"{p.speedup_measured:.2f}×" + (
                         "" if pd.isna(p.speedup_measured_ci_low)
                         else f" [{p.speedup_measured_ci_low:.2f}, {p.speedup_measured_ci_high:.2f}]"),
                     "Speed-up (theoretical)": f"{p.speedup_theoretical:.2f}×",
                     diff: f"{p.score_diff:+.2f} [{p.score_diff_ci_low:+.2f}, {p.score_diff_ci_high:+.2f}]{better}",
                     "Note": readable(p.note)})
    cells = pd.DataFrame(rows)
    if len(cells) and not cells["Note"].str.strip().any():
        cells = cells.drop(columns="Note")
    return cells


# The probes as a reader names them (the study's CLASSIFIER_TYPES are identifiers).
PROBE_NAMES = {
    "attention_probe": "attention probe",
    "mlp_probe_per_layer_per_timestep": "MLP probe per layer and timestep",
    "mlp_probe_per_layer": "MLP probe per layer",
    "mlp_probe_per_timestep": "MLP probe per timestep",
}
# A set id in parentheses, as the notes name the closest set: "... > margin 10 (ee_attention_probe_thr0.2)".
_SET_ID = re.compile(r" ?\((?:" + "|".join(re.sub(r"\(\?P<\w+>", "(?:", p.pattern) for p in SET_NAME_PATTERNS.values()) + r")\)")
_PROBE = re.compile("|".join(sorted(PROBE_NAMES, key=len, reverse=True)))


def readable(text) -> str:
    """Display text without identifiers: probe names spelled out, set ids in parentheses dropped
    (the setting label beside them says the same)."""
    if not isinstance(text, str):
        return ""
    return _PROBE.sub(lambda m: PROBE_NAMES[m[0]], _SET_ID.sub("", text))


def _family_label(point) -> str:
    family = readable(point.family)
    return {"fewer_steps": "Fewer steps", "early_exit": f"Early exit, {family}",
            "duodiff": f"DuoDiff, {family}", "cache": f"Caching, {family}",
            "l2c": f"Learning-to-Cache, {family}", "composed": f"Composed, {family}",
            # A searched family without grid sets of its method: its search id.
            }.get(point.method, f"Searched, {family.replace('_', ' ').replace('-', ', ', 1)}")
