"""`duodiff plots`: the study's figures, drawn from the tables and the sample-set folders.

Each figure is saved as `<name>.png` (raster, for the report) and `<name>.pdf` (vector, for
papers), atomically, under fixed names (docs/architecture.md, "Tables and plots"):

    quality_vs_gflops   FID against GFLOPs per network evaluation: the Pareto picture
    quality_vs_time     FID against measured milliseconds per image
    exit_heatmap        where early exit exits: exit layer by sampling step, per early-exit set
    mean_exit_layer     mean exit layer by sampling step, one panel per method family
    fid_vs_tswitch      DuoDiff's FID against t_switch, per shallow depth
    training_curves     training loss against step, one panel per kind of loss
    sample_grids        sample grids of every set beside real images, one row per method family

Every figure is drawn about a paper column wide (FIGURE_WIDTH) with SMALL_FONT as its smallest
type, so that it stays legible at a column's 3.3 inches. Beside each figure, `<name>.json` holds the data series as drawn (read back from the figure's
artists), so a reader or a test can check a figure against the tables it claims to show.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from tqdm import tqdm

from duodiff.errors import DuodiffError, check_positive, require
from duodiff.flags import add_flag
from duodiff.io import atomic_path, write_json
from duodiff.labels import label_points
from duodiff.study import SWEPT_SETTING, setting_label
from duodiff.tables import INTEGER_COLUMNS, blocks, method_families, method_label

PLOT_NAMES = ["quality_vs_gflops", "quality_vs_time", "exit_heatmap", "mean_exit_layer", "fid_vs_tswitch",
              "training_curves", "sample_grids"]
TABLE_COLUMNS = ["set", "method", "setting", "classifier_type", "threshold", "t_switch", "shallow_depth",
                 "depth", "sampler", "steps", "seed", "n_samples", "score_name", "score", "score_ci_low",
                 "score_ci_high", "gflops_per_forward", "gflops_per_image", "layer_ratio", "images_per_s"]
FEWER_STEPS_STYLE = dict(color="0.35", marker="D", markersize=5, linewidth=1.3, linestyle="--")
REAL_COLOR = "tab:green"
LOSS_BOOKKEEPING = ["step", "loss", "lr", "steps_per_s"]  # loss.csv columns that are not loss parts

# One sequential colour map per family, so every set of a family shares a hue and its setting
# (threshold, t_switch) picks the shade. Early exit: blue, purple, brown and teal per classifier;
# DuoDiff: red, orange, pink per shallow depth. Green belongs to the real-data floor, greys to the
# full model's fewer-steps sets (the full model itself is black).
EARLY_EXIT_CMAPS = ["Blues", "Purples", "YlOrBr", "BuGn", "GnBu", "BuPu"]
DUODIFF_CMAPS = ["Reds", "Oranges", "RdPu"]
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


def load_table(tables_dir) -> pd.DataFrame:
    path = Path(tables_dir) / "scores.csv"
    require(path.is_file(), f"{path} does not exist (run `duodiff tables` first)")
    table = pd.read_csv(path)
    missing = [c for c in TABLE_COLUMNS if c not in table.columns]
    require(not missing, f"{path}: missing columns {', '.join(missing)}")
    require(len(table) > 0, f"{path}: has no rows")
    for column in INTEGER_COLUMNS:
        table[column] = table[column].astype("Int64")
    return table


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


# loss.csv rows are means over their logging interval. A run with fewer rows than this is drawn as
# logged: an EMA over a handful of rows lags the whole run behind (10 rows of an early-exit training
# at weight 0.9 stayed twice above the loss it smoothed).
MIN_ROWS_TO_SMOOTH = 30


def ema_smooth(values, weight: float) -> np.ndarray:
    """TensorBoard-style smoothing: exponential moving average, debiased at the start."""
    smoothed, average = [], 0.0
    for i, value in enumerate(np.asarray(values, dtype=float), start=1):
        average = weight * average + (1.0 - weight) * value
        smoothed.append(average / (1.0 - weight**i) if weight > 0 else average)
    return np.array(smoothed)


def pareto_front(sets: list[str], x: list[float], y: list[float]) -> list[str]:
    """Sets no other set beats on both cost (x) and FID (y), ordered by cost."""
    front = []
    for i in range(len(sets)):
        dominated = any(x[j] <= x[i] and y[j] <= y[i] and (x[j] < x[i] or y[j] < y[i]) for j in range(len(sets)))
        if not dominated:
            front.append(i)
    return [sets[i] for i in sorted(front, key=lambda i: (x[i], y[i]))]


# ---------------------------------------------------------------------------------------------
# FID against cost


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


def cost_scale(values) -> tuple[float, str]:
    """GFLOPs shown as MFLOPs when every value is below 1 GFLOP (the embedded models)."""
    values = pd.to_numeric(pd.Series(values), errors="coerce")
    return (1e3, "MFLOPs") if values.max() < 1 else (1.0, "GFLOPs")


def quality_figure(table: pd.DataFrame, palette: Palette, cost: str, xlabel: str, title: str):
    """The headline score (with its 95% interval as error bars) against a cost column: one line per
    early-exit classifier and DuoDiff depth, the fewer-steps baseline as a dashed line, the full
    model as a star, the shallow model alone as a square, the full model's interval as a band and
    the real-data floor as a line."""
    fig = new_figure(5.0)
    ax = fig.subplots()
    points = []  # (set, x, y) of every drawn point, for the Pareto front
    annotations = []
    real = table[table["method"] == "real"]
    table = table[table["method"] != "real"]

    def draw(group: pd.DataFrame, label: str, **style):
        xs, ys = group[cost].astype(float).tolist(), group["score"].astype(float).tolist()
        bars = error_bars(group)
        ax.errorbar(xs, ys, yerr=None if np.isnan(bars).all() else bars, label=label, capsize=2, elinewidth=0.8, **style)
        points.extend(zip(group["set"], xs, ys))
        # Settings that land on the same point (e.g. thresholds at which nothing exits early)
        # share one annotation instead of printing over each other.
        at: dict[tuple, list] = {}
        for (_, row), x, y in zip(group.iterrows(), xs, ys):
            at.setdefault((x, y), []).append(row)
        for (x, y), rows in at.items():
            text = setting_label(*rows, style="plot")
            if text:
                annotations.append({"sets": [row["set"] for row in rows], "text": text, "x": x, "y": y,
                                    "color": style["color"]})

    for (method, key), color in palette.family.items():
        if method == "early_exit":
            group = table[(table["method"] == method) & (table["classifier_type"] == key)].sort_values("threshold")
            label = f"early exit, {key}"
        else:
            group = table[(table["method"] == method) & (table["shallow_depth"] == key)].sort_values("t_switch")
            label = f"DuoDiff, {key}-block shallow"
        if len(group):
            draw(group, label, color=color, marker="o", markersize=5, linewidth=1.5)
    fewer = pd.concat([table[table["method"] == "full"], table[table["method"] == "fewer_steps"]])
    if (fewer["method"] == "fewer_steps").any():
        draw(fewer.sort_values("steps"), "full U-ViT, fewer steps", **FEWER_STEPS_STYLE)
    for _, row in table[table["method"] == "shallow"].iterrows():
        draw(table[table["set"] == row["set"]], f"shallow alone ({blocks(row['shallow_depth'])})",
             color=palette.colors[row["set"]], marker=SHALLOW_MARKER, markersize=8, linestyle="none",
             markerfacecolor="white", markeredgewidth=1.8)
    for _, row in table[table["method"] == "full"].iterrows():
        draw(table[table["set"] == row["set"]], f"full U-ViT ({blocks(row['depth'])})", **FULL_STYLE)
    draw_floor_and_full_band(ax, pd.concat([table, real]))

    sets, xs, ys = (list(v) for v in zip(*points))
    front = pareto_front(sets, xs, ys)
    where = {s: (x, y) for s, x, y in points}
    ax.plot([where[s][0] for s in front], [where[s][1] for s in front], color="0.5", linestyle=":",
            linewidth=1.2, zorder=0, drawstyle="steps-post", label="Pareto front")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(score_label(table))
    ax.set_title(title)
    bottom_legend(fig, [ax])
    labels = label_points(ax, annotations, [(x, y) for _, x, y in points], SMALL_FONT)  # last: needs the final layout
    return fig, {"x": cost, "y": "score", "series": lines_drawn(ax), "annotations": labels, "pareto": front}


def sampling_caption(table: pd.DataFrame) -> str:
    table = table[~table["method"].isin(["real", "fewer_steps"])]
    setups = table[["sampler", "steps"]].drop_duplicates()
    if len(setups) == 1:
        return f"{setups.iloc[0]['sampler']}, {setups.iloc[0]['steps']} steps"
    return "mixed samplers"


def plot_quality_vs_gflops(table, palette):
    scale, unit = cost_scale(table["gflops_per_image"])
    table = table.assign(flops_per_image=table["gflops_per_image"].astype(float) * scale)
    return quality_figure(table, palette, "flops_per_image", f"{unit} per image (all sampling steps)",
                          f"Quality against compute ({sampling_caption(table)})")


def plot_quality_vs_time(table, palette):
    table = table.assign(ms_per_image=1000.0 / table["images_per_s"].astype(float))
    return quality_figure(table, palette, "ms_per_image", "measured milliseconds per image (1000 / images per s)",
                          f"Quality against wall time ({sampling_caption(table)})")


# ---------------------------------------------------------------------------------------------
# Where early exit exits


def load_exit_layers(samples_root, row) -> "torch.Tensor":  # noqa: F821
    import torch

    path = Path(samples_root) / row["set"] / "exit_layers.pt"
    require(path.is_file(), f"{path} does not exist")
    exit_layers = torch.load(path, map_location="cpu", weights_only=True)
    ok = isinstance(exit_layers, torch.Tensor) and exit_layers.dim() == 2 and not exit_layers.is_floating_point()
    require(ok, f"{path}: expected an integer tensor (steps, n_samples), got "
                f"{getattr(exit_layers, 'shape', type(exit_layers).__name__)}")
    require(exit_layers.shape[0] == row["steps"],
            f"{path}: has {exit_layers.shape[0]} steps but the table says {row['steps']}")
    low, high = int(exit_layers.min()), int(exit_layers.max())
    require(0 <= low and high <= row["depth"],
            f"{path}: exit layers must lie in [0, {row['depth']}], found [{low}, {high}]")
    return exit_layers.long()


def exit_fractions(exit_layers, depth: int) -> np.ndarray:
    """(depth + 1, steps): fraction of samples whose exit layer is l at sampling step s."""
    import torch

    steps, n = exit_layers.shape
    # One bincount over (step, layer) pairs: index = step * (depth + 1) + layer.
    flat = exit_layers + (depth + 1) * torch.arange(steps).unsqueeze(1)
    counts = torch.bincount(flat.flatten(), minlength=steps * (depth + 1)).view(steps, depth + 1)
    return (counts.double() / n).T.numpy()


def exit_summaries(table: pd.DataFrame, samples_root) -> dict[str, np.ndarray]:
    """Every set's exit-layer fractions, read (and checked) once before anything is drawn. Only
    these (depth + 1, steps) summaries are kept: exit_layers.pt can hold millions of entries."""
    generated = table[table["method"] != "real"]
    return {row["set"]: exit_fractions(load_exit_layers(samples_root, row), int(row["depth"]))
            for _, row in tqdm(generated.iterrows(), total=len(generated), desc="exit layers", unit="set", leave=False)}


def mean_exit_layer(fractions: np.ndarray) -> np.ndarray:
    return (fractions * np.arange(fractions.shape[0])[:, None]).sum(axis=0)


def swept_families(table: pd.DataFrame, methods=("early_exit", "duodiff")) -> list[tuple[str, pd.DataFrame]]:
    """(title, sets in setting order) of every method family with a swept setting: early exit per
    classifier (thresholds), DuoDiff per shallow depth (t_switch)."""
    return [(method_label(sets.iloc[0]), sets.sort_values(SWEPT_SETTING[method]))
            for method, _, sets in method_families(table) if method in methods]


HEATMAP_COLUMNS = 3  # heat maps per row: a family with more settings wraps onto further rows
HEATMAP_HEIGHT = 1.0  # inches, one heat map


def draw_heatmap(ax, row, fractions: np.ndarray):
    """One early-exit set's exit-layer fractions by step, with its mean exit layer in white."""
    depth, steps = int(row["depth"]), int(row["steps"])
    image = ax.imshow(fractions, origin="lower", aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0,
                      interpolation="nearest", extent=(-0.5, steps - 0.5, -0.5, depth + 0.5))
    ax.plot(np.arange(steps), mean_exit_layer(fractions), color="white", linewidth=1.0, label="_mean")
    ax.set_title(f"{setting_label(row, style='plot')}, {row['score_name']} {row['score']:.2f}\n"
                 f"layer ratio {row['layer_ratio']:.2f}", fontsize=SMALL_FONT)
    ax.xaxis.set_major_locator(MaxNLocator(4, integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(4, integer=True))
    ax.grid(False)
    return image


def plot_exit_heatmap(table, palette, summaries: dict[str, np.ndarray]):
    """Where early exit exits: one row of heat maps per classifier type (its title above it), one
    heat map per threshold, one colour bar for all."""
    families = swept_families(table, methods=("early_exit",))
    n_cols = min(HEATMAP_COLUMNS, max([len(sets) for _, sets in families] + [1]))
    rows = [math.ceil(len(sets) / n_cols) for _, sets in families]
    heights = [r * (HEATMAP_HEIGHT + 0.4) + 0.25 for r in rows] + [0.55]  # heat maps, titles; colour bar
    fig = new_figure(sum(heights) + 0.3)
    fig.suptitle("Where early exit exits: exit layer by sampling step\n(colour: fraction of samples; white: mean)")
    data = {"heatmaps": {}}
    if not families:
        fig.text(0.5, 0.5, "No early-exit sample sets in this study", ha="center", va="center", color="0.4")
        return fig, data
    parts = fig.subfigures(len(heights), 1, height_ratios=heights)
    image = None
    for i, (part, (title, sets), n_rows) in enumerate(zip(parts, families, rows)):
        part.suptitle(title, fontsize=8, fontweight="bold")
        axes = part.subplots(n_rows, n_cols, squeeze=False, sharex=True, sharey=True)
        for ax, (_, row) in zip(axes.flatten(), sets.iterrows()):
            image = draw_heatmap(ax, row, summaries[row["set"]])
            data["heatmaps"][row["set"]] = {"classifier_type": row["classifier_type"],
                                            "threshold": float(row["threshold"]),
                                            "fraction": np.asarray(image.get_array()).tolist()}
        for ax in axes.flatten()[len(sets):]:
            ax.set_visible(False)
        for ax in axes[:, 0]:
            ax.set_ylabel("exit layer")
        if i == len(families) - 1:  # the step axis is labelled once, under the last row
            for ax in axes[-1]:
                ax.set_xlabel("sampling step")
    cax = parts[-1].add_axes((0.2, 0.62, 0.6, 0.14))
    parts[-1].colorbar(image, cax=cax, orientation="horizontal",
                       label="fraction of samples exiting (step 0: the noisiest)")
    return fig, data


def plot_mean_exit_layer(table, palette, summaries: dict[str, np.ndarray]):
    """The mean exit layer per sampling step, one panel per method family (early exit per
    classifier type, DuoDiff per shallow depth), its settings as lines; the full model (dashed)
    and, for DuoDiff, the shallow model alone (dotted) as references."""
    families = swept_families(table)
    n_cols = 2 if len(families) > 1 else 1
    n_rows = max(1, math.ceil(len(families) / n_cols))
    fig = new_figure(1.6 * n_rows + 0.7)
    axes = fig.subplots(n_rows, n_cols, squeeze=False, sharex=True, sharey=True).flatten()
    fig.suptitle("Mean exit layer per sampling step\n(dashed: full U-ViT; dotted: shallow model alone)")
    fig.supxlabel("sampling step (0 = noisiest)")
    fig.supylabel("mean blocks run")
    data = {"panels": []}
    for ax, (title, sets) in zip(axes, families):
        draw_mean_exit_panel(ax, table, palette, summaries, sets)
        ax.set_title(wrap_label(title), fontsize=8)
        data["panels"].append({"title": title, "series": lines_drawn(ax)})
    for ax in axes[len(families):]:
        ax.set_visible(False)
    if not families:
        axes[0].set_visible(True)
        axes[0].text(0.5, 0.5, "No early-exit or DuoDiff sample sets in this study", ha="center", va="center",
                     color="0.4", transform=axes[0].transAxes)
    axes[0].set_ylim(bottom=0)
    return fig, data


def draw_mean_exit_panel(ax, table, palette, summaries, sets: pd.DataFrame) -> None:
    """One family's settings as mean-exit-layer lines, with a legend of the settings alone."""
    references = table[table["method"] == "full"]
    if sets["method"].iloc[0] == "duodiff":
        depth = sets["shallow_depth"].iloc[0]
        references = pd.concat([references, table[(table["method"] == "shallow") & (table["shallow_depth"] == depth)]])
    for _, row in references.iterrows():
        mean = mean_exit_layer(summaries[row["set"]])
        ax.plot(np.arange(len(mean)), mean, color=palette.colors[row["set"]], linewidth=1.0, zorder=3,
                linestyle="--" if row["method"] == "full" else ":", label=method_label(row))
    settings = []
    for _, row in sets.iterrows():
        mean = mean_exit_layer(summaries[row["set"]])
        (line,) = ax.plot(np.arange(len(mean)), mean, color=palette.colors[row["set"]], linewidth=1.4,
                          drawstyle="steps-mid", label=setting_label(row, style="plot"))
        settings.append(line)
    ax.legend(handles=settings, loc="best", handlelength=1.2, borderaxespad=0.2, framealpha=0.85, edgecolor="none")


# ---------------------------------------------------------------------------------------------
# DuoDiff's switch point


def plot_fid_vs_tswitch(table, palette):
    fig = new_figure(4.0)
    ax = fig.subplots()
    depths = sorted(table.loc[table["method"].isin(["duodiff", "shallow"]), "shallow_depth"].dropna().unique())
    for depth in depths:
        duo = table[(table["method"] == "duodiff") & (table["shallow_depth"] == depth)].sort_values("t_switch")
        shallow = table[(table["method"] == "shallow") & (table["shallow_depth"] == depth)]
        # Shallow alone is DuoDiff with t_switch = steps: the shallow model runs every step.
        both = pd.concat([duo, shallow.assign(t_switch=shallow["steps"])])
        xs, ys = both["t_switch"].astype(float).tolist(), both["score"].astype(float).tolist()
        color = palette.family.get(("duodiff", depth), palette.colors.get(next(iter(shallow["set"]), ""), "0.4"))
        bars = error_bars(both)
        ax.errorbar(xs, ys, yerr=None if np.isnan(bars).all() else bars, color=color, marker="o", markersize=5,
                    capsize=2, elinewidth=0.8, label=f"DuoDiff, {depth}-block shallow")
        if len(shallow):
            ax.plot(shallow["steps"].astype(float), shallow["score"].astype(float), color=color, marker=SHALLOW_MARKER,
                    markersize=9, markerfacecolor="white", markeredgewidth=1.8, linestyle="none",
                    label=f"shallow alone ({blocks(depth)})")
    for _, row in table[table["method"] == "full"].iterrows():
        ax.axhline(float(row["score"]), color="black", linestyle="--", linewidth=1.2,
                   label=f"full U-ViT ({blocks(row['depth'])})")
        # The full model is DuoDiff with t_switch = 0: a star there anchors the curve's left end.
        ax.plot([0.0], [float(row["score"])], label="_full_at_zero", **FULL_STYLE)
    draw_floor_and_full_band(ax, table)
    steps = int(table.loc[table["method"] != "real", "steps"].max())
    ax.set_xlim(-0.03 * steps, 1.03 * steps)  # the whole range: 0 = full model alone, steps = shallow alone
    ax.set_xlabel(f"t_switch: first steps run by the shallow model\n(0: full model alone; {steps}: shallow alone)")
    ax.set_ylabel(score_label(table))
    ax.set_title(f"DuoDiff: {table['score_name'].iloc[0]} against the switch step ({sampling_caption(table)})")
    bottom_legend(fig, [ax])
    if not depths:
        ax.text(0.5, 0.5, "no DuoDiff or shallow sample sets in this study", transform=ax.transAxes,
                ha="center", va="center", color="0.4")
    # axhline's x data are axes fractions, not steps: record the full model's FID as a number.
    series = [{**s, "x": None} if s["label"].startswith("full U-ViT") else s for s in lines_drawn(ax)]
    return fig, {"series": series}


# ---------------------------------------------------------------------------------------------
# Training


def find_loss_files(models_root) -> list[Path]:
    models_root = Path(models_root)
    require(models_root.is_dir(), f"--models-root {models_root} is not a folder")
    paths = sorted(models_root.glob("*/loss.csv"))
    require(len(paths) > 0, f"no trained models under {models_root}: expected {models_root}/<model>/loss.csv")
    return paths


def loss_parts(log: pd.DataFrame) -> list[str]:
    """The loss terms a log holds beside the total; a term that is never positive (a loss that
    was switched off, e.g. loss_unweighted without --use-unweighted-loss) has no log-scale curve."""
    return [c for c in log.columns if c not in LOSS_BOOKKEEPING
            and (pd.to_numeric(log[c], errors="coerce") > 0).any()]


# One panel per kind of loss: a U-ViT's denoising MSE is not on the scale of an early-exit model's
# total (a sum over exits), nor its terms on each other's.
UVIT_LOSS = "U-ViT models: denoising MSE"
EARLY_EXIT_TOTAL = "Early exit: total loss"
PART_TITLES = {
    "loss_simple": "loss_simple (final MSE)",
    "loss_u": "loss_u (uncertainty error)",
    "loss_ual": "loss_ual (uncertainty-aware)",
    "loss_unweighted": "loss_unweighted (exit MSE)",
}
LOG_SCALE_RANGE = 3.0  # a panel whose curves span more than this factor gets a log y axis


def read_loss_logs(loss_files: list[Path]) -> dict[str, pd.DataFrame]:
    logs = {}
    for path in loss_files:
        log = pd.read_csv(path)
        missing = [c for c in ("step", "loss") if c not in log.columns]
        require(not missing, f"{path}: missing columns {', '.join(missing)}")
        require(len(log) > 0, f"{path}: has no rows")
        logs[path.parent.name] = log
    return logs


def loss_panels(logs: dict[str, pd.DataFrame]) -> list[tuple[str, list[tuple[str, str]]]]:
    """(title, [(model, column)]) per kind of loss: the U-ViT models' loss, the early-exit models'
    total (models that log loss terms), then each term."""
    uvit = [(name, "loss") for name, log in logs.items() if not loss_parts(log)]
    early = [name for name, log in logs.items() if loss_parts(log)]
    terms = list(dict.fromkeys(part for name in early for part in loss_parts(logs[name])))
    panels = [(UVIT_LOSS, uvit)] if uvit else []
    if early:
        panels.append((EARLY_EXIT_TOTAL, [(name, "loss") for name in early]))
    for term in terms:
        panels.append((PART_TITLES.get(term, term), [(name, term) for name in early if term in loss_parts(logs[name])]))
    return panels


def plot_training_curves(loss_files: list[Path], smoothing: float):
    logs = read_loss_logs(loss_files)
    panels = loss_panels(logs)
    n_cols = 2 if len(panels) > 1 else 1
    n_rows = math.ceil(len(panels) / n_cols)
    fig = new_figure(1.55 * n_rows + 1.3)
    axes = fig.subplots(n_rows, n_cols, squeeze=False).flatten()
    colors = {name: colormaps["tab10"](i % 10) for i, name in enumerate(logs)}  # a model's colour in every panel
    data = {"smoothing": smoothing, "panels": []}
    for ax, (title, curves) in zip(axes, panels):
        for name, column in curves:
            log = logs[name]
            raw = log[column].to_numpy(float)
            if len(log) < MIN_ROWS_TO_SMOOTH:  # each row already averages its logging interval
                ax.plot(log["step"], raw, color=colors[name], linewidth=1.4, label=name)
                continue
            ax.plot(log["step"], raw, color=colors[name], alpha=0.25, linewidth=0.8, label="_raw")
            ax.plot(log["step"], ema_smooth(log[column], smoothing), color=colors[name], linewidth=1.4, label=name)
        loss_axis(ax, [logs[name][column] for name, column in curves])
        ax.set_title(wrap_label(title), fontsize=8)
        ax.set_xlabel("training step")
        data["panels"].append({"title": title, "series": lines_drawn(ax)})
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if panels and panels[0][0] == UVIT_LOSS:  # its models in its own legend, the early-exit ones below
        axes[0].legend(handlelength=1.2, framealpha=0.85, edgecolor="none")
    early_axes = [ax for ax, (title, _) in zip(axes, panels) if title != UVIT_LOSS]
    if early_axes:
        bottom_legend(fig, early_axes[:1])
    fig.suptitle(f"Training loss by kind: interval means\n(faint, and smoothed by an EMA {smoothing:g} in runs"
                 f" of {MIN_ROWS_TO_SMOOTH}+ rows)")
    return fig, data


def loss_axis(ax, values: list[pd.Series]) -> None:
    """A log y axis where the curves span more than LOG_SCALE_RANGE, ticked 1-2-5 in plain numbers
    (no 10^x superscripts, which print smaller than the other labels); else linear."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    numbers = pd.concat(values).astype(float)
    numbers = numbers[numbers > 0]
    if numbers.empty or numbers.max() <= LOG_SCALE_RANGE * numbers.min():
        return
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


# ---------------------------------------------------------------------------------------------
# Samples


def image_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png"))


def grid_from_images(paths: list[Path], n_images: int) -> np.ndarray:
    """The grid `duodiff sample` writes as grid.png (duodiff.images.image_grid), from the first
    images, as (H, W, 3) uint8; so real images and rebuilt grids look like the sample sets' grid.png."""
    import torch  # here, not at the top: `duodiff plots` needs torch only without grid.png files
    from PIL import Image

    from duodiff.images import image_grid

    images = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)
                          for p in paths[:n_images]])
    return image_grid(images).permute(1, 2, 0).numpy()


def sample_grid(samples_root, name: str, n_images: int) -> tuple[np.ndarray, str]:
    """A set's grid image (H, W, 3) uint8 and where it came from."""
    from PIL import Image

    folder = Path(samples_root) / name
    if (folder / "grid.png").is_file():
        return np.asarray(Image.open(folder / "grid.png").convert("RGB")), str(folder / "grid.png")
    paths = image_files(folder / "images")
    require(len(paths) > 0, f"{folder} has neither grid.png nor images/*.png")
    return grid_from_images(paths, n_images), f"{folder / 'images'} (first {min(n_images, len(paths))})"


GRID_COLUMNS = 4  # sample grids per row: a family with more settings wraps onto further rows


def grid_title(row) -> str:
    """A sample grid's title: the set within its row of the figure, and its score."""
    if row["method"] in ("early_exit", "duodiff"):
        what = setting_label(row, style="plot")
    elif row["method"] == "shallow":
        what = f"shallow, {blocks(row['shallow_depth'])}"
    else:
        what = "full U-ViT" if row["method"] == "full" else f"full, {row['steps']} steps"
    return f"{what}\n{row['score_name']} {row['score']:.2f}"


def sample_panels(table, samples_root, reference, n_images: int) -> list[tuple[str, list[tuple]]]:
    """(row title, [(title, grid, source, set)]): the real images and the references (full model,
    fewer steps, shallow alone) first, then one row per method family in setting order."""
    # As many real images as the sample grids hold (a set grid has its first <= n_images samples).
    n_real = min(n_images, int(table.loc[table["method"] != "real", "n_samples"].min()))
    reference_images = image_files(Path(reference) / "images")
    real = ("real images", grid_from_images(reference_images, n_real),
            f"{Path(reference) / 'images'} (first {min(n_real, len(reference_images))})", None)

    def panels(sets: pd.DataFrame) -> list[tuple]:
        return [(grid_title(row), *sample_grid(samples_root, row["set"], n_images), row["set"])
                for _, row in sets.iterrows()]

    references = table[table["method"].isin(["full", "fewer_steps", "shallow"])]
    return [("Real images and references", [real, *panels(references)])] + [
        (title, panels(sets)) for title, sets in swept_families(table)]


def plot_sample_grids(table, samples_root, reference, n_images: int):
    groups = sample_panels(table, samples_root, reference, n_images)
    # As many columns as a family has settings, so that each family is one row where it can be.
    n_cols = min(GRID_COLUMNS, max([len(panels) for _, panels in groups[1:]] or [len(groups[0][1])]))
    # Panel height from the tallest grid's aspect, plus room for a two-line title; a row title each.
    aspect = max(grid.shape[0] / grid.shape[1] for _, panels in groups for _, grid, _, _ in panels)
    rows = [math.ceil(len(panels) / n_cols) for _, panels in groups]
    heights = [r * (FIGURE_WIDTH / n_cols * aspect + 0.35) + 0.25 for r in rows]
    fig = new_figure(sum(heights) + 0.5)
    seeds = sorted(table.loc[table["method"] != "real", "seed"].dropna().unique().tolist())
    same_seed = f"same seed ({seeds[0]}) for every set: grids start from the same noise" if len(seeds) == 1 \
        else f"seeds differ between sets ({', '.join(map(str, seeds))}): grids are not noise-matched"
    fig.suptitle(f"Samples ({sampling_caption(table)})\n{same_seed}")
    data = {"panels": []}
    for part, (row_title, panels), n_rows in zip(fig.subfigures(len(groups), 1, height_ratios=heights), groups, rows):
        part.suptitle(row_title, fontsize=8, fontweight="bold")
        axes = part.subplots(n_rows, n_cols, squeeze=False).flatten()
        for ax, (title, grid, source, name) in zip(axes, panels):
            ax.imshow(grid, interpolation="nearest")
            ax.set_anchor("N")  # panels of different heights line up at their titles
            ax.set_title(title, fontsize=SMALL_FONT)
            ax.set_axis_off()
            data["panels"].append({"set": name, "row": row_title, "title": title, "source": source,
                                   "shape": list(grid.shape)})
        for ax in axes[len(panels):]:
            ax.set_visible(False)
    return fig, data


# ---------------------------------------------------------------------------------------------


def save_figure(fig: Figure, data: dict, output_dir: Path, name: str, dpi: int) -> None:
    with atomic_path(output_dir / f"{name}.png") as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    with atomic_path(output_dir / f"{name}.pdf") as tmp:
        fig.savefig(tmp, format="pdf", metadata={"CreationDate": None})  # no date: same input, same bytes
    write_json(output_dir / f"{name}.json", data)


def run_plots(tables_dir, samples_root, models_root, reference, output_dir, smoothing: float = 0.9,
              dpi: int = 150, grid_images: int = 64) -> dict[str, dict]:
    """Draw every figure into output_dir (png, pdf and the data as json); return the data per figure."""
    # Check every input before drawing anything.
    require(0.0 <= smoothing < 1.0, f"--smoothing must be in [0, 1); got {smoothing!r}")
    check_positive("--dpi", dpi)
    check_positive("--grid-images", grid_images)
    table = load_table(tables_dir)
    samples_root, reference, output_dir = Path(samples_root), Path(reference), Path(output_dir)
    for name in table["set"]:
        folder = samples_root / name
        require((folder / "grid.png").is_file() or image_files(folder / "images"),
                f"{folder} has neither grid.png nor images/*.png")
    require(image_files(reference / "images"), f"{reference / 'images'} holds no real images (*.png)")
    loss_files = find_loss_files(models_root)
    summaries = exit_summaries(table, samples_root)

    palette = Palette(table)
    builders = {
        "quality_vs_gflops": lambda: plot_quality_vs_gflops(table, palette),
        "quality_vs_time": lambda: plot_quality_vs_time(table, palette),
        "exit_heatmap": lambda: plot_exit_heatmap(table, palette, summaries),
        "mean_exit_layer": lambda: plot_mean_exit_layer(table, palette, summaries),
        "fid_vs_tswitch": lambda: plot_fid_vs_tswitch(table, palette),
        "training_curves": lambda: plot_training_curves(loss_files, smoothing),
        "sample_grids": lambda: plot_sample_grids(table, samples_root, reference, grid_images),
    }
    from matplotlib import rc_context

    results = {}
    with rc_context(STYLE):
        for name in tqdm(PLOT_NAMES, desc="plots", unit="figure"):
            fig, data = builders[name]()
            save_figure(fig, data, output_dir, name, dpi)
            results[name] = data
    return results


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser("plots", help="the study's figures (png + pdf) from the tables and sample sets",
                                   description=__doc__.split("\n\n")[0])
    add_flag(parser, "--tables-dir", required=True, help="folder with fid.csv (from `duodiff tables`)")
    add_flag(parser, "--samples-root", required=True, help="results/<dataset>/samples")
    add_flag(parser, "--models-root", required=True, help="results/<dataset>/models (each model's loss.csv)")
    add_flag(parser, "--reference", required=True, help="results/<dataset>/reference (real images)")
    add_flag(parser, "--output-dir", required=True, help="where the figures go, e.g. results/digits/plots")
    add_flag(parser, "--smoothing", type=float, default=0.9, help="EMA weight of the smoothed training curves, in [0, 1)")
    add_flag(parser, "--dpi", type=int, default=150, help="resolution of the png figures")
    add_flag(parser, "--grid-images", type=int, default=64, help="images per sample grid when rebuilt from images/")
    parser.set_defaults(func=lambda args: run_plots(
        tables_dir=args.tables_dir, samples_root=args.samples_root, models_root=args.models_root,
        reference=args.reference, output_dir=args.output_dir, smoothing=args.smoothing, dpi=args.dpi,
        grid_images=args.grid_images))
