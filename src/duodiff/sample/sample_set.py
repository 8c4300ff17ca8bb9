"""`duodiff sample`: generate a sample set with one of the four methods and time it.

Methods (docs/architecture.md):
- full      one U-ViT at every step (the baseline);
- shallow   one (shallow) U-ViT at every step;
- early_exit  DeeDiff/AdaDiff: per sample and step, the first exit whose predicted uncertainty
            is <= --threshold;
- duodiff   the shallow U-ViT (--checkpoint-path) for the first --t-switch (noisiest) steps,
            the full U-ViT (--checkpoint-path-late) for the rest. The first must be the shallower
            one (two paths swapped are refused) unless --allow-deeper-shallow says it is meant.
            An early-exit model (on the full U-ViT) as --checkpoint-path-late, with --threshold,
            runs its exit rule in the late phase: DuoDiff with early exit (a composed set).
- cache     DeepCache-style caching on the full U-ViT: the whole network every --cache-interval
            (N) steps; in between only the first --cache-keep (k) in-blocks and the last k
            out-blocks, everything inside them taken from the last full step. With --method duodiff
            and a plain full U-ViT as --checkpoint-path-late, --cache-interval and --cache-keep cache
            the full model's phase the same way (its first step a full one): DuoDiff with caching.
- l2c       Learning-to-Cache on the full U-ViT: a router trained for this sampler and step count
            (--router, `duodiff train-router`); on the cache steps (1, 3, 5, ...) each block's
            attention and MLP whose gate is at most --router-threshold re-add their residuals of
            the step before instead of running.
Any method runs at the --steps given: a composed set at fewer steps is the same command.
With --guidance-scale S != 0 each method also runs the unconditional branch (duodiff.core.guidance).

The set is written batch by batch: the PNGs of a batch, then its part file (exit layers, wall
time and the settings). A rerun with the same arguments skips finished batches, so a killed job
resumes where it stopped and produces exactly the images an uninterrupted run would: batch b
draws everything from its own generator seeded with seed * 1000003 + b.
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path

import torch

from duodiff.core.distributed import default_device
from duodiff.core.errors import DuodiffError, check_choice, is_int, is_number, require
from duodiff.core.fingerprint import RESTART_HELP, check_state, fingerprint, remove_files
from duodiff.core.flags import add_flag
from duodiff.core.guidance import branch_major, check_guidance_scale, label_classes, set_null_label
from duodiff.core.images import image_grid, load_png, png_problem, save_png, to_uint8
from duodiff.core.io import file_sha256, remove_stray_temporaries, torch_save, write_json
from duodiff.core.latent import autoencoder_record, check_model_autoencoder, decoding_stats, load_codec
from duodiff.core.study import CUDA_ONLY_PRECISIONS, METHODS, PRECISIONS, SAMPLERS, setting_label
from duodiff.models.router import check_router_fits, load_router
from duodiff.sample.policies import cache_settings, make_denoiser
from duodiff.sample.setup import (
    check_device,
    load_models,
    precision_context,
    synchronize,
    timing_clock,
    warm_up,
)

SEED_STRIDE = 1000003  # batch b of a set with seed s uses seed s * SEED_STRIDE + b
GRID_SAMPLES = 64  # grid.png shows the set's first images (duodiff.core.images.image_grid)
# The settings of a set that stats.json repeats as they are.
RUN_KEYS = ("sampler", "steps", "eta", "n_samples", "batch_size", "seed")


def batch_seed(seed: int, batch_index: int) -> int:
    return seed * SEED_STRIDE + batch_index


def image_path(folder: Path, index: int) -> Path:
    return folder / "images" / f"{index:06d}.png"


def part_path(folder: Path, batch_index: int) -> Path:
    return folder / "parts" / f"batch_{batch_index:05d}.pt"


def branches(settings: dict) -> int:
    """Network evaluations per sample and step: 2 with guidance (duodiff.core.guidance), else 1."""
    return 2 if settings["guidance_scale"] != 0 else 1


def main_value(by_role: dict):
    """The set's main model (or its metadata): the only one, or DuoDiff's shallow model."""
    return by_role.get("model", by_role.get("shallow"))


# ---- the one check pass ------------------------------------------------------------------------


def check_sample_args(*, method, sampler, steps, n_samples, batch_size, seed, eta, threshold, t_switch,
                      checkpoint_path_late, allow_deeper_shallow, precision, device, guidance_scale,
                      cache_interval=None, cache_keep=None, router=None, router_threshold=None) -> torch.device:
    """Every rule on the arguments that needs no file, once, before any work; -> the device."""
    check_choice("--method", method, METHODS)
    check_choice("--sampler", sampler, SAMPLERS)
    for name, value in (("--n-samples", n_samples), ("--batch-size", batch_size)):
        require(
            is_int(value) and value > 0,
            f"{name} must be a positive integer; got {value!r}",
        )
    require(
        steps is None or (is_int(steps) and steps > 0),
        f"--steps must be a positive integer; got {steps!r}",
    )
    require(sampler == "ddpm" or steps is not None, f"--steps is required for --sampler {sampler}")
    require(
        is_int(seed) and 0 <= seed < 2**63 // SEED_STRIDE - 1,
        f"--seed must be a non-negative integer below {2**63 // SEED_STRIDE - 1}; got {seed!r}",
    )
    require(isinstance(eta, (int, float)) and eta >= 0, f"--eta must be a number >= 0; got {eta!r}")
    require(sampler == "ddim" or eta == 0, f"--eta applies to the ddim sampler only; got --eta {eta} with --sampler {sampler}")
    if method == "early_exit":
        require(threshold is not None, "--method early_exit needs --threshold (a number in [0, 1])")
    if method in ("early_exit", "duodiff") and threshold is not None:
        # duodiff: the exit rule of an early-exit --checkpoint-path-late (check_late_model)
        require(
            is_number(threshold) and 0 <= threshold <= 1,
            f"--threshold must be in [0, 1]; got {threshold!r}",
        )
    else:
        require(
            threshold is None,
            f"--threshold applies to --method early_exit (and duodiff with an early-exit --checkpoint-path-late) only; "
            f"got --threshold {threshold} with --method {method}",
        )
    if method == "duodiff":
        require(checkpoint_path_late is not None, "--method duodiff needs --checkpoint-path-late (the full model)")
        require(t_switch is not None, "--method duodiff needs --t-switch (how many of the noisiest steps the shallow model does)")
        require(
            is_int(t_switch) and t_switch >= 0,
            f"--t-switch must be a non-negative integer; got {t_switch!r}",
        )
    else:
        require(t_switch is None, f"--t-switch applies to --method duodiff only; got --t-switch {t_switch} with --method {method}")
        require(
            checkpoint_path_late is None,
            f"--checkpoint-path-late applies to --method duodiff only; got it with --method {method}",
        )
        require(not allow_deeper_shallow, f"--allow-deeper-shallow applies to --method duodiff only; got it with --method {method}")
    caching = (cache_interval, cache_keep) != (None, None)
    if method == "cache" or (method == "duodiff" and caching):
        # duodiff: caching in the full model's phase (DuoDiff with caching, a composed set)
        for name, value in (("--cache-interval", cache_interval), ("--cache-keep", cache_keep)):
            what = f"--method {method}" + (" with caching" if method == "duodiff" else "")
            require(value is not None, f"{what} needs {name} (a positive integer)")
            require(is_int(value) and value > 0, f"{name} must be a positive integer; got {value!r}")
        require(
            method == "cache" or threshold is None,
            "--cache-interval with --method duodiff caches a plain full U-ViT's phase; it does not combine with "
            f"--threshold (early exit in that phase); got --threshold {threshold}",
        )
    else:
        _refuse_flags(method, "--method cache (and duodiff's full-model phase)",
                      ("--cache-interval", cache_interval), ("--cache-keep", cache_keep))
    if method == "l2c":
        require(router is not None, "--method l2c needs --router (a router.pt of duodiff train-router)")
        require(router_threshold is not None, "--method l2c needs --router-threshold (in [0, 1])")
        require(is_number(router_threshold) and 0.0 <= router_threshold <= 1.0,
                f"--router-threshold must be in [0, 1]; got {router_threshold!r}")
    else:
        _refuse_flags(method, "--method l2c", ("--router", router), ("--router-threshold", router_threshold))
    check_choice("--precision", precision, PRECISIONS)
    check_guidance_scale(guidance_scale)
    dev = check_device(device or default_device())
    require(
        dev.type == "cuda" or precision not in CUDA_ONLY_PRECISIONS,
        f"--precision {precision} needs --device cuda; on {dev.type} choose fp32 or bf16",
    )
    return dev


def _refuse_flags(method, applies_to: str, *flags) -> None:
    """Each (flag, value) given (not None) with a method it does not apply to: one line naming it."""
    for name, value in flags:
        require(value is None, f"{name} applies to {applies_to} only; got {name} {value} with --method {method}")


def check_late_model(method, metas, threshold, checkpoint_path_late, cache_interval=None) -> None:
    """DuoDiff's late model and --threshold go together: an early-exit late model runs its exit
    rule (it needs the threshold), a plain U-ViT has none (a threshold would be ignored). Caching
    the late phase (--cache-interval) needs a plain U-ViT: its cached path is UViT.forward_cached."""
    if method != "duodiff":
        return
    kind = metas["full"]["kind"]
    require(
        cache_interval is None or kind == "uvit",
        f"--cache-interval with --method duodiff caches the full model's phase, which needs a plain uvit "
        f"--checkpoint-path-late; {checkpoint_path_late} is a {kind!r} model",
    )
    if kind == "early_exit":
        require(
            threshold is not None,
            f"--checkpoint-path-late {checkpoint_path_late} is an early_exit model: DuoDiff with early exit in the "
            "late phase needs --threshold (a number in [0, 1])",
        )
    else:
        require(
            threshold is None,
            f"--threshold applies to an early_exit --checkpoint-path-late; {checkpoint_path_late} is a {kind!r} model",
        )


def check_cache_keep(cache_keep, depth: int, checkpoint_path) -> None:
    """--cache-keep blocks at each end of the cached model (the full one; DuoDiff's late one) must
    leave the mid block to cache: at most depth // 2."""
    if cache_keep is not None:
        require(
            cache_keep <= depth // 2,
            f"--cache-keep must be in [1, {depth // 2}] for {checkpoint_path} (depth {depth}: {depth // 2} in-blocks, "
            f"the mid block, {depth // 2} out-blocks); got {cache_keep}",
        )


def sampling_steps(num_timesteps: int, method, sampler, steps, t_switch) -> int:
    """The set's number of sampling steps (ddpm: all of the model's), checked against the model's
    num_timesteps and --t-switch: the rules that need the model file."""
    T = num_timesteps
    if sampler == "ddpm":
        require(
            steps is None or steps == T,
            f"--steps must be {T} (num_timesteps) for the ddpm sampler, got {steps!r}; use --sampler ddim for fewer steps",
        )
        steps = T
    require(steps <= T, f"--steps must be an integer in [1, {T}] for the {sampler} sampler; got {steps!r}")
    if method == "duodiff":
        require(t_switch <= steps, f"--t-switch must be in [0, {steps}] (the number of sampling steps); got {t_switch}")
    return steps


# ---- the set ------------------------------------------------------------------------------------


def run_sample(*, checkpoint_path, method, output_folder, sampler, steps, n_samples, batch_size, seed, threshold,
               t_switch, checkpoint_path_late, eta, use_ema, device, precision, progress, allow_deeper_shallow,
               guidance_scale, autoencoder, autoencoder_config, scale_factor, restart, cache_interval=None,
               cache_keep=None, router=None, router_threshold=None):
    """Generate `n_samples` images into `output_folder` (see docs/architecture.md, "Sample set folder")."""
    dev = check_sample_args(
        method=method, sampler=sampler, steps=steps, n_samples=n_samples, batch_size=batch_size, seed=seed, eta=eta,
        threshold=threshold, t_switch=t_switch, checkpoint_path_late=checkpoint_path_late,
        allow_deeper_shallow=allow_deeper_shallow, precision=precision, device=device, guidance_scale=guidance_scale,
        cache_interval=cache_interval, cache_keep=cache_keep, router=router, router_threshold=router_threshold,
    )  # fmt: skip
    router_record = load_router(router) if method == "l2c" else None  # a bad file: one line before any work
    decoder = autoencoder_record(autoencoder, autoencoder_config, scale_factor)  # latent diffusion: None in pixel space
    paths = (checkpoint_path, checkpoint_path_late)
    models, diffusion, metas = load_models(method, *paths, use_ema, dev, allow_deeper_shallow)
    for path, meta in zip(paths, (main_value(metas), metas.get("full"))):
        if meta is not None:
            check_model_autoencoder(meta, decoder, path)
    check_late_model(method, metas, threshold, checkpoint_path_late, cache_interval)
    cached, cached_path = ("full", checkpoint_path_late) if method == "duodiff" else ("model", checkpoint_path)
    check_cache_keep(cache_keep, models[cached].depth, cached_path)
    steps = sampling_steps(diffusion.num_timesteps, method, sampler, steps, t_switch)
    if router_record is not None:
        check_router_fits(router_record, router, steps=steps, sampler=sampler, depth=main_value(models).depth,
                          model_sha256=file_sha256(checkpoint_path))
    null = set_null_label(guidance_scale, models, metas)
    settings = {
        "method": method,
        "checkpoint": str(checkpoint_path),
        "checkpoint_step": main_value(metas)["step"],
        "checkpoint_late": None if checkpoint_path_late is None else str(checkpoint_path_late),
        "checkpoint_late_step": metas["full"]["step"] if method == "duodiff" else None,
        "use_ema": bool(use_ema),
        "threshold": None if threshold is None else float(threshold),
        "t_switch": t_switch,
        **dict(zip(RUN_KEYS, (sampler, steps, float(eta), n_samples, batch_size, seed))),
        "precision": precision,
        "guidance_scale": float(guidance_scale),
        # Only in latent sets, so the parts of pixel-space sets written before it still match.
        **({"autoencoder": decoder} if decoder is not None else {}),
        # Only in cache sets, for the same reason.
        **({"cache_interval": cache_interval, "cache_keep": cache_keep} if cache_interval is not None else {}),
        **({"router": str(router), "router_threshold": float(router_threshold)} if method == "l2c" else {}),
    }
    # The parts are keyed by the models' bytes, not their paths and steps: a model retrained in
    # place with the same step count must not pass off the old model's images as its own.
    paths_free = {k: v for k, v in settings.items() if k not in ("checkpoint", "checkpoint_late", "router")}
    current = fingerprint({"model weights": checkpoint_path, "late model weights": checkpoint_path_late,
                           "router": router if method == "l2c" else None}, paths_free)
    folder = Path(output_folder)
    remove_stray_temporaries(folder)  # a killed job's half-written PNG or part, never a result
    starts = range(0, n_samples, batch_size)
    batches = [(b, start, min(batch_size, n_samples - start)) for b, start in enumerate(starts)]
    parts = finished_parts(folder, current, restart)
    todo = [batch for batch in batches if batch[0] not in parts]
    if todo and (folder / "stats.json").exists():
        (folder / "stats.json").unlink()  # stats.json marks a finished set; this one is not (any more)

    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "parts").mkdir(parents=True, exist_ok=True)
    for model in models.values():
        model.eval()
    if todo:
        config = main_value(models).config
        shape = (branches(settings) * min(batch_size, n_samples), config.in_chans, config.img_size, config.img_size)
        warm_up(method, models, settings["threshold"], shape, config.num_classes, dev, precision)

    from tqdm.auto import tqdm

    bar = tqdm(total=len(batches), initial=len(batches) - len(todo), desc=f"sample {method}", unit="batch",
               disable=not progress)  # fmt: skip
    codec = load_codec(decoder, main_value(models).config, dev) if todo else None
    for batch in todo:
        parts[batch[0]] = sample_batch(folder, batch, settings, current, models, diffusion, dev, progress, null, codec)
        bar.update(1)
    bar.close()
    pairing = pairing_record(settings, main_value(models).config, null)
    return finish_set(folder, settings, [parts[b] for b, _, _ in batches], models, metas, diffusion, dev, pairing)


def read_part(path: Path) -> dict:
    try:
        part = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # a part is written atomically; anything unreadable is foreign
        raise DuodiffError(f"{path}: unreadable part file ({error}); delete the output folder and rerun") from None
    require(
        isinstance(part, dict) and part.get("format") == "duodiff-sample-part",
        f"{path}: not a duodiff sample part; delete the output folder and rerun",
    )
    return part


# What a set folder holds of one sample set: discarded whole when its parts are stale.
SET_STATE = ("parts", "images", "stats.json", "grid.png", "exit_layers.pt")


def finished_parts(folder: Path, current: dict, restart: bool) -> dict:
    """{batch: part} of the batches already done: a batch is done when its part file and all its
    images exist. Every part in the folder must have the fingerprint `current` (the models' sha256
    and the settings): a part of another model, n_samples, seed, ... would mix two sample sets, so
    it is refused, or with `restart` the folder's set is discarded (core/fingerprint.check_state).
    The images of a done batch must be whole PNGs (a truncated one would stop the set's grid.png,
    and its scores, later on)."""
    parts = {}
    for path in sorted((folder / "parts").glob("batch_*.pt")):
        part = read_part(path)
        if not check_state(part.get("fingerprint"), current, f"the sample set in {folder} ({path.name})", restart,
                           remove_files(*(folder / name for name in SET_STATE))):
            return {}
        start, count = part["start"], part["count"]
        if all(image_path(folder, i).is_file() for i in range(start, start + count)):
            for i in range(start, start + count):
                problem = png_problem(image_path(folder, i))
                require(
                    problem is None,
                    f"{image_path(folder, i)} is not a readable PNG, truncated or corrupt ({problem}); delete it (its "
                    f"batch is sampled again) or the set folder {folder}, and rerun",
                )
            parts[part["batch"]] = part
    return parts


def sample_batch(folder: Path, batch: tuple, settings: dict, current: dict, models, diffusion, device, progress, null,
                 codec) -> dict:
    """Sample one batch (index, first image, count), write its PNGs, then its part file. `null`:
    the models' null class (None: none), never a sample label. With a `codec` (latent diffusion)
    the sampler runs in its latent space and the images are decoded; the decoder is timed apart
    from the network (decode_time_s)."""
    b, start, count = batch
    method, steps = settings["method"], settings["steps"]
    config = main_value(models).config
    generator = torch.Generator().manual_seed(batch_seed(settings["seed"], b))
    # Drawn on the CPU in a fixed order (noise, labels, then the sampler's noise), so every
    # method and device starts batch b from the same x_T and labels.
    noise = torch.randn((count, config.in_chans, config.img_size, config.img_size), generator=generator).to(device)
    classes = label_classes(config.num_classes, null)
    y = torch.randint(classes, (count,), generator=generator).to(device) if config.num_classes > 0 else None
    denoiser = make_denoiser(method, models, settings["threshold"], settings["t_switch"], y, settings["guidance_scale"], null,
                             cache_settings(settings))

    clock = timing_clock(device)
    synchronize(device)
    started, cpu_started = time.perf_counter(), time.process_time()
    with torch.inference_mode(), precision_context(settings["precision"], device):
        # x0 is clipped to the images' [-1, 1] in pixel space only: latents are not bounded (U-ViT's
        # latent models sample unclipped).
        samples = diffusion.sample(
            denoiser, noise, settings["sampler"], steps, eta=settings["eta"], generator=generator, progress=progress,
            clip_denoised=codec is None,
        )
    synchronize(device)
    wall_time, cpu_time = time.perf_counter() - started, time.process_time() - cpu_started

    executed_depth = denoiser.executed_depth(steps, count)
    decode_time = None
    if codec is not None:
        started = time.perf_counter()
        with torch.inference_mode():
            samples = codec.decode(samples.float())
        synchronize(device)
        decode_time = time.perf_counter() - started
    for i, image in enumerate(to_uint8(samples).cpu()):
        save_png(image, image_path(folder, start + i))
    # The part file comes after the images: its presence says the whole batch is on disk.
    part = {
        "format": "duodiff-sample-part",
        "settings": settings,
        "fingerprint": current,  # what finished_parts compares
        "batch": b,
        "start": start,
        "count": count,
        "exit_layers": executed_depth,
        "wall_time_s": wall_time,
        "cpu_time_s": cpu_time,
        "decode_time_s": decode_time,
        "timing_clock": clock,
        "device": str(device),
    }
    torch_save(part, part_path(folder, b))
    return part


# ---- set-level files ----------------------------------------------------------------------------


def pairing_record(settings: dict, config, null) -> dict:
    """What sample i's starting noise and label are drawn from (sample_batch: batch_seed(seed, b),
    noise then labels, batches of batch_size): two sets with the same record start every sample
    from the same x_T and label, so their scores can be compared sample by sample (the paired
    differences of `duodiff score --baseline`)."""
    return {
        "seed": settings["seed"],
        "n_samples": settings["n_samples"],
        "batch_size": settings["batch_size"],
        "shape": [config.in_chans, config.img_size, config.img_size],
        "label_classes": label_classes(config.num_classes, null) if config.num_classes > 0 else 0,
    }


def finish_set(folder: Path, settings: dict, parts: list, models, metas, diffusion, device, pairing: dict) -> dict:
    """exit_layers.pt, grid.png and, last, stats.json: its presence marks a finished set."""
    exit_layers = branch_major([part["exit_layers"] for part in parts], branches(settings))
    torch_save(exit_layers, folder / "exit_layers.pt")
    write_grid(folder, min(GRID_SAMPLES, settings["n_samples"]))
    stats = set_stats(settings, parts, exit_layers, models, metas, diffusion, device, folder) | {"pairing": pairing}
    write_json(folder / "stats.json", stats)
    return stats


def write_grid(folder: Path, count: int) -> None:
    """grid.png: the first `count` samples (duodiff.core.images.image_grid)."""
    images = torch.stack([load_png(image_path(folder, i)) for i in range(count)])
    save_png(image_grid(images), folder / "grid.png")


def throughput(parts: list, n_samples: int) -> dict:
    """Sampling time of the set and images per second."""
    wall_time_s = sum(part["wall_time_s"] for part in parts)
    # Throughput by the process's CPU time only when every batch was timed that way (a set
    # resumed under other settings falls back to the wall clock it has for all batches).
    clock = "cpu" if all(part.get("timing_clock") == "cpu" for part in parts) else "wall"
    cpu_time_s = sum(part["cpu_time_s"] for part in parts) if clock == "cpu" else None
    timed_s = cpu_time_s if clock == "cpu" else wall_time_s
    return {
        "wall_time_s": wall_time_s,
        "cpu_time_s": cpu_time_s,
        "timing_clock": clock,
        "images_per_s": n_samples / timed_s if timed_s > 0 else None,
    }


def set_stats(settings: dict, parts: list, exit_layers, models, metas, diffusion, device, folder: Path) -> dict:
    """stats.json: the set's settings, models, timing and exits (docs/architecture.md)."""
    method, meta, config = settings["method"], main_value(metas), main_value(models).config
    # The deepest model of the set sets the full depth; shallow_depth is the shallow model's depth.
    if method == "duodiff":
        depth, shallow_depth = models["full"].depth, models["shallow"].depth
    else:
        depth = models["model"].depth
        shallow_depth = depth if method == "shallow" else None
    return {
        "method": method,
        # DuoDiff with early exit or caching reads as what it combines (t_switch, threshold or N, steps).
        "setting": setting_label({**settings, "method": "composed"} if method == "duodiff" and (
            settings["threshold"] is not None or "cache_interval" in settings) else settings, style="stats"),
        "threshold": settings["threshold"],
        "t_switch": settings["t_switch"],
        # cache: the whole network every cache_interval steps, cache_keep blocks at each end between
        **{key: settings[key] for key in ("cache_interval", "cache_keep") if key in settings},
        # l2c: the router file and its threshold (a layer runs on a cache step when its gate is above it)
        **{key: settings.get(key) for key in ("router", "router_threshold") if method == "l2c"},
        # early exit, alone or in DuoDiff's late phase (then the late model's)
        "classifier_type": (meta if method == "early_exit" else metas.get("full", {})).get("classifier_type")
        if settings["threshold"] is not None else None,
        **{key: settings[key] for key in RUN_KEYS},
        "depth": depth,
        "shallow_depth": shallow_depth,
        **{key: settings[key] for key in ("checkpoint", "checkpoint_late", "use_ema", "precision", "guidance_scale")},
        "branches": branches(settings),
        **throughput(parts, settings["n_samples"]),
        **decoding_stats(settings, parts, config, load_png(image_path(folder, 0)).shape),
        "mean_exit_layer_per_step": exit_layers.double().mean(dim=1).tolist(),
        # Executed transformer blocks relative to always running the deepest model of the set (with
        # guidance: over both branches, each column of exit_layers one network evaluation).
        "layer_ratio": exit_layers.double().mean().item() / depth,
        "num_classes": config.num_classes,
        # What the model was trained on (null for a model.pt without it): `duodiff fid` refuses a
        # reference of another dataset.
        "dataset": (meta.get("train_args") or {}).get("dataset"),
        "diffusion": diffusion.config(),
        "devices": sorted({part["device"] for part in parts}),
        "device": str(device),
        "torch_version": torch.__version__,
    }


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "sample",
        help="generate a sample set (full, shallow, early exit, DuoDiff, caching or Learning-to-Cache) and time it",
        description="Generate images with a trained model into --output-folder (images/, grid.png, "
        "exit_layers.pt, stats.json). Rerunning the same command resumes an interrupted set.",
    )
    add_flag(parser, "--checkpoint-path", required=True, help="model.pt (duodiff: the shallow model)")
    add_flag(parser, "--checkpoint-path-late", default=None,
             help="duodiff: the full model's model.pt, or an early-exit model on it (then with --threshold)")
    add_flag(parser, "--allow-deeper-shallow", action="store_true",
             help="duodiff: run even if --checkpoint-path is not shallower than --checkpoint-path-late "
             "(refused by default: it usually means the two paths are swapped)")  # fmt: skip
    add_flag(parser, "--method", required=True, choices=METHODS)
    add_flag(parser, "--threshold", type=float, default=None,
             help="early_exit (and duodiff with an early-exit late model): exit once uncertainty <= this, in [0, 1]")
    add_flag(parser, "--t-switch", type=int, default=None, help="duodiff: steps done by the shallow model, from the noisiest")
    add_flag(parser, "--cache-interval", type=int, default=None,
             help="cache: run the whole network every N steps (1: every step, the full model)")
    add_flag(parser, "--cache-keep", type=int, default=None,
             help="cache: in-blocks at the start and out-blocks at the end run on the steps between (1..depth // 2)")
    add_flag(parser, "--router", default=None, help="l2c: the router file (duodiff train-router) for this sampler and steps")
    add_flag(parser, "--router-threshold", type=float, default=None,
             help="l2c: on a cache step a layer runs when its gate is above this, else re-adds its last residual; in [0, 1]")
    add_flag(parser, "--sampler", default="ddim", choices=SAMPLERS)
    add_flag(parser, "--steps", type=int, default=None, help="sampling steps (network evaluations; ddpm: num_timesteps, every other sampler: required)")
    add_flag(parser, "--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like noise")
    add_flag(parser, "--n-samples", type=int, required=True)
    add_flag(parser, "--batch-size", type=int, required=True)
    add_flag(parser, "--seed", type=int, default=0)
    add_flag(parser, "--output-folder", required=True)
    add_flag(parser, "--no-ema", dest="use_ema", action="store_false", help="use the raw weights instead of the EMA weights")
    add_flag(parser, "--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    add_flag(parser, "--precision", default="fp32",
             help="network arithmetic: fp32 | tf32 (CUDA) | bf16 | fp16 (CUDA): autocast")  # fmt: skip
    add_flag(parser, "--guidance-scale", type=float, default=0.0,
             help="classifier-free guidance: out_c + S (out_c - out_u) with the null class; 0: none (U-ViT ImageNet 256: 0.4)")
    add_flag(parser, "--no-progress", dest="progress", action="store_false", help="no progress bars")
    add_flag(parser, "--autoencoder", default=None,
             help="latent diffusion: decode each batch through this AutoencoderKL (diffusers folder or checkpoint file)")
    add_flag(parser, "--autoencoder-config", default=None, help="diffusers config.json of a single-file autoencoder")
    add_flag(parser, "--scale-factor", type=float, default=None, help="the latents' scale (U-ViT's ImageNet and SD: 0.18215)")
    add_flag(parser, "--restart", action="store_true", help=f"parts/ and images/: {RESTART_HELP}")
    parser.set_defaults(func=_main)


def _main(args) -> None:
    # Every argument of run_sample is a flag of the same name (the flags hold the defaults).
    run_sample(**{name: getattr(args, name) for name in inspect.signature(run_sample).parameters})
