"""Where early exit exits: the exit layers each set's sampling recorded (exit_layers.pt), as
fractions per step and layer, drawn as heat maps (exit_heatmap) and as mean exit layer per step
(mean_exit_layer)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator
from tqdm import tqdm

from duodiff.core.errors import require
from duodiff.core.study import setting_label
from duodiff.report.plots.style import SMALL_FONT, lines_drawn, new_figure, swept_families, wrap_label
from duodiff.report.tables.collect import method_label


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


HEATMAP_COLUMNS = 3  # heat maps per row: a family with more settings wraps onto further rows
HEATMAP_HEIGHT = 1.0  # inches, one heat map


def draw_heatmap(ax, row, fractions: np.ndarray):
    """One early-exit set's exit-layer fractions by step, with its mean exit layer in white."""
    depth, steps = int(row["depth"]), int(row["steps"])
    image = ax.imshow(fractions, origin="lower", aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0,
                      interpolation="nearest", extent=(-0.5, steps - 0.5, -0.5, depth + 0.5))
    ax.plot(np.arange(steps), mean_exit_layer(fractions), color="white", linewidth=1.0, label="_mean")
    # The setting on a line of its own: a composed set's ("τ=0.12, 20 steps") would run into its
    # neighbour's title beside it.
    ax.set_title(f"{setting_label(row, style='plot')}\n{row['score_name']} {row['score']:.2f}\n"
                 f"layer ratio {row['layer_ratio']:.2f}", fontsize=SMALL_FONT)
    ax.xaxis.set_major_locator(MaxNLocator(4, integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(4, integer=True))
    ax.grid(False)
    return image


def plot_exit_heatmap(table, palette, summaries: dict[str, np.ndarray]):
    """Where early exit exits: one row of heat maps per classifier type (its title above it), one
    heat map per threshold, one colour bar for all."""
    # Early exit alone, every composed family with an exit rule (its sets have a threshold), and
    # caching, whose exit_layers are the blocks each step ran (all at full steps, 2k between),
    # alone, learned (l2c) or in DuoDiff's full phase (a composed set named ..._cache_N<n>_k<k>).
    families = [(title, sets) for title, sets in swept_families(table, methods=("early_exit", "cache", "l2c", "composed"))
                if sets["threshold"].notna().all() or sets["method"].isin(["cache", "l2c"]).all()
                or sets["set"].str.contains("_cache_N").all()]
    n_cols = min(HEATMAP_COLUMNS, max([len(sets) for _, sets in families] + [1]))
    rows = [math.ceil(len(sets) / n_cols) for _, sets in families]
    heights = [r * (HEATMAP_HEIGHT + 0.55) + 0.25 for r in rows] + [0.55]  # heat maps, titles; colour bar
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
    # Beside the panel, not in it: inside, "best" still covered lines (DuoDiff's jump at t_s).
    ax.legend(handles=settings, loc="center left", bbox_to_anchor=(1.0, 0.5), handlelength=1.0, handletextpad=0.4,
              borderaxespad=0.2, frameon=False)
