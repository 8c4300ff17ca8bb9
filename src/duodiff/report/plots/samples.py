"""The sample_grids figure: each set's grid of samples (its grid.png, or one rebuilt from its
images as `duodiff sample` makes it) beside real images, one row per method family."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from duodiff.core.study import setting_label
from duodiff.report.plots.style import FIGURE_WIDTH, SMALL_FONT, new_figure, sampling_caption, swept_families
from duodiff.report.tables.collect import blocks


def image_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png"))


def grid_from_images(paths: list[Path], n_images: int) -> np.ndarray:
    """The grid `duodiff sample` writes as grid.png (duodiff.core.images.image_grid), from the first
    images, as (H, W, 3) uint8; so real images and rebuilt grids look like the sample sets' grid.png."""
    import torch  # here, not at the top: `duodiff plots` needs torch only without grid.png files
    from PIL import Image

    from duodiff.core.images import image_grid

    images = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)
                          for p in paths[:n_images]])
    return image_grid(images).permute(1, 2, 0).numpy()


# The figure shows each set's first FIGURE_DIGITS images, FIGURE_DIGITS_PER_ROW a row: few enough
# that a digit is >= 20 px wide when the figure prints at a 3.3-inch column (the whole 64-image
# grid.png gave ~5 px); the same grid positions, so the same noise, in every panel.
FIGURE_DIGITS, FIGURE_DIGITS_PER_ROW = 16, 4
FIGURE_PADDING = 1  # white pixels between the images, at the images' own size


def small_grid(paths: list[Path], n_images: int, per_row: int) -> np.ndarray:
    """The first n_images as a (H, W, 3) uint8 grid, per_row a row, FIGURE_PADDING white pixels
    around each, at the images' own resolution (imshow enlarges them, nearest neighbour)."""
    from PIL import Image

    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths[:n_images]]
    height, width = images[0].shape[:2]
    rows = math.ceil(len(images) / per_row)
    step_y, step_x = height + FIGURE_PADDING, width + FIGURE_PADDING
    grid = np.full((FIGURE_PADDING + rows * step_y, FIGURE_PADDING + min(per_row, len(images)) * step_x, 3), 255, np.uint8)
    for i, image in enumerate(images):
        y, x = FIGURE_PADDING + (i // per_row) * step_y, FIGURE_PADDING + (i % per_row) * step_x
        grid[y:y + height, x:x + width] = image
    return grid


def sample_grid(samples_root, name: str, n_images: int) -> tuple[np.ndarray, str, int]:
    """A set's grid image (H, W, 3) uint8, where it came from, and its images per row: its first
    images when it has images/, else its grid.png whole."""
    from PIL import Image

    from duodiff.core.images import GRID_NROW

    folder = Path(samples_root) / name
    paths = image_files(folder / "images")
    if paths:
        n = min(n_images, FIGURE_DIGITS, len(paths))
        return small_grid(paths, n, FIGURE_DIGITS_PER_ROW), f"{folder / 'images'} (first {n})", FIGURE_DIGITS_PER_ROW
    assert (folder / "grid.png").is_file(), f"{folder}: run_plots checks that every set has grid.png or images"
    return np.asarray(Image.open(folder / "grid.png").convert("RGB")), str(folder / "grid.png"), GRID_NROW


GRID_COLUMNS = 3  # sample grids per row: a family with more settings wraps onto further rows


def grid_title(row) -> str:
    """A sample grid's title: the set within its row of the figure, and its score."""
    if row["method"] in ("early_exit", "duodiff", "cache", "l2c", "composed"):
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
    n_real = min(n_images, FIGURE_DIGITS, int(table.loc[table["method"] != "real", "n_samples"].min()))
    reference_images = image_files(Path(reference) / "images")
    real = ("real images", small_grid(reference_images, n_real, FIGURE_DIGITS_PER_ROW),
            f"{Path(reference) / 'images'} (first {min(n_real, len(reference_images))})", FIGURE_DIGITS_PER_ROW, None)

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
    aspect = max(grid.shape[0] / grid.shape[1] for _, panels in groups for _, grid, _, _, _ in panels)
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
        for ax, (title, grid, source, per_row, name) in zip(axes, panels):
            ax.imshow(grid, interpolation="nearest")
            ax.set_anchor("N")  # panels of different heights line up at their titles
            ax.set_title(title, fontsize=SMALL_FONT)
            ax.set_axis_off()
            data["panels"].append({"set": name, "row": row_title, "title": title, "source": source,
                                   "shape": list(grid.shape), "per_row": per_row})
        for ax in axes[len(panels):]:
            ax.set_visible(False)
    fig.canvas.draw()
    for panel, ax in zip(data["panels"], [ax for ax in fig.get_axes() if ax.get_visible() and ax.images]):
        # The drawn width of one image, in inches of the figure as saved (checked against a column).
        panel["image_width_in"] = ax.get_window_extent().width / fig.dpi / panel["per_row"]
    return fig, data
