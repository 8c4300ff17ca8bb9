"""The search-trace figure: per searched family (search.csv, `duodiff tables`), each probe's paired
difference to the full model with its 95% interval against the knob value, numbered in probe
order (the grid's seeds as 0), the equal-quality margin dashed; the setting found ringed."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from duodiff.core.errors import require
from duodiff.report.plots.labels import label_points
from duodiff.report.plots.style import SMALL_FONT, new_figure, wrap_label

PANEL_HEIGHT = 2.4  # inches per row of panels: room for the title, the probes and their numbers
SEARCH_COLUMNS = ["family", "round", "source", "set", "knob", "value", "score_diff", "score_diff_ci_low",
                  "score_diff_ci_high", "verdict", "quality_limit", "stopped", "best"]


def load_search(tables_dir) -> pd.DataFrame:
    """search.csv of the tables folder; empty where the study searched nothing."""
    path = Path(tables_dir) / "search.csv"
    if not path.is_file():
        return pd.DataFrame(columns=SEARCH_COLUMNS)
    table = pd.read_csv(path, keep_default_na=False, na_values=[""])
    missing = [c for c in SEARCH_COLUMNS if c not in table.columns]
    require(not missing, f"{path}: missing columns {', '.join(missing)}")
    return table


def plot_search_trace(search: pd.DataFrame):
    families = list(dict.fromkeys(search["family"]))
    ncols = 2 if len(families) > 1 else 1
    nrows = max(1, math.ceil(len(families) / ncols))
    fig = new_figure(PANEL_HEIGHT * nrows + 0.6)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    panels, numbers = [], []
    for ax, family in zip(axes, families):
        rows = search[search["family"] == family].reset_index(drop=True)
        x = rows["value"].astype(float).to_numpy()
        y = rows["score_diff"].astype(float).to_numpy()
        low, high = rows["score_diff_ci_low"].astype(float).to_numpy(), rows["score_diff_ci_high"].astype(float).to_numpy()
        passed = rows["verdict"].isin(["equal", "better"]).to_numpy()
        ax.errorbar(x, y, yerr=np.vstack([y - low, high - y]), fmt="none", ecolor="0.4", elinewidth=0.8, capsize=2)
        ax.plot(x[passed], y[passed], "o", color="tab:blue", markersize=5, label="passes")
        ax.plot(x[~passed], y[~passed], "o", color="tab:red", markersize=5, markerfacecolor="white", label="fails")
        # Probe order (the grid's seeds, then 1, 2, ... by round), placed once the layout is final
        # (label_points: clear of every marker and error-bar end, a leader line where it must move).
        numbers.append((ax, [{"sets": [name], "text": str(i + 1), "x": xi, "y": yi, "color": "black"}
                             for i, (name, xi, yi) in enumerate(zip(rows["set"], x, y))],
                        list(zip(x, y)) + list(zip(x, low)) + list(zip(x, high))))
        best = rows[rows["set"] == rows["best"]]
        if len(best):
            ax.plot(best["value"].astype(float), best["score_diff"].astype(float), "o", markersize=10,
                    markerfacecolor="none", color="black", label="found")
        limit = float(rows["quality_limit"].iloc[0])
        ax.axhline(limit, color="0.3", linewidth=1.0, linestyle="--")
        ax.axhline(0.0, color="black", linewidth=0.6)
        name = rows["label"].iloc[0] if "label" in rows else family  # search.csv before labels: the id
        ax.set_title(wrap_label(f"{name}: {rows['stopped'].iloc[0]}", 30), fontsize=SMALL_FONT + 1)
        ax.set_xlabel(str(rows["knob"].iloc[0]), fontsize=SMALL_FONT)
        ax.tick_params(labelsize=SMALL_FONT)
        panels.append({"family": family, "label": name, "sets": rows["set"].tolist(), "x": x.tolist(), "y": y.tolist(),
                       "low": low.tolist(), "high": high.tolist(), "passes": passed.tolist(),
                       "rounds": rows["round"].astype(int).tolist(), "margin": limit,
                       "best": rows["best"].iloc[0], "stopped": rows["stopped"].iloc[0]})
    for ax in axes[len(families):]:
        ax.set_visible(False)
    if not families:
        axes[0].set_visible(True)
        axes[0].text(0.5, 0.5, "no operating-point search in this study (search.enabled)",
                     transform=axes[0].transAxes, ha="center", va="center", color="0.4")
        axes[0].set_axis_off()
    else:
        axes[0].set_ylabel("Δ score to the full model", fontsize=SMALL_FONT)
        axes[0].legend(fontsize=SMALL_FONT, loc="best")
    fig.tight_layout()
    for ax, probes, points in numbers:
        label_points(ax, probes, points, SMALL_FONT)
    return fig, {"panels": panels}
