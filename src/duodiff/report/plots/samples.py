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


def sample_grid(samples_root, name: str, n_images: int) -> tuple[np.ndarray, str]:
    """A set's grid image (H, W, 3) uint8 and where it came from."""
    from PIL import Image

    folder = Path(samples_root) / name
    if (folder / "grid.png").is_file():
        return np.asarray(Image.open(folder / "grid.png").convert("RGB")), str(folder / "grid.png")
    paths = image_files(folder / "images")
    assert paths, f"{folder}: run_plots checks that every set has grid.png or images"
    return grid_from_images(paths, n_images), f"{folder / 'images'} (first {min(n_images, len(paths))})"


GRID_COLUMNS = 4  # sample grids per row: a family with more settings wraps onto further rows


def grid_title(row) -> str:
    """A sample grid's title: the set within its row of the figure, and its score."""
    if row["method"] in ("early_exit", "duodiff", "composed"):
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
