"""`duodiff sample`: generate a sample set with one of the four methods and time it.

Methods (docs/architecture.md):
- full      one U-ViT at every step (the baseline);
- shallow   one (shallow) U-ViT at every step;
- early_exit  DeeDiff/AdaDiff: per sample and step, the first exit whose predicted uncertainty
            is <= --threshold;
- duodiff   the shallow U-ViT (--checkpoint-path) for the first --t-switch (noisiest) steps,
            the full U-ViT (--checkpoint-path-late) for the rest. The first must be the shallower
            one (two paths swapped are refused) unless --allow-deeper-shallow says it is meant.

The set is written batch by batch: the PNGs of a batch, then its part file (exit layers, wall
time and the settings). A rerun with the same arguments skips finished batches, so a killed job
resumes where it stopped and produces exactly the images an uninterrupted run would: batch b
draws everything from its own generator seeded with seed * 1000003 + b.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch

from duodiff.distributed import default_device
from duodiff.errors import DuodiffError, check_choice, require
from duodiff.flags import add_flag
from duodiff.images import image_grid, load_png, save_png, to_uint8
from duodiff.io import torch_save, write_json
from duodiff.study import CUDA_ONLY_PRECISIONS, METHODS, PRECISIONS, SAMPLERS, setting_label

SEED_STRIDE = 1000003  # batch b of a set with seed s uses seed s * SEED_STRIDE + b
GRID_SAMPLES = 64  # grid.png shows the set's first images (duodiff.images.image_grid)
# Architecture keys two DuoDiff models must share: they denoise the same images.
SHARED_MODEL_KEYS = ("img_size", "patch_size", "in_chans", "num_classes")


def batch_seed(seed: int, batch_index: int) -> int:
    return seed * SEED_STRIDE + batch_index


def image_path(folder: Path, index: int) -> Path:
    return folder / "images" / f"{index:06d}.png"


def part_path(folder: Path, batch_index: int) -> Path:
    return folder / "parts" / f"batch_{batch_index:05d}.pt"


def _check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DuodiffError(f"--device must be cpu or cuda (or cuda:N); got {device!r}") from None
    check_choice("--device", dev.type, ("cpu", "cuda"))
    require(dev.type != "cuda" or torch.cuda.is_available(), f"--device {device}: CUDA is not available on this machine")
    return dev


@contextlib.contextmanager
def precision_context(precision: str, device: torch.device):
    """Run the network evaluations inside at `precision` (see PRECISIONS)."""
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


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _load_models(method, checkpoint_path, checkpoint_path_late, use_ema, device, allow_deeper_shallow=False):
    """Load and cross-check the model(s) a method needs; returns (models, diffusion, metas)."""
    from duodiff.checkpoints import load_model

    model, diffusion, meta = load_model(checkpoint_path, use_ema=use_ema, device=device)
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
    if method in ("full", "shallow"):
        return {"model": model}, diffusion, {"model": meta}

    late, late_diffusion, late_meta = load_model(checkpoint_path_late, use_ema=use_ema, device=device)
    require(
        late_meta["kind"] == "uvit",
        f"--method duodiff needs a uvit model as --checkpoint-path-late; {checkpoint_path_late} holds a "
        f"{late_meta['kind']!r} model",
    )
    for key in SHARED_MODEL_KEYS:
        shallow_value, late_value = getattr(model.config, key), getattr(late.config, key)
        require(
            shallow_value == late_value,
            f"--method duodiff needs two models of the same image shape and classes; {key} is "
            f"{shallow_value!r} in {checkpoint_path} but {late_value!r} in {checkpoint_path_late}",
        )
    require(
        diffusion.config() == late_diffusion.config(),
        f"--method duodiff needs both models trained with the same diffusion settings; {checkpoint_path} has "
        f"{diffusion.config()} but {checkpoint_path_late} has {late_diffusion.config()}",
    )
    # DuoDiff itself only needs two models, but a shallow model that is not shallower almost
    # surely means the two paths were swapped: refused unless the user says it is meant.
    blocks = {depth: f"{depth} block{'s' if depth != 1 else ''}" for depth in (model.depth, late.depth)}
    require(
        model.depth < late.depth or allow_deeper_shallow,
        f"--checkpoint-path {checkpoint_path} ({blocks[model.depth]}) must be shallower than --checkpoint-path-late "
        f"{checkpoint_path_late} ({blocks[late.depth]}): DuoDiff runs the shallow model first; swap the two paths, "
        "or pass --allow-deeper-shallow if this order is meant",
    )
    return {"shallow": model, "full": late}, diffusion, {"shallow": meta, "full": late_meta}


def _make_denoiser(method, models, threshold, t_switch, steps, y):
    from duodiff.diffusion import EarlyExitDenoiser, duodiff_denoiser, model_denoiser

    if method == "early_exit":
        return EarlyExitDenoiser(models["model"], threshold, y=y)
    if method == "duodiff":
        return duodiff_denoiser(models["shallow"], models["full"], t_switch, y=y, steps=steps)
    return model_denoiser(models["model"], y=y)


def timing_clock(device: torch.device) -> str:
    """Which clock a batch's throughput is measured with.

    "cpu" (the process's CPU time) on a CPU with one torch thread, as the pipeline's sampling
    jobs run (threads: 1): two jobs side by side on a 2-core machine then do not slow each
    other's numbers down, and the measured speed-ups compare like with like. The wall clock
    everywhere else: on a GPU (synchronised), and with several CPU threads, whose CPU time would
    also count threads spinning at barriers.
    """
    return "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"


def _warm_up(method, models, threshold, shape, num_classes, device, precision):
    """One untimed forward pass per network, so lazy CUDA/cuDNN set-up is not billed to batch 0."""
    x = torch.zeros(shape, device=device)
    t = torch.zeros(shape[0], dtype=torch.long, device=device)
    y = torch.zeros(shape[0], dtype=torch.long, device=device) if num_classes > 0 else None
    with torch.inference_mode(), precision_context(precision, device):
        for model in models.values():
            if method == "early_exit":
                model.forward_early_exit(x, t, threshold, y)
            else:
                model(x, t, y)
    _synchronize(device)


def _read_part(path: Path, settings: dict) -> dict:
    try:
        part = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # a part is written atomically; anything unreadable is foreign
        raise DuodiffError(f"{path}: unreadable part file ({error}); delete the output folder and rerun") from None
    found = part.get("settings") if isinstance(part, dict) else None
    if isinstance(found, dict) and "precision" not in found:
        found = {**found, "precision": "fp32"}  # parts written before --precision existed: fp32
    if found != settings:
        changed = (
            sorted(k for k in set(settings) | set(found) if settings.get(k) != found.get(k))
            if isinstance(found, dict)
            else ["(not a duodiff sample part)"]
        )
        raise DuodiffError(
            f"{path.parent.parent} holds samples made with different settings ({', '.join(changed)}); "
            "delete the folder or choose another --output-folder"
        )
    return part


def run_sample(
    checkpoint_path,
    method,
    output_folder,
    sampler,
    steps,
    n_samples,
    batch_size,
    seed,
    threshold=None,
    t_switch=None,
    checkpoint_path_late=None,
    eta=0.0,
    use_ema=True,
    device=None,
    precision="fp32",
    progress=True,
    allow_deeper_shallow=False,
):
    """Generate `n_samples` images into `output_folder` (see docs/architecture.md, "Sample set folder")."""
    # ---- arguments that need no file --------------------------------------------------------
    check_choice("--method", method, METHODS)
    check_choice("--sampler", sampler, SAMPLERS)
    for name, value in (("--n-samples", n_samples), ("--batch-size", batch_size)):
        require(
            isinstance(value, int) and not isinstance(value, bool) and value > 0,
            f"{name} must be a positive integer; got {value!r}",
        )
    require(
        steps is None or (isinstance(steps, int) and not isinstance(steps, bool) and steps > 0),
        f"--steps must be a positive integer; got {steps!r}",
    )
    require(sampler == "ddpm" or steps is not None, "--steps is required for --sampler ddim")
    require(
        isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**63 // SEED_STRIDE - 1,
        f"--seed must be a non-negative integer below {2**63 // SEED_STRIDE - 1}; got {seed!r}",
    )
    require(isinstance(eta, (int, float)) and eta >= 0, f"--eta must be a number >= 0; got {eta!r}")
    require(sampler == "ddim" or eta == 0, f"--eta applies to the ddim sampler only; got --eta {eta} with --sampler ddpm")
    if method == "early_exit":
        require(threshold is not None, "--method early_exit needs --threshold (a number in [0, 1])")
        require(
            isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and 0 <= threshold <= 1,
            f"--threshold must be in [0, 1]; got {threshold!r}",
        )
    else:
        require(threshold is None, f"--threshold applies to --method early_exit only; got --threshold {threshold} with --method {method}")
    if method == "duodiff":
        require(checkpoint_path_late is not None, "--method duodiff needs --checkpoint-path-late (the full model)")
        require(t_switch is not None, "--method duodiff needs --t-switch (how many of the noisiest steps the shallow model does)")
        require(
            isinstance(t_switch, int) and not isinstance(t_switch, bool) and t_switch >= 0,
            f"--t-switch must be a non-negative integer; got {t_switch!r}",
        )
    else:
        require(t_switch is None, f"--t-switch applies to --method duodiff only; got --t-switch {t_switch} with --method {method}")
        require(
            checkpoint_path_late is None,
            f"--checkpoint-path-late applies to --method duodiff only; got it with --method {method}",
        )
        require(not allow_deeper_shallow, f"--allow-deeper-shallow applies to --method duodiff only; got it with --method {method}")
    check_choice("--precision", precision, PRECISIONS)
    dev = _check_device(device or default_device())
    require(
        dev.type == "cuda" or precision not in CUDA_ONLY_PRECISIONS,
        f"--precision {precision} needs --device cuda; on {dev.type} choose fp32 or bf16",
    )
    folder = Path(output_folder)

    # ---- models, and the checks that need them ----------------------------------------------
    models, diffusion, metas = _load_models(method, checkpoint_path, checkpoint_path_late, use_ema, dev, allow_deeper_shallow)
    if sampler == "ddpm" and steps is None:
        steps = diffusion.num_timesteps
    diffusion.sampling_plan(sampler, steps, eta)  # validates steps and eta against T
    if method == "duodiff":
        require(
            t_switch <= steps,
            f"--t-switch must be in [0, {steps}] (the number of sampling steps); got {t_switch}",
        )
    main_meta = metas.get("model", metas.get("shallow"))
    config = models.get("model", models.get("shallow")).config
    img_size, in_chans, num_classes = config.img_size, config.in_chans, config.num_classes
    # The deepest model of the set sets the full depth; shallow_depth is the shallow model's depth.
    if method == "duodiff":
        depth, shallow_depth = models["full"].depth, models["shallow"].depth
    else:
        depth = models["model"].depth
        shallow_depth = depth if method == "shallow" else None

    settings = {
        "method": method,
        "checkpoint": str(checkpoint_path),
        "checkpoint_step": main_meta["step"],
        "checkpoint_late": None if checkpoint_path_late is None else str(checkpoint_path_late),
        "checkpoint_late_step": metas["full"]["step"] if method == "duodiff" else None,
        "use_ema": bool(use_ema),
        "threshold": None if threshold is None else float(threshold),
        "t_switch": t_switch,
        "sampler": sampler,
        "steps": steps,
        "eta": float(eta),
        "n_samples": n_samples,
        "batch_size": batch_size,
        "seed": seed,
        "precision": precision,
    }
    n_batches = math.ceil(n_samples / batch_size)
    batch_ranges = [(b, b * batch_size, min(batch_size, n_samples - b * batch_size)) for b in range(n_batches)]

    # ---- resume: a batch is done when its part file and all its images exist -----------------
    # Every part in the folder must come from these settings; a part of another n_samples,
    # seed, model, ... would mix two sample sets.
    parts = {}
    for path in sorted((folder / "parts").glob("batch_*.pt")):
        part = _read_part(path, settings)
        start, count = part["start"], part["count"]
        if all(image_path(folder, i).is_file() for i in range(start, start + count)):
            parts[part["batch"]] = part
    todo = [r for r in batch_ranges if r[0] not in parts]
    if todo and (folder / "stats.json").exists():
        (folder / "stats.json").unlink()  # stats.json marks a finished set; this one is not (any more)

    # ---- sampling ---------------------------------------------------------------------------
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "parts").mkdir(parents=True, exist_ok=True)
    for model in models.values():
        model.eval()
    if todo:
        shape = (min(batch_size, n_samples), in_chans, img_size, img_size)
        _warm_up(method, models, threshold, shape, num_classes, dev, precision)

    from tqdm.auto import tqdm

    bar = tqdm(total=n_batches, initial=n_batches - len(todo), desc=f"sample {method}", unit="batch", disable=not progress)
    for b, start, count in todo:
        generator = torch.Generator().manual_seed(batch_seed(seed, b))
        # Drawn on the CPU in a fixed order (noise, labels, then the sampler's noise), so every
        # method and device starts batch b from the same x_T and labels.
        noise = torch.randn((count, in_chans, img_size, img_size), generator=generator).to(dev)
        y = torch.randint(num_classes, (count,), generator=generator).to(dev) if num_classes > 0 else None
        denoiser = _make_denoiser(method, models, threshold, t_switch, steps, y)

        clock = timing_clock(dev)
        _synchronize(dev)
        started, cpu_started = time.perf_counter(), time.process_time()
        with torch.inference_mode(), precision_context(precision, dev):
            samples = diffusion.sample(denoiser, noise, sampler, steps, eta=eta, generator=generator, progress=progress)
        _synchronize(dev)
        wall_time, cpu_time = time.perf_counter() - started, time.process_time() - cpu_started

        executed_depth = denoiser.executed_depth(steps, count)
        for i, image in enumerate(to_uint8(samples).cpu()):
            save_png(image, image_path(folder, start + i))
        # The part file comes after the images: its presence says the whole batch is on disk.
        part = {
            "format": "duodiff-sample-part",
            "settings": settings,
            "batch": b,
            "start": start,
            "count": count,
            "exit_layers": executed_depth,
            "wall_time_s": wall_time,
            "cpu_time_s": cpu_time,
            "timing_clock": clock,
            "device": str(dev),
        }
        torch_save(part, part_path(folder, b))
        parts[b] = part
        bar.update(1)
    bar.close()

    # ---- set-level files --------------------------------------------------------------------
    exit_layers = torch.cat([parts[b]["exit_layers"] for b in range(n_batches)], dim=1)
    torch_save(exit_layers, folder / "exit_layers.pt")
    _write_grid(folder, min(GRID_SAMPLES, n_samples))

    wall_time_s = sum(parts[b]["wall_time_s"] for b in range(n_batches))
    # Throughput by the process's CPU time only when every batch was timed that way (a set
    # resumed under other settings falls back to the wall clock it has for all batches).
    clock = "cpu" if all(parts[b].get("timing_clock") == "cpu" for b in range(n_batches)) else "wall"
    cpu_time_s = sum(parts[b]["cpu_time_s"] for b in range(n_batches)) if clock == "cpu" else None
    timed_s = cpu_time_s if clock == "cpu" else wall_time_s
    stats = {
        "method": method,
        "setting": setting_label({"method": method, "threshold": threshold, "t_switch": t_switch}, style="stats"),
        "threshold": settings["threshold"],
        "t_switch": t_switch,
        "classifier_type": main_meta.get("classifier_type") if method == "early_exit" else None,
        "sampler": sampler,
        "steps": steps,
        "eta": float(eta),
        "n_samples": n_samples,
        "batch_size": batch_size,
        "seed": seed,
        "depth": depth,
        "shallow_depth": shallow_depth,
        "checkpoint": str(checkpoint_path),
        "checkpoint_late": settings["checkpoint_late"],
        "use_ema": bool(use_ema),
        "precision": precision,
        "wall_time_s": wall_time_s,
        "cpu_time_s": cpu_time_s,
        "timing_clock": clock,
        "images_per_s": n_samples / timed_s if timed_s > 0 else None,
        "mean_exit_layer_per_step": exit_layers.double().mean(dim=1).tolist(),
        # Executed transformer blocks relative to always running the deepest model of the set.
        "layer_ratio": exit_layers.double().mean().item() / depth,
        "img_size": img_size,
        "in_chans": in_chans,
        "num_classes": num_classes,
        # What the model was trained on (null for a model.pt without it): `duodiff fid` refuses a
        # reference of another dataset.
        "dataset": (main_meta.get("train_args") or {}).get("dataset"),
        "diffusion": diffusion.config(),
        "devices": sorted({parts[b]["device"] for b in range(n_batches)}),
        "device": str(dev),
        "torch_version": torch.__version__,
    }
    write_json(folder / "stats.json", stats)  # last: its presence marks a finished set
    return stats


def _write_grid(folder: Path, count: int) -> None:
    """grid.png: the first `count` samples (duodiff.images.image_grid)."""
    images = torch.stack([load_png(image_path(folder, i)) for i in range(count)])
    save_png(image_grid(images), folder / "grid.png")


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "sample",
        help="generate a sample set (full, shallow, early exit or DuoDiff) and time it",
        description="Generate images with a trained model into --output-folder (images/, grid.png, "
        "exit_layers.pt, stats.json). Rerunning the same command resumes an interrupted set.",
    )
    add_flag(parser, "--checkpoint-path", required=True, help="model.pt (duodiff: the shallow model)")
    add_flag(parser, "--checkpoint-path-late", default=None, help="duodiff: the full model's model.pt")
    add_flag(parser, "--allow-deeper-shallow", action="store_true",
             help="duodiff: run even if --checkpoint-path is not shallower than --checkpoint-path-late "
             "(refused by default: it usually means the two paths are swapped)")  # fmt: skip
    add_flag(parser, "--method", required=True, choices=METHODS)
    add_flag(parser, "--threshold", type=float, default=None, help="early_exit: exit once uncertainty <= this, in [0, 1]")
    add_flag(parser, "--t-switch", type=int, default=None, help="duodiff: steps done by the shallow model, from the noisiest")
    add_flag(parser, "--sampler", default="ddim", choices=SAMPLERS)
    add_flag(parser, "--steps", type=int, default=None, help="sampling steps (ddim: required; ddpm: num_timesteps)")
    add_flag(parser, "--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like noise")
    add_flag(parser, "--n-samples", type=int, required=True)
    add_flag(parser, "--batch-size", type=int, required=True)
    add_flag(parser, "--seed", type=int, default=0)
    add_flag(parser, "--output-folder", required=True)
    add_flag(parser, "--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    add_flag(parser, "--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    add_flag(parser, "--precision", default="fp32",
             help="network arithmetic: fp32 | tf32 (CUDA) | bf16 | fp16 (CUDA): autocast")  # fmt: skip
    add_flag(parser, "--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=_main)


def _main(args) -> None:
    run_sample(
        checkpoint_path=args.checkpoint_path,
        method=args.method,
        output_folder=args.output_folder,
        sampler=args.sampler,
        steps=args.steps,
        n_samples=args.n_samples,
        batch_size=args.batch_size,
        seed=args.seed,
        threshold=args.threshold,
        t_switch=args.t_switch,
        checkpoint_path_late=args.checkpoint_path_late,
        eta=args.eta,
        use_ema=not args.no_ema,
        device=args.device,
        precision=args.precision,
        progress=not args.no_progress,
        allow_deeper_shallow=args.allow_deeper_shallow,
    )
