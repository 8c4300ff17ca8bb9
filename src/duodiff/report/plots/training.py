"""The training_curves figure: every model's loss.csv, one panel per kind of loss, smoothed by an
EMA where a run logged enough rows."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps

from duodiff.core.errors import require
from duodiff.report.plots.style import bottom_legend, lines_drawn, new_figure, wrap_label

LOSS_BOOKKEEPING = ["step", "loss", "lr", "steps_per_s"]  # loss.csv columns that are not loss parts
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
LINE_STYLES = ["-", "--", "-.", ":"]
MARKERS = ["o", "s", "^", "D", "v", "P"]
MARKS_PER_CURVE = 6  # markers along each curve
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
    # A model's line style and markers too: curves that coincide (the probes' loss_simple with a
    # frozen backbone) stay distinguishable, each model's markers at other steps than the others'.
    styles = {name: (LINE_STYLES[i % len(LINE_STYLES)], MARKERS[i % len(MARKERS)], i) for i, name in enumerate(logs)}
    data = {"smoothing": smoothing, "panels": []}
    for ax, (title, curves) in zip(axes, panels):
        for name, column in curves:
            log = logs[name]
            raw = log[column].to_numpy(float)
            linestyle, marker, index = styles[name]
            every = max(1, len(log) // MARKS_PER_CURVE)
            style = {"color": colors[name], "linewidth": 1.4, "linestyle": linestyle, "marker": marker,
                     "markersize": 3.5, "markevery": (index * every // max(1, len(logs)) % every, every), "label": name}
            if len(log) < MIN_ROWS_TO_SMOOTH:  # each row already averages its logging interval
                ax.plot(log["step"], raw, **style)
                continue
            ax.plot(log["step"], raw, color=colors[name], alpha=0.25, linewidth=0.8, label="_raw")
            ax.plot(log["step"], ema_smooth(log[column], smoothing), **style)
        loss_axis(ax, [logs[name][column] for name, column in curves])
        ax.set_title(wrap_label(title), fontsize=8)
        ax.set_xlabel("training step")
        data["panels"].append({"title": title, "series": lines_drawn(ax)})
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if panels:  # every model once, below the panels: a legend inside a panel covered its curves
        bottom_legend(fig, axes[: len(panels)])
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
