"""What every figure of `duodiff plots` shares: the house style (a paper column wide, SMALL_FONT
as the smallest type), the colour of every set (Palette), legends below the panels, the record of
the lines as drawn, and the parts the quality figures share (the full model's band, the real-data
floor, error bars from the 95% intervals)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from duodiff.core.study import SWEPT_SETTING
from duodiff.report.tables.collect import method_label
from duodiff.report.tables.operating_points import method_families, with_cache_fields

FEWER_STEPS_STYLE = dict(color="0.35", marker="D", markersize=5, linewidth=1.3, linestyle="--")
REAL_COLOR = "tab:green"

# One sequential colour map per family, so every set of a family shares a hue and its setting
# (threshold, t_switch) picks the shade. Early exit: blue, purple, brown and teal per classifier;
# DuoDiff: red, orange, pink per shallow depth. Green belongs to the real-data floor, greys to the
# full model's fewer-steps sets (the full model itself is black).
EARLY_EXIT_CMAPS = ["Blues", "Purples", "YlOrBr", "BuGn", "GnBu", "BuPu"]
DUODIFF_CMAPS = ["Reds", "Oranges", "RdPu"]
COMPOSED_CMAPS = ["Greens", "YlGn", "PuBuGn", "OrRd"]  # one per composed family (config entry)
CACHE_CMAPS = ["copper_r", "pink_r"]
L2C_CMAP = "Greys"  # Learning-to-Cache: one router per study, its threshold swept  # caching, one per keep_blocks (a study has one)
FULL_STYLE = dict(color="black", marker="*", markersize=15, linestyle="none")
SHALLOW_MARKER = "s"
# Every figure is drawn at about the width of a paper's column (3.3 in) and its smallest type is
# SMALL_FONT, so that placed at column width it still prints at 7.5 * 3.3 / 4 = 6.2 pt.
FIGURE_WIDTH = 4.0  # inches
SMALL_FONT = 7.5    # pt: tick labels, legends, point labels, panel titles of image grids
LABEL_CHARS = 28    # a legend entry or panel title longer than this is wrapped (two legend columns fit)
STYLE = {
    "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "xtick.labelsize": SMALL_FONT,
    "ytick.labelsize": SMALL_FONT, "legend.fontsize": SMALL_FONT, "legend.title_fontsize": SMALL_FONT,
    "figure.titlesize": 8.5, "figure.labelsize": 8,
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
    "figure.dpi": 100, "savefig.bbox": "tight", "savefig.pad_inches": 0.03,  # a thin margin: the width is the figure's
    # TrueType (Type 42) fonts in PDFs and PS: some venues reject the default Type 3.
    "pdf.fonttype": 42, "ps.fonttype": 42,
}


def new_figure(height: float) -> Figure:
    """A figure FIGURE_WIDTH wide, with a canvas so that its layout can be measured before it is
    saved (legends, point labels)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = Figure(figsize=(FIGURE_WIDTH, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def wrap_label(text: str, width: int = LABEL_CHARS) -> str:
    """Text broken after spaces or underscores into lines of at most `width` characters where it
    can be (a probe name such as mlp_probe_per_layer_per_timestep has no spaces)."""
    lines, line = [], ""
    for piece in re.split(r"(?<=[ _])", text):
        if line and len(line) + len(piece) > width:
            lines.append(line.rstrip())
            line = ""
        line += piece
    return "\n".join(lines + [line.rstrip()])


def legend_entries(axes) -> tuple[list, list[str]]:
    """The labelled artists of these axes, each label once, long labels wrapped."""
    entries: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    return list(entries.values()), [wrap_label(label) for label in entries]


def bottom_legend(fig, axes) -> None:
    """The legend of these axes below the figure's panels: in two columns where they fit the
    figure's width, else in one (a legend wider than the figure would widen the saved image and
    shrink its type)."""
    handles, labels = legend_entries(axes)
    legend = fig.legend(handles, labels, loc="outside lower center", ncols=2, frameon=False)
    fig.canvas.draw()
    if legend.get_window_extent().width > fig.bbox.width:
        legend.remove()
        fig.legend(handles, labels, loc="outside lower center", ncols=1, frameon=False)


def shades(cmap_name: str, count: int) -> list:
    """`count` colours from light to dark of a sequential colour map (never the near-white end)."""
    cmap = colormaps[cmap_name]
    if count == 1:
        return [cmap(0.75)]
    return [cmap(x) for x in np.linspace(0.45, 0.85, count)]  # the darkest Greys would read as the full model


class Palette:
    """The colour of every set, fixed once per run so all figures agree."""

    def __init__(self, table: pd.DataFrame):
        self.colors: dict[str, tuple] = {}
        self.family: dict[tuple, tuple] = {}  # (method, classifier or depth) -> line colour
        classifiers = sorted(table.loc[table["method"] == "early_exit", "classifier_type"].dropna().unique())
        depths = sorted(table.loc[table["method"].isin(["duodiff", "shallow"]), "shallow_depth"].dropna().unique())
        for i, classifier in enumerate(classifiers):
            group = table[(table["method"] == "early_exit") & (table["classifier_type"] == classifier)]
            self._assign(group, "threshold", EARLY_EXIT_CMAPS[i % len(EARLY_EXIT_CMAPS)], ("early_exit", classifier))
        for i, depth in enumerate(depths):
            group = table[(table["method"] == "duodiff") & (table["shallow_depth"] == depth)]
            cmap = DUODIFF_CMAPS[i % len(DUODIFF_CMAPS)]
            self._assign(group, "t_switch", cmap, ("duodiff", depth))
            for name in table.loc[(table["method"] == "shallow") & (table["shallow_depth"] == depth), "set"]:
                self.colors[name] = colormaps[cmap](0.95)
        # Caching and composed families: (method, label) -> their sets in knob order, the lines drawn.
        self.members: dict[tuple, list[str]] = {}
        # caching, per keep_blocks: the interval N swept, darker for longer intervals (cheaper)
        table = with_cache_fields(table)
        for i, keep in enumerate(sorted(table.loc[table["method"] == "cache", "cache_keep"].dropna().unique())):
            group = table[(table["method"] == "cache") & (table["cache_keep"] == keep)]
            key = ("cache", f"k = {keep}")
            self._assign(group, "cache_interval", CACHE_CMAPS[i % len(CACHE_CMAPS)], key)
            self.members[key] = list(group.sort_values("cache_interval")["set"])
        group = table[table["method"] == "l2c"]
        if len(group):  # higher thresholds reuse more (cheaper): darker
            self._assign(group, "router_threshold", L2C_CMAP, ("l2c", "learned router"))
            self.members[("l2c", "learned router")] = list(group.sort_values("router_threshold")["set"])
        for i, (method, family, sets) in enumerate(f for f in method_families(table) if f[0] == "composed"):
            cmap = COMPOSED_CMAPS[i % len(COMPOSED_CMAPS)]
            for name, color in zip(sets["set"], shades(cmap, len(sets))):
                self.colors[name] = color
            self.family[(method, family)] = colormaps[cmap](0.75)
            self.members[(method, family)] = list(sets["set"])
        for name in table.loc[table["method"] == "full", "set"]:
            self.colors[name] = (0.0, 0.0, 0.0, 1.0)
        fewer = table[table["method"] == "fewer_steps"].sort_values("steps", ascending=False)
        for name, color in zip(fewer["set"], shades("Greys", len(fewer))):  # fewer steps: lighter
            self.colors[name] = color
        for name in table.loc[table["method"] == "real", "set"]:
            self.colors[name] = REAL_COLOR

    def _assign(self, group: pd.DataFrame, setting: str, cmap: str, key: tuple) -> None:
        group = group.sort_values(setting)
        for name, color in zip(group["set"], shades(cmap, len(group))):
            self.colors[name] = color
        self.family[key] = colormaps[cmap](0.75)


def lines_drawn(ax) -> list[dict]:
    """The labelled lines of an axes as drawn: the record saved beside the figure."""
    from matplotlib.container import ErrorbarContainer

    # errorbar() keeps its label on the container and leaves the data line unlabelled.
    labelled = {id(c.lines[0]): c.get_label() for c in ax.containers if isinstance(c, ErrorbarContainer)}
    series = []
    for line in ax.get_lines():
        label = labelled.get(id(line), line.get_label())
        if label.startswith("_"):
            continue
        series.append({"label": label,
                       "x": [float(v) for v in line.get_xdata()],
                       "y": [float(v) for v in line.get_ydata()]})
    return series


def score_label(table: pd.DataFrame) -> str:
    name = table["score_name"].iloc[0]
    what = "classifier features" if name != "FID" else "Inception"
    return f"{name} ({what}; lower is better)"


def error_bars(group: pd.DataFrame):
    """(2, N) distances from each score down to its interval's low end and up to its high end."""
    score = group["score"].astype(float).to_numpy()
    return np.vstack([score - group["score_ci_low"].astype(float).to_numpy(),
                      group["score_ci_high"].astype(float).to_numpy() - score])


def draw_floor_and_full_band(ax, table: pd.DataFrame) -> None:
    """The full model's 95% interval as a grey band (equal quality) and the real-data floor as a
    green line with its own band: where a method sits between the two is what the plot is about."""
    full = table[table["method"] == "full"].iloc[0]
    if not pd.isna(full["score_ci_low"]):
        ax.axhspan(full["score_ci_low"], full["score_ci_high"], color="0.85", zorder=0, label="full model's 95% CI")
    real = table[table["method"] == "real"]
    if len(real):
        row = real.iloc[0]
        ax.axhline(row["score"], color=REAL_COLOR, linewidth=1.2, linestyle="-.", label="real data (floor)")
        if not pd.isna(row["score_ci_low"]):
            ax.axhspan(row["score_ci_low"], row["score_ci_high"], color=REAL_COLOR, alpha=0.12, zorder=0)


def sampling_caption(table: pd.DataFrame) -> str:
    """How the plotted sets were sampled, true of every set drawn: the fewer-steps sets' own step
    counts are named beside the study's."""
    fewer = sorted(table.loc[table["method"] == "fewer_steps", "steps"].dropna().astype(int).unique(), reverse=True)
    table = table[~table["method"].isin(["real", "fewer_steps"])]
    setups = table[["sampler", "steps"]].drop_duplicates()
    if len(setups) != 1:
        return "mixed samplers"
    caption = f"{setups.iloc[0]['sampler']}, {setups.iloc[0]['steps']} steps"
    return caption + (f"; fewer steps: {', '.join(map(str, fewer))}" if fewer else "")


def swept_families(table: pd.DataFrame, methods=("early_exit", "duodiff", "cache", "l2c", "composed")) -> list[tuple[str, pd.DataFrame]]:
    """(title, sets in setting order) of every method family with a swept setting: early exit per
    classifier (thresholds), DuoDiff per shallow depth (t_switch), each composed family (its knob)."""
    # Composed families come in their knob's order already (operating_points.composed_families).
    return [(method_label(sets.iloc[0]) if method != "composed" else f"Composed, {family}",
             sets.sort_values(SWEPT_SETTING[method]) if method in SWEPT_SETTING else sets)
            for method, family, sets in method_families(table) if method in methods]
