"""The equal-quality figure: each set's paired difference to the full model's headline score (with
its paired 95% interval) against its theoretical speed-up, one panel per method family, with the
non-inferiority margin drawn in. A set passes where its whole interval lies below the margin line;
the operating point of a family is its rightmost passing set (operating_points.py)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from duodiff.report.plots.style import (
    FEWER_STEPS_STYLE,
    FULL_STYLE,
    SMALL_FONT,
    Palette,
    new_figure,
    sampling_caption,
    wrap_label,
)
from duodiff.report.tables.operating_points import method_families, passes

PANEL_HEIGHT = 2.2  # inches per row of panels


def _family_color(palette: Palette, method: str, family: str, sets: pd.DataFrame):
    if method == "fewer_steps":
        return FEWER_STEPS_STYLE["color"]
    key = {"early_exit": sets["classifier_type"].iloc[0], "composed": family, "cache": family, "l2c": family}.get(
        method, sets["shallow_depth"].iloc[0])
    return palette.family.get((method, key), "0.3")


def _title(method: str, family: str) -> str:
    return {"fewer_steps": "Fewer steps", "early_exit": f"Early exit, {family}",
            "duodiff": f"DuoDiff, {family}", "cache": f"Caching, {family}",
            "l2c": f"Learning-to-Cache, {family}", "composed": f"Composed, {family}"}[method]


def plot_paired_difference(table: pd.DataFrame, palette: Palette):
    """Small multiples of Δscore [paired 95% CI] against the theoretical speed-up."""
    full = table[table["method"] == "full"].iloc[0]
    name, limit = full["score_name"], float(full.get("quality_limit", math.nan))
    families = [(m, f, s) for m, f, s in method_families(table) if s["score_diff"].notna().any()]
    ncols = 2 if len(families) > 1 else 1
    nrows = max(1, math.ceil(len(families) / ncols))
    fig = new_figure(PANEL_HEIGHT * nrows + 0.8)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharey=True, squeeze=False)).ravel()
    panels = []
    for ax, (method, family, sets) in zip(axes, families):
        sets = sets.sort_values("speedup_theoretical")
        color = _family_color(palette, method, family, sets)
        x = sets["speedup_theoretical"].astype(float).to_numpy()
        y = sets["score_diff"].astype(float).to_numpy()
        bars = np.vstack([y - sets["score_diff_ci_low"].astype(float).to_numpy(),
                          sets["score_diff_ci_high"].astype(float).to_numpy() - y])
        ax.errorbar(x, y, yerr=bars, color=color, marker="none", linestyle="-", linewidth=1.0, capsize=2,
                    elinewidth=0.8)
        passed = passes(sets).to_numpy()
        ax.plot(x[passed], y[passed], "o", color=color, markersize=5, label="passes")
        ax.plot(x[~passed], y[~passed], "o", color=color, markersize=5, markerfacecolor="white", label="fails")
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.plot([1.0], [0.0], **{**FULL_STYLE, "markersize": 7})  # the full model: 1x, no difference
        ax.set_title(wrap_label(_title(method, family), 26), fontsize=SMALL_FONT + 1)
        ax.tick_params(labelsize=SMALL_FONT)
        panels.append({"method": method, "family": family, "sets": sets["set"].tolist(), "x": x.tolist(),
                       "y": y.tolist(), "low": sets["score_diff_ci_low"].astype(float).tolist(),
                       "high": sets["score_diff_ci_high"].astype(float).tolist(), "passes": passed.tolist()})
    if families and not math.isnan(limit):  # the margin and, below it, the zone where a set may pass
        low, high = axes[0].get_ylim()  # shared by every panel
        high = max(high, limit + 0.15 * (high - low))
        for ax in axes[: len(families)]:
            ax.axhline(limit, color="0.3", linewidth=1.0, linestyle="--")
            ax.axhspan(low, limit, color="0.92", zorder=0)
        axes[0].set_ylim(low, high)
    for ax in axes[len(families):]:
        ax.set_visible(False)
    if not families:
        axes[0].set_visible(True)
        axes[0].text(0.5, 0.5, "no paired differences in this study", transform=axes[0].transAxes,
                     ha="center", va="center", color="0.4")
    fig.supxlabel("theoretical speed-up over the full model (×)", fontsize=SMALL_FONT + 1)
    fig.supylabel(f"Δ{name} vs full [paired 95% CI]", fontsize=SMALL_FONT + 1)
    margin = "" if math.isnan(limit) else f"\ndashed: the margin, {full['margin']:.0%} of the full model's {name}"
    fig.suptitle(f"Equal quality, paired ({sampling_caption(table)}){margin}", fontsize=SMALL_FONT + 1)
    return fig, {"score_name": name, "quality_limit": limit, "panels": panels}
