"""What a `duodiff sample` set runs on: the device and its arithmetic, the model(s) of a method and
the denoiser built from them, and the clock its batches are timed with (duodiff.sample.sample_set runs
the set)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from duodiff.core.errors import DuodiffError, check_choice, require

# Architecture keys two DuoDiff models must share: they denoise the same images.
SHARED_MODEL_KEYS = ("img_size", "patch_size", "in_chans", "num_classes")


def check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DuodiffError(f"--device must be cpu or cuda (or cuda:N); got {device!r}") from None
    check_choice("--device", dev.type, ("cpu", "cuda"))
    require(dev.type != "cuda" or torch.cuda.is_available(), f"--device {device}: CUDA is not available on this machine")
    return dev


@contextlib.contextmanager
def precision_context(precision: str, device: torch.device):
    """Run the network evaluations inside at `precision` (see duodiff.core.study.PRECISIONS)."""
    if precision == "tf32":
        matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
    elif precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        with torch.autocast(device.type, dtype=dtype):
            yield
    else:
        yield


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timing_clock(device: torch.device) -> str:
    """Which clock a batch's throughput is measured with.

    "cpu" (the process's CPU time) on a CPU with one torch thread, as the pipeline's sampling
    jobs run (threads: 1): two jobs side by side on a 2-core machine then do not slow each
    other's numbers down, and the measured speed-ups compare like with like. The wall clock
    everywhere else: on a GPU (synchronised), and with several CPU threads, whose CPU time would
    also count threads spinning at barriers.
    """
    return "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"


def load_models(method, checkpoint_path, checkpoint_path_late, use_ema, device, allow_deeper_shallow, load=None):
    """Load and cross-check the model(s) a method needs; returns (models, diffusion, metas).

    `load` reads one model file, as duodiff.models.checkpoints.load_model (the default) does:
    `duodiff time` passes a caching one, so a checkpoint shared by several sets is loaded once."""
    if load is None:
        from duodiff.models.checkpoints import load_model as load

    model, diffusion, meta = load(checkpoint_path, use_ema=use_ema, device=device)
    if method == "early_exit":
        require(
            meta["kind"] == "early_exit",
            f"--method early_exit needs an early_exit model; {checkpoint_path} holds a {meta['kind']!r} model",
        )
        return {"model": model}, diffusion, {"model": meta}
    require(
        meta["kind"] == "uvit",
        f"--method {method} needs a uvit model; {checkpoint_path} holds a {meta['kind']!r} model "
        "(use --method early_exit for early-exit models)",
    )
    if method in ("full", "shallow", "cache", "l2c"):  # cache, l2c: the full U-ViT, parts of it cached
        return {"model": model}, diffusion, {"model": meta}

    late, late_diffusion, late_meta = load(checkpoint_path_late, use_ema=use_ema, device=device)
    # The late phase runs the full U-ViT, or an early-exit model built on it (DuoDiff with early
    # exit: the late model's exit rule runs in the full model's phase; --threshold picks it).
    require(
        late_meta["kind"] in ("uvit", "early_exit"),
        f"--method duodiff needs a uvit or early_exit model as --checkpoint-path-late; {checkpoint_path_late} holds a "
        f"{late_meta['kind']!r} model",
    )
    paths = (checkpoint_path, checkpoint_path_late)
    check_duodiff_pair((model, late), (diffusion, late_diffusion), paths, allow_deeper_shallow)
    return {"shallow": model, "full": late}, diffusion, {"shallow": meta, "full": late_meta}


def check_duodiff_pair(models, diffusions, paths, allow_deeper_shallow: bool) -> None:
    """The shallow and the full model of a DuoDiff set denoise the same images the same way."""
    (shallow, full), (shallow_path, full_path) = models, paths
    for key in SHARED_MODEL_KEYS:
        shallow_value, full_value = getattr(shallow.config, key), getattr(full.config, key)
        require(
            shallow_value == full_value,
            f"--method duodiff needs two models of the same image shape and classes; {key} is "
            f"{shallow_value!r} in {shallow_path} but {full_value!r} in {full_path}",
        )
    configs = [diffusion.config() for diffusion in diffusions]
    require(
        configs[0] == configs[1],
        f"--method duodiff needs both models trained with the same diffusion settings; {shallow_path} has "
        f"{configs[0]} but {full_path} has {configs[1]}",
    )
    # DuoDiff itself only needs two models, but a shallow model that is not shallower almost
    # surely means the two paths were swapped: refused unless the user says it is meant.
    blocks = {depth: f"{depth} block{'s' if depth != 1 else ''}" for depth in (shallow.depth, full.depth)}
    require(
        shallow.depth < full.depth or allow_deeper_shallow or not _same_file(shallow_path, full_path),
        f"--checkpoint-path and --checkpoint-path-late are the same file ({shallow_path}, {blocks[full.depth]}): "
        "DuoDiff runs a shallow model for the first --t-switch steps and the full model after; pass the shallow "
        "model as --checkpoint-path (or --allow-deeper-shallow to run one model for both on purpose)",
    )
    require(
        shallow.depth < full.depth or allow_deeper_shallow,
        f"--checkpoint-path {shallow_path} ({blocks[shallow.depth]}) must be shallower than --checkpoint-path-late "
        f"{full_path} ({blocks[full.depth]}): DuoDiff runs the shallow model first; swap the two paths, "
        "or pass --allow-deeper-shallow if this order is meant",
    )


def _same_file(a, b) -> bool:
    try:
        return Path(a).samefile(b)
    except OSError:
        return False


def warm_up(method, models, threshold, shape, num_classes, device, precision):
    """One untimed forward pass per network, so lazy CUDA/cuDNN set-up is not billed to batch 0."""
    x = torch.zeros(shape, device=device)
    t = torch.zeros(shape[0], dtype=torch.long, device=device)
    y = torch.zeros(shape[0], dtype=torch.long, device=device) if num_classes > 0 else None
    with torch.inference_mode(), precision_context(precision, device):
        for model in models.values():
            if hasattr(model, "forward_early_exit"):  # early exit, alone or as DuoDiff's late model
                model.forward_early_exit(x, t, threshold, y)
            else:
                model(x, t, y)
    synchronize(device)
