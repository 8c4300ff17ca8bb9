"""Learning-to-Cache's router (Ma, Fang, Mi, Wang, NeurIPS 2024, arXiv 2406.01733): its file and
what it decides.

The router is input-invariant: one learned gate per (sampling step, layer), a layer being one
block's attention or its MLP (L2C's U-ViT: 2 gates per block). Which steps may cache follows L2C's
samplers (its DDIM DiT and its U-ViT, whose cache is emptied every other network evaluation):
steps 0, 2, 4, ... run the whole network and leave every layer's residual; the odd steps 1, 3, 5,
... are cache steps, where a layer whose gate is at most the threshold re-adds the residual of the
step before instead of computing it (L2C: `router() > thres` runs the layer). So at most every
other step is cheaper, and what is reused is always one step old.

router.pt (`duodiff train-router`, train/router.py):
    format "duodiff-router", version 1
    logits        float32 (cache steps, depth, 2): gate = sigmoid(logit); [:, :, 0] attention, 1 MLP
    cache_steps   the step indices the rows belong to (1, 3, 5, ... below steps)
    steps, sampler, eta, guidance_scale   the sampling grid it was trained for
    depth         the model's depth
    model_sha256  the frozen model it was trained on
    settings      the training settings (router_lr, l1_weight, n_steps, ...)
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from duodiff.core.errors import DuodiffError, require

ROUTER_FORMAT = "duodiff-router"
ROUTER_VERSION = 1
LAYERS_PER_BLOCK = 2  # attention, MLP


def cache_steps(steps: int) -> list[int]:
    """The steps that may reuse the step before's residuals: 1, 3, 5, ... below `steps`."""
    return list(range(1, steps, 2))


def gates(logits: torch.Tensor) -> torch.Tensor:
    """L2C's Router: sigmoid of the learned logits."""
    return torch.sigmoid(logits)


def load_router(path) -> dict:
    """A router.pt, checked; DuodiffError naming the file and the key otherwise."""
    path = Path(path)
    require(path.is_file(), f"router file {path} does not exist")
    stat = path.stat()
    return _load(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _load(path: str, mtime_ns: int, size: int) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is the same one-line error
        raise DuodiffError(f"router file {path}: unreadable ({type(error).__name__}: {error})") from None
    require(isinstance(obj, dict) and obj.get("format") == ROUTER_FORMAT,
            f"router file {path}: not a duodiff router (format {ROUTER_FORMAT!r}); make one with duodiff train-router")
    require(obj.get("version") == ROUTER_VERSION, f"router file {path}: version {obj.get('version')!r}, expected {ROUTER_VERSION}")
    logits, steps, depth = obj.get("logits"), obj.get("steps"), obj.get("depth")
    require(isinstance(steps, int) and steps > 0 and isinstance(depth, int) and depth > 0,
            f"router file {path}: steps and depth must be positive integers")
    rows = cache_steps(steps)
    require(obj.get("cache_steps") == rows, f"router file {path}: cache_steps must be {rows} for {steps} steps")
    require(isinstance(logits, torch.Tensor) and tuple(logits.shape) == (len(rows), depth, LAYERS_PER_BLOCK),
            f"router file {path}: logits must have shape ({len(rows)}, {depth}, {LAYERS_PER_BLOCK}); "
            f"got {tuple(getattr(logits, 'shape', ()))}")
    require(bool(torch.isfinite(logits).all()), f"router file {path}: logits hold a NaN or inf")
    return obj


def routing_plan(router: dict, threshold: float) -> list:
    """Per sampling step: None (the whole network runs) or, on a cache step, one (attention runs,
    MLP runs) pair per block: a layer runs when its gate is above `threshold` (L2C)."""
    plan: list = [None] * router["steps"]
    run = gates(router["logits"].double()) > threshold
    for row, step in enumerate(router["cache_steps"]):
        plan[step] = tuple((bool(a), bool(m)) for a, m in run[row].tolist())
    return plan


def check_router_fits(router: dict, path, *, steps: int, sampler: str, depth: int, model_sha256: str | None = None) -> None:
    """The router was trained for this sampling grid and model depth (and, given, this model)."""
    for key, want in (("steps", steps), ("sampler", sampler), ("depth", depth)):
        require(router.get(key) == want,
                f"router file {path}: trained for {key} {router.get(key)!r}, but this set has {key} {want!r}; "
                "train a router for it (duodiff train-router)")
    if model_sha256 is not None:
        require(router.get("model_sha256") == model_sha256,
                f"router file {path}: trained on another model (sha256 {str(router.get('model_sha256'))[:12]}..., "
                f"this one {model_sha256[:12]}...)")


def file_identity(path) -> tuple:
    """(path, mtime_ns, size) of a file, for caches keyed by it."""
    stat = os.stat(path)
    return str(path), stat.st_mtime_ns, stat.st_size
