"""Resumable feature extraction: a scoring job killed half-way keeps what it has computed.

Inception features of 50k images take a GPU several minutes and these CPUs hours, so `duodiff
reference` and `duodiff fid` compute them `chunk_size` images at a time and keep each chunk as
`<key>.npy` in a cache folder beside their output. The key is a hash of the feature network and
of the chunk's file names and bytes (Inception, the classifier and CLIP alike are keyed by their
weights' sha256, never by a name alone): a rerun after a kill (Slurm time limit, preemption) loads the
chunks it finds and computes only the others, and a regenerated image or another network can
never pick up old features. The caller removes the folder once its output is written.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from duodiff.core.io import atomic_path


def chunk_key(files: Sequence[Path], network_sha256: str) -> str:
    """The chunk's file name: a hash of what identifies the network's weights (`network_sha256`:
    their sha256, for CLIP with the model's name) and of the chunk's image names and bytes."""
    digest = hashlib.sha256(network_sha256.encode())
    for path in files:
        digest.update(Path(path).name.encode() + b"\0")
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:32]


def cached_features(
    files: Sequence[Path],
    compute: Callable[[Sequence[Path], str], np.ndarray],
    cache_folder,
    network_sha256: str,
    chunk_size: int,
    description: str = "",
) -> np.ndarray:
    """compute(files, description) -> (len(files), d) features, one chunk at a time, through the cache."""
    cache_folder = Path(cache_folder)
    cache_folder.mkdir(parents=True, exist_ok=True)
    chunks = [files[start : start + chunk_size] for start in range(0, len(files), chunk_size)]
    parts = []
    for index, chunk in enumerate(chunks):
        path = cache_folder / f"{chunk_key(chunk, network_sha256)}.npy"
        part = _load(path, len(chunk))
        if part is None:
            label = f"{description} [{index + 1}/{len(chunks)}]" if len(chunks) > 1 else description
            part = np.asarray(compute(chunk, label))
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.save(f, part)
        parts.append(part)
    return np.concatenate(parts)


def _load(path: Path, n_files: int) -> np.ndarray | None:
    """A chunk written by an earlier run, or None. Files are written whole (atomic rename), so a
    bad one means a foreign file: it is recomputed rather than trusted."""
    if not path.exists():
        return None
    try:
        part = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    return part if part.ndim == 2 and len(part) == n_files else None


def remove_cache(cache_folder) -> None:
    shutil.rmtree(cache_folder, ignore_errors=True)
