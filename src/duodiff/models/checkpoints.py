"""The files that carry models between stages.

`model.pt` (format "duodiff-model") is what `duodiff train` leaves for sampling, scoring and FLOP
counting: the architecture config, the weights, the EMA weights and the diffusion settings.
`checkpoint.pt` (format "duodiff-train-state") is the resumable training state beside it.

Both are written atomically. Loading checks the format marker and the required keys, so a
truncated file or a checkpoint from another project is refused with a message naming the file
instead of being loaded half, and every weight: a NaN or inf (a diverged run, a broken conversion)
is refused naming the file and the first tensor that holds one, where it would otherwise sample
black images without a word. `load` is the one place model files are read (sampling, FLOP
counting, --load-backbone, a resumed checkpoint.pt); `duodiff convert` checks its source weights
with `check_finite` too.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from duodiff.core.errors import DuodiffError
from duodiff.core.io import torch_save

MODEL_FORMAT = "duodiff-model"
TRAIN_STATE_FORMAT = "duodiff-train-state"
VERSION = 1
MODEL_KEYS = ("kind", "model_config", "diffusion", "state_dict", "ema_state_dict", "step")
# The entries of each format that hold weights (or the optimizer's moments), checked to be finite.
WEIGHT_ENTRIES = {MODEL_FORMAT: ("state_dict", "ema_state_dict"), TRAIN_STATE_FORMAT: ("model", "ema", "optimizer")}
# What to do about a file with NaN or inf weights, by format.
NON_FINITE_HINT = {
    MODEL_FORMAT: "a model's weights must be finite numbers: retrain it (or convert it again from finite weights)",
    TRAIN_STATE_FORMAT: "training cannot resume from it: remove it to start afresh, or choose another --log-path",
}


def save(obj: dict, path, fmt: str) -> None:
    torch_save({"format": fmt, "version": VERSION, **obj}, path)


def load(path, fmt: str) -> dict:
    """Load a duodiff file of format `fmt`, refusing anything else with a clear message."""
    path = Path(path)
    if not path.is_file():
        raise DuodiffError(f"{path}: no such file")
    try:
        # weights_only=False: the files hold plain dicts, RNG states and optimizer states that
        # this project wrote itself; the format check below rejects foreign files.
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as error:
        raise DuodiffError(f"{path}: not a readable checkpoint (truncated or corrupt?): {error}") from None
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise DuodiffError(f"{path}: expected a {fmt!r} file, found {found!r}")
    if obj.get("version") != VERSION:
        raise DuodiffError(f"{path}: {fmt} version {obj.get('version')!r}, this duodiff reads version {VERSION}")
    for entry in WEIGHT_ENTRIES.get(fmt, ()):
        check_finite(obj.get(entry), path, entry, NON_FINITE_HINT[fmt])
    return obj


def first_non_finite(tree, name: str = "") -> tuple[str, torch.Tensor] | None:
    """(name, tensor) of the first floating-point tensor in a state dict (or any nest of dicts and
    lists, such as an optimizer's state) holding a NaN or inf; None when all are finite."""
    if isinstance(tree, torch.Tensor):
        numeric = tree.is_floating_point() or tree.is_complex()  # integers (steps, RNG states) are always finite
        return (name, tree) if numeric and not bool(torch.isfinite(tree).all()) else None
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    for key, value in items:
        found = first_non_finite(value, f"{name}.{key}" if name else str(key))
        if found is not None:
            return found
    return None


def check_finite(weights, path, entry: str, hint: str) -> None:
    """DuodiffError naming `path`, `entry` and the first tensor of `weights` that holds a NaN or inf."""
    found = first_non_finite(weights) if weights is not None else None
    if found is not None:
        name, tensor = found
        bad = int((~torch.isfinite(tensor)).sum())
        raise DuodiffError(
            f"{path}: {entry} tensor {name!r} holds NaN or inf ({bad} of {tensor.numel()} values; the first tensor "
            f"that does); {hint}"
        )


def save_model(path, **fields) -> None:
    missing = [k for k in MODEL_KEYS if k not in fields]
    if missing:
        raise ValueError(f"model file needs {missing}")
    save(fields, path, MODEL_FORMAT)


def load_model_file(path) -> dict:
    obj = load(path, MODEL_FORMAT)
    missing = [k for k in MODEL_KEYS if k not in obj]
    if missing:
        raise DuodiffError(f"{path}: model file lacks {', '.join(missing)}")
    return obj


def load_model(path, use_ema: bool = True, device="cpu"):
    """Build the model stored in `path` -> (model in eval mode, GaussianDiffusion, metadata dict)."""
    from duodiff.core.diffusion import GaussianDiffusion
    from duodiff.models import build_model

    obj = load_model_file(path)
    diffusion = GaussianDiffusion(**obj["diffusion"])
    model = build_model(
        obj["kind"],
        obj["model_config"],
        num_timesteps=diffusion.num_timesteps,
        classifier_type=obj.get("classifier_type"),
    )
    weights = obj["ema_state_dict"] if use_ema and obj["ema_state_dict"] is not None else obj["state_dict"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        raise DuodiffError(f"{path}: weights do not fit the stored model config: {error}") from None
    model.to(device).eval()
    meta = {k: v for k, v in obj.items() if k not in ("state_dict", "ema_state_dict")}
    meta["path"] = str(path)
    return model, diffusion, meta
