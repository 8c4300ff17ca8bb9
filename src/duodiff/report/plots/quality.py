"""`duodiff plots`: the study's figures, drawn from the tables and the sample-set folders.

Each figure is saved as `<name>.png` (raster, for the report) and `<name>.pdf` (vector, for
papers), atomically, under fixed names (docs/architecture.md, "Tables and plots"):

    quality_vs_gflops   the headline score against GFLOPs per image: the Pareto picture
    paired_difference   each set's paired difference to the full model against its speed-up, with
                        the equal-quality margin: one panel per method family
    quality_vs_time     the headline score against measured milliseconds per image
    exit_heatmap        where early exit exits: exit layer by sampling step, per early-exit set
    mean_exit_layer     mean exit layer by sampling step, one panel per method family
    fid_vs_tswitch      DuoDiff's headline score against t_switch, per shallow depth
    training_curves     training loss against step, one panel per kind of loss
    sample_grids        sample grids of every set beside real images, one row per method family

Every figure is drawn about a paper column wide (FIGURE_WIDTH) with SMALL_FONT as its smallest
type, so that it stays legible at a column's 3.3 inches. Beside each figure, `<name>.json` holds the data series as drawn (read back from the figure's
artists), so a reader or a test can check a figure against the tables it claims to show. Beside
the figures, `reference_grid.png`: the first real images laid out like a sample set's grid.png (the
report's Samples show it beside the sets' grids).

The figures are drawn by one module per family: the quality figures (quality against cost and
against t_switch) here, exits.py (where early exit exits), training.py (training
curves), samples.py (sample grids); style.py holds what they share.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from tqdm import tqdm

from duodiff.core.errors import check_positive, require
from duodiff.core.flags import add_flag
from duodiff.core.io import atomic_path, write_json
from duodiff.core.study import setting_label
from duodiff.report.plots.difference import plot_paired_difference
from duodiff.report.plots.exits import (
    exit_summaries,
    plot_exit_heatmap,
    plot_mean_exit_layer,
)
from duodiff.report.plots.labels import label_points
from duodiff.report.plots.samples import grid_from_images, image_files, plot_sample_grids
from duodiff.report.plots.search import load_search, plot_search_trace
from duodiff.report.plots.style import (
    FEWER_STEPS_STYLE,
    FULL_STYLE,
    SHALLOW_MARKER,
    SMALL_FONT,
    STYLE,
    Palette,
    bottom_legend,
    draw_floor_and_full_band,
    error_bars,
    legend_entries,
    lines_drawn,
    new_figure,
    sampling_caption,
    score_label,
    wrap_label,
)
from duodiff.report.plots.training import find_loss_files, plot_training_curves
from duodiff.report.tables.collect import INTEGER_COLUMNS, blocks
from duodiff.report.tables.operating_points import method_families, with_cache_fields

PLOT_NAMES = ["quality_vs_gflops", "paired_difference", "quality_vs_time", "exit_heatmap", "mean_exit_layer", "fid_vs_tswitch",
              "training_curves", "sample_grids", "search_trace"]
TABLE_COLUMNS = ["set", "method", "setting", "classifier_type", "threshold", "t_switch", "shallow_depth",
                 "depth", "sampler", "steps", "seed", "n_samples", "score_name", "score", "score_ci_low",
                 "score_ci_high", "score_diff", "score_diff_ci_low", "score_diff_ci_high", "verdict", "margin",
                 "quality_limit", "gflops_per_forward", "gflops_per_image", "layer_ratio", "images_per_s",
                 "speedup_theoretical"]


def load_table(tables_dir) -> pd.DataFrame:
    path = Path(tables_dir) / "scores.csv"
    require(path.is_file(), f"{path} does not exist (run `duodiff tables` first)")
    table = pd.read_csv(path)
    missing = [c for c in TABLE_COLUMNS if c not in table.columns]
    require(not missing, f"{path}: missing columns {', '.join(missing)}")
    require(len(table) > 0, f"{path}: has no rows")
    table = with_cache_fields(table)  # caching's N and k, from the cache sets' names
    for column in INTEGER_COLUMNS:
        table[column] = table[column].astype("Int64")
    return table


def pareto_front(sets: list[str], x: list[float], y: list[float]) -> list[str]:
    """Sets no other set beats on both cost (x) and FID (y), ordered by cost."""
    front = []
    for i in range(len(sets)):
        dominated = any(x[j] <= x[i] and y[j] <= y[i] and (x[j] < x[i] or y[j] < y[i]) for j in range(len(sets)))
        if not dominated:
            front.append(i)
    return [sets[i] for i in sorted(front, key=lambda i: (x[i], y[i]))]


class QualitySeries:
    """The series of one quality figure, drawn on `ax` against the cost column `cost`: every point
    is kept for the Pareto front, every setting's annotation for label_points."""

    def __init__(self, ax, cost: str):
        self.ax, self.cost = ax, cost
        self.points: list[tuple] = []  # (set, x, y) of every drawn point
        self.bar_ends: list[tuple] = []  # (x, y) of every error bar's two ends: labels keep off them too
        self.annotations: list[dict] = []

    def draw(self, group: pd.DataFrame, label: str, **style) -> None:
        xs, ys = group[self.cost].astype(float).tolist(), group["score"].astype(float).tolist()
        bars = error_bars(group)
        self.ax.errorbar(xs, ys, yerr=None if np.isnan(bars).all() else bars, label=label, capsize=2,
                         elinewidth=0.8, **style)
        self.points.extend(zip(group["set"], xs, ys))
        for x, y, (down, up) in zip(xs, ys, bars.T):
            if not np.isnan(down):
                self.bar_ends += [(x, y - down), (x, y + up)]
        # Settings that land on the same point (e.g. thresholds at which nothing exits early)
        # share one annotation instead of printing over each other.
        at: dict[tuple, list] = {}
        for (_, row), x, y in zip(group.iterrows(), xs, ys):
            at.setdefault((x, y), []).append(row)
        for (x, y), rows in at.items():
            text = setting_label(*rows, style="plot")
            if text:
                self.annotations.append({"sets": [row["set"] for row in rows], "text": text, "x": x, "y": y,
                                         "color": style["color"]})

    def draw_methods(self, table: pd.DataFrame, palette: Palette) -> None:
        """One line per early-exit classifier, DuoDiff depth, caching k and composed family, the
        fewer-steps baseline as a dashed line, the full model as a star, the shallow model alone as a
        square."""
        for (method, key), color in palette.family.items():
            if method == "early_exit":
                group = table[(table["method"] == method) & (table["classifier_type"] == key)].sort_values("threshold")
                label = f"early exit, {key}"
            elif method in ("composed", "cache", "l2c"):  # a family's sets in its knob's order (Palette.members), those drawn here
                names = [name for name in palette.members[(method, key)] if name in set(table["set"])]
                group = table.set_index("set").loc[names].reset_index()
                label = {"composed": f"composed, {key}", "cache": f"caching, {key}"}.get(method, "Learning-to-Cache")
            else:
                group = table[(table["method"] == method) & (table["shallow_depth"] == key)].sort_values("t_switch")
                label = f"DuoDiff, {key}-block shallow"
            if len(group):
                self.draw(group, label, color=color, marker="o", markersize=5, linewidth=1.5)
        fewer = pd.concat([table[table["method"] == "full"], table[table["method"] == "fewer_steps"]])
        if (fewer["method"] == "fewer_steps").any():
            self.draw(fewer.sort_values("steps"), "full U-ViT, fewer steps", **FEWER_STEPS_STYLE)
        for _, row in table[table["method"] == "shallow"].iterrows():
            self.draw(table[table["set"] == row["set"]], f"shallow alone ({blocks(row['shallow_depth'])})",
                      color=palette.colors[row["set"]], marker=SHALLOW_MARKER, markersize=8, linestyle="none",
                      markerfacecolor="white", markeredgewidth=1.8)
        for _, row in table[table["method"] == "full"].iterrows():
            self.draw(table[table["set"] == row["set"]], f"full U-ViT ({blocks(row['depth'])})", **FULL_STYLE)

def draw_pareto_front(ax, front: list[str], where: dict) -> None:
    ax.plot([where[s][0] for s in front], [where[s][1] for s in front], color="0.5", linestyle=":",
            linewidth=1.2, zorder=0, drawstyle="steps-post", label="Pareto front")


PANEL_HEIGHT = 1.75  # inches per row of the quality figures' panels (two panels a row)
# What every panel shows, keyed once in the legend below them; the families are the panels' titles.
SHARED_ENTRIES = ("full U-ViT", "shallow alone", "full model's 95% CI", "real data (floor)", "Pareto front")


def quality_panels(table: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(title, sets) of one panel per method family: fewer steps, early exit per probe, DuoDiff per
    shallow depth with its shallow model alone, each composed family. Each panel also gets the full model and the floor,
    so no family's line hides another's (the four probes' lines overlapped in one panel)."""
    panels = []
    fewer = table[table["method"] == "fewer_steps"]
    if len(fewer):
        panels.append(("Fewer steps", fewer))
    for classifier in sorted(table.loc[table["method"] == "early_exit", "classifier_type"].dropna().unique()):
        sets = table[(table["method"] == "early_exit") & (table["classifier_type"] == classifier)]
        panels.append((f"Early exit, {classifier}", sets))
    depths = sorted(table.loc[table["method"].isin(["duodiff", "shallow"]), "shallow_depth"].dropna().unique())
    for depth in depths:
        sets = table[table["method"].isin(["duodiff", "shallow"]) & (table["shallow_depth"] == depth)]
        panels.append((f"DuoDiff, {depth}-block shallow", sets))
    for method, family, sets in method_families(table):  # caching per keep_blocks, one panel per composed entry
        if method == "cache":
            panels.append((f"Caching, {family}", sets))
        if method == "l2c":
            panels.append(("Learning-to-Cache", sets))
        if method == "composed":
            panels.append((f"Composed: {family}", sets))
    return panels or [("Full U-ViT", table.iloc[0:0])]


def quality_figure(table: pd.DataFrame, palette: Palette, cost: str, xlabel: str, title: str):
    """The headline score (with its 95% interval as error bars) against a cost column, as small
    multiples: one panel per method family (quality_panels) on shared axes, each with the full
    model (star and its interval as a band), the real-data floor and the Pareto front of all sets."""
    real = table[table["method"] == "real"]
    table = table[table["method"] != "real"]
    full = table[table["method"] == "full"]
    panels = quality_panels(table)
    ncols = 2 if len(panels) > 1 else 1
    nrows = math.ceil(len(panels) / ncols)
    fig = new_figure(PANEL_HEIGHT * nrows + 1.1)
    axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False).ravel()
    drawn = []
    for ax, (panel_title, sets) in zip(axes, panels):
        series = QualitySeries(ax, cost)
        series.draw_methods(pd.concat([full, sets]), palette)
        draw_floor_and_full_band(ax, pd.concat([full, real]))
        ax.set_title(wrap_label(panel_title, 30), fontsize=SMALL_FONT + 0.5)
        drawn.append(series)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for i, ax in enumerate(axes[: len(panels)]):
        if i + ncols >= len(panels):  # no panel below: its x axis is labelled (a fig.supxlabel met the legend)
            ax.tick_params(labelbottom=True)
            ax.set_xlabel(xlabel)
    points = [point for series in drawn for point in series.points]
    sets, xs, ys = (list(v) for v in zip(*points))
    front = pareto_front(sets, xs, ys)
    for series in drawn:
        draw_pareto_front(series.ax, front, {s: (x, y) for s, x, y in points})
    fig.supylabel(score_label(table))
    fig.suptitle(title)
    handles, labels = legend_entries(axes[: len(panels)])
    shared = [(h, label) for h, label in zip(handles, labels) if label.startswith(SHARED_ENTRIES)]
    fig.legend(*zip(*shared), loc="outside lower center", ncols=2, frameon=False)
    labels = []
    everywhere = [(x, y) for _, x, y in points]  # every panel draws them all: the Pareto front's corners
    for series in drawn:  # last: needs the final layout
        labels += label_points(series.ax, series.annotations, everywhere + series.bar_ends, SMALL_FONT)
    # Each series once (the full model, band and floor are drawn in every panel).
    unique = {}
    for series in drawn:
        for line in lines_drawn(series.ax):
            unique.setdefault(line["label"], line)
    return fig, {"x": cost, "y": "score", "series": list(unique.values()), "annotations": labels, "pareto": front,
                 "panels": [{"title": t, "sets": s["set"].tolist()} for t, s in panels]}


def plot_quality_vs_gflops(table, palette):
    # GFLOPs per image, the unit of the tables too (cells.SUMMARY_COLUMNS), however small the model.
    return quality_figure(table, palette, "gflops_per_image", "GFLOPs per image",
                          f"Quality against compute ({sampling_caption(table)})")


def plot_quality_vs_time(table, palette):
    table = table.assign(ms_per_image=1000.0 / table["images_per_s"].astype(float))
    return quality_figure(table, palette, "ms_per_image", "measured ms per image",
                          f"Quality against wall time ({sampling_caption(table)})")


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


def save_figure(fig: Figure, data: dict, output_dir: Path, name: str, dpi: int) -> None:
    with atomic_path(output_dir / f"{name}.png") as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    with atomic_path(output_dir / f"{name}.pdf") as tmp:
        fig.savefig(tmp, format="pdf", metadata={"CreationDate": None})  # no date: same input, same bytes
    write_json(output_dir / f"{name}.json", data)


def run_plots(*, tables_dir, samples_root, models_root, reference, output_dir, smoothing: float, dpi: int,
              grid_images: int) -> dict[str, dict]:
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
    search = load_search(tables_dir)

    palette = Palette(table)
    builders = {
        "quality_vs_gflops": lambda: plot_quality_vs_gflops(table, palette),
        "paired_difference": lambda: plot_paired_difference(table, palette),
        "quality_vs_time": lambda: plot_quality_vs_time(table, palette),
        "exit_heatmap": lambda: plot_exit_heatmap(table, palette, summaries),
        "mean_exit_layer": lambda: plot_mean_exit_layer(table, palette, summaries),
        "fid_vs_tswitch": lambda: plot_fid_vs_tswitch(table, palette),
        "training_curves": lambda: plot_training_curves(loss_files, smoothing),
        "sample_grids": lambda: plot_sample_grids(table, samples_root, reference, grid_images),
        "search_trace": lambda: plot_search_trace(search),
    }
    from matplotlib import rc_context

    results = {}
    with rc_context(STYLE):
        for name in tqdm(PLOT_NAMES, desc="plots", unit="figure"):
            fig, data = builders[name]()
            save_figure(fig, data, output_dir, name, dpi)
            results[name] = data
    # The real images' grid, laid out like a sample set's grid.png (its first 64 images, 8 a row),
    # for the report's Samples beside the sets' grids.
    from PIL import Image

    with atomic_path(output_dir / REFERENCE_GRID) as path:
        Image.fromarray(grid_from_images(image_files(reference / "images"), REFERENCE_GRID_IMAGES)).save(path, format="PNG")
    return results


REFERENCE_GRID = "reference_grid.png"
REFERENCE_GRID_IMAGES = 64  # as many as a set's grid.png (duodiff.sample.sample_set.GRID_SAMPLES)


# The folders `duodiff plots` reads and writes, all required.
FOLDER_FLAGS = {
    "--tables-dir": "folder with fid.csv (from `duodiff tables`)",
    "--samples-root": "results/<dataset>/samples",
    "--models-root": "results/<dataset>/models (each model's loss.csv)",
    "--reference": "results/<dataset>/reference (real images)",
    "--output-dir": "where the figures go, e.g. results/digits/plots",
}


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser("plots", help="the study's figures (png + pdf) from the tables and sample sets",
                                   description=__doc__.split("\n\n")[0])
    for flag, what in FOLDER_FLAGS.items():
        add_flag(parser, flag, required=True, help=what)
    add_flag(parser, "--smoothing", type=float, default=0.9, help="EMA weight of the smoothed training curves, in [0, 1)")
    add_flag(parser, "--dpi", type=int, default=150, help="resolution of the png figures")
    add_flag(parser, "--grid-images", type=int, default=64, help="images per sample grid when rebuilt from images/")
    parser.set_defaults(func=lambda args: run_plots(
        tables_dir=args.tables_dir, samples_root=args.samples_root, models_root=args.models_root,
        reference=args.reference, output_dir=args.output_dir, smoothing=args.smoothing, dpi=args.dpi,
        grid_images=args.grid_images))
