"""Images on disk: the one quantisation, PNG writer and reader, and grid every stage uses.

A leaf module: the stages (sampling, metrics, plots) import it, and it imports none of them, only
duodiff.core.io's atomic writes. Generated samples (`duodiff sample`) and real images (`duodiff
reference`, `duodiff real-set`) take this one path to PNG, so both reach the scores alike; the
sample sets' grid.png and the grids `duodiff plots` rebuilds from images come from `image_grid`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from duodiff.core.io import atomic_path

GRID_NROW = 8  # images per grid row
GRID_MIN_SIZE = 32  # grids enlarge smaller images (8x8 digits) by nearest neighbour to at least this size
GRID_PADDING = 2  # white pixels between grid images


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 in [0, 255], rounding as torchvision.utils.save_image does."""
    return ((images.float() + 1.0) / 2.0).mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)


def save_png(image_uint8: torch.Tensor, path: Path) -> None:
    """One (C, H, W) uint8 image -> PNG (grayscale for 1 channel), written atomically."""
    from PIL import Image

    array = image_uint8.permute(1, 2, 0).cpu().numpy()
    image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)  # uint8: mode L or RGB
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def load_png(path: Path) -> torch.Tensor:
    """PNG -> (C, H, W) uint8 tensor."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        array = np.array(image)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def png_problem(path: Path) -> str | None:
    """Why `path` is not a complete PNG (PIL's verify: every chunk there, its checksum right), e.g.
    one cut off by a full disk or a killed copy; None when it is one."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
        return f"{type(error).__name__}: {error}"
    return None


def image_grid(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) uint8 images (C 1 or 3) -> one (3, H', W') uint8 grid: GRID_NROW per row,
    GRID_PADDING white pixels around each, images smaller than GRID_MIN_SIZE enlarged by nearest
    neighbour (an integer factor, every pixel repeated), so 8x8 digits stay visible.

    The layout is torchvision's make_grid(nrow=GRID_NROW, padding=GRID_PADDING, pad_value=255)
    (tests compare the two), written with einops: importing torchvision costs every sampling job
    ~3 s (its ops import torch._dynamo), more than the sampling of a small set."""
    from einops import rearrange

    size = images.shape[-1]
    if size < GRID_MIN_SIZE:
        factor = math.ceil(GRID_MIN_SIZE / size)
        images = images.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)
    if images.shape[1] == 1:  # make_grid repeats a single channel: the grid is RGB either way
        images = images.expand(-1, 3, -1, -1)
    n = images.shape[0]
    columns = min(GRID_NROW, n)
    rows = math.ceil(n / columns)
    # Each image with its padding below and to the right; empty cells of the last row stay white.
    pad = GRID_PADDING
    cells = images.new_full((rows * columns, 3, images.shape[2] + pad, images.shape[3] + pad), 255)
    cells[:n, :, :-pad, :-pad] = images
    grid = rearrange(cells, "(r c) ch h w -> ch (r h) (c w)", r=rows, c=columns)
    # The padding above the first row and left of the first column.
    return torch.nn.functional.pad(grid, (pad, 0, pad, 0), value=255)
