"""`duodiff time`: the measured speed-ups of a study's sample sets, each set timed alone.

`duodiff sample` times each set while it samples it, beside whatever else runs on the machine (in
the pipeline: other sampling and scoring jobs; on a cluster: other GPU models too), so its
images/s are not comparable between sets. This command times every set again, after sampling, in
one process with the machine to itself (the workflow's timing job runs with no other job beside
it), on one device:

- Each set's sampling policy is rebuilt exactly as `duodiff sample` runs it, from its stats.json:
  the method, checkpoint(s), threshold, t_switch, sampler, steps, eta, EMA weights, precision and
  guidance scale, through duodiff.sample.setup.load_models, duodiff.sample.policies.make_denoiser
  and GaussianDiffusion.sample inside torch.inference_mode() and the set's precision context. Each
  checkpoint is loaded once and shared by the sets that use it. Latent sets are not decoded: the
  network alone is timed, as the papers count it (stats.json's decode_time_s is apart too).
- Every set samples the same batch: `--batch-size` noise images drawn from `--seed` (then, for a
  class-conditional model, the labels, drawn from the real classes as sampling draws them; the
  sampler's own noise, DDPM's or DDIM's with eta > 0, from the same seed on every pass), so every
  pass of a set does exactly the same work, early exits included.
- Warm-up: one untimed pass of every set first (lazy CUDA/cuDNN and allocator set-up, caches).
  Then `--rounds` rounds; in each, every set once, interleaved in a fixed order A B C ... A B C ...
  (the baseline in every round), each pass timed alone with a monotonic clock, so a slow spell of
  the machine hits every set of a round alike. The clock is the wall clock, time.perf_counter (on
  CUDA the device is synchronised before it is read), except on a CPU with one torch thread: there
  it is the process's CPU time, time.process_time, the rule `duodiff sample` times with
  (duodiff.sample.setup.timing_clock). Time slices the kernel gives to other processes are then not
  counted: on the 2-core development machine, busy with other work (load average 3-5), the wall
  clock put full_steps20 anywhere from 1.70x to 2.18x (2.00x of work) where the CPU clock gave
  1.99x to 2.03x (benchmarks/README.md, "Timing the sets alone"). Several threads keep the wall
  clock: their CPU time would count threads spinning at barriers.
- The speed-up of a set in round r is t_baseline(r) / t_set(r); timing.json reports its median
  over the rounds with a distribution-free 95% interval for the median from order statistics
  (binomial ranks, duodiff.timing.intervals: exact coverage, recorded; at least 6 rounds reach
  95%), and the median images/s (batch size / the median seconds per pass).

torch runs `--threads` CPU threads (torch.set_num_threads), whatever OMP_NUM_THREADS says.
"""

from __future__ import annotations

import inspect
import platform
import time
from pathlib import Path

import torch

from duodiff.core.distributed import default_device
from duodiff.core.errors import DuodiffError, check_int, is_int, is_number, require
from duodiff.core.flags import add_flag
from duodiff.core.guidance import label_classes, set_null_label
from duodiff.core.io import read_json, write_csv, write_json
from duodiff.core.study import CUDA_ONLY_PRECISIONS, METHODS, PRECISIONS, SAMPLERS
from duodiff.sample.policies import cache_settings, make_denoiser
from duodiff.sample.setup import check_device, load_models, precision_context, synchronize, timing_clock
from duodiff.timing.intervals import interval_ranks, median, median_interval

CONFIDENCE = 0.95
INTERVAL_METHOD = (
    "distribution-free interval for the median speed-up over the rounds from order statistics "
    "(binomial ranks): [x_(k), x_(n+1-k)] of the n sorted per-round speed-ups, the narrowest with "
    "coverage 1 - 2 P(Binomial(n, 1/2) <= k - 1) >= confidence; [min, max] when no k reaches it (n <= 5)"
)
WARMUP_ROUNDS = 1
CSV_COLUMNS = [
    "set", "method", "setting", "sampler", "steps", "speedup", "speedup_ci_low", "speedup_ci_high",
    "images_per_s", "seconds_per_batch", "rounds", "batch_size", "threads", "device_name", "clock",
]  # fmt: skip


# ---- the one check pass ------------------------------------------------------------------------


def read_stats(folder: Path) -> dict:
    """A sample set's stats.json, checked as far as timing it needs, without loading a model."""
    path = folder / "stats.json"
    require(path.is_file(), f"--samples {folder}: no stats.json there (an unfinished sample set?)")
    try:
        stats = read_json(path)
    except (OSError, ValueError) as error:
        raise DuodiffError(f"{path}: unreadable ({error})") from None
    require(isinstance(stats, dict), f"{path}: not a sample set's stats.json")
    method = stats.get("method")
    require(
        method in METHODS,
        f"--samples {folder}: method {method!r} in stats.json is not a sampling method ({', '.join(METHODS)}); "
        "a set of real images has nothing to time",
    )
    sampler = stats.get("sampler")
    require(sampler in SAMPLERS, f"{path}: sampler must be one of {', '.join(SAMPLERS)}; got {sampler!r}")
    steps = stats.get("steps")
    require(is_int(steps) and steps > 0, f"{path}: steps must be a positive integer; got {steps!r}")
    require(stats.get("precision", "fp32") in PRECISIONS, f"{path}: precision must be one of {', '.join(PRECISIONS)}")
    for key in ("checkpoint",) + (("checkpoint_late",) if method == "duodiff" else ()):
        require(bool(stats.get(key)), f"{path}: {key} is missing")
        require(Path(stats[key]).is_file(), f"{path}: {key} {stats[key]} does not exist")
    # cache sets, and DuoDiff sets whose full-model phase is cached
    for key in ("cache_interval", "cache_keep") if method == "cache" or "cache_interval" in stats else ():
        require(is_int(stats.get(key)) and stats[key] > 0, f"{path}: {key} must be a positive integer; got {stats.get(key)!r}")
    if method == "l2c":  # the router file it was sampled with, rebuilt from it (make_denoiser)
        require(bool(stats.get("router")) and Path(stats["router"]).is_file(), f"{path}: router {stats.get('router')!r} does not exist")
        threshold = stats.get("router_threshold")
        require(is_number(threshold) and 0 <= threshold <= 1, f"{path}: router_threshold must be in [0, 1]; got {threshold!r}")
    return stats


def check_time_args(*, samples, baseline, rounds, batch_size, threads, seed, device) -> tuple[torch.device, dict]:
    """Every rule on the arguments and the sets' stats.json, once, before any model is loaded;
    -> (the device, {set name: (folder, stats)} in the order given)."""
    check_int("--rounds", rounds, 1)
    check_int("--batch-size", batch_size, 1)
    check_int("--threads", threads, 1)
    check_int("--seed", seed, 0)
    require(bool(samples), "--samples needs at least one sample set folder")
    folders = [Path(folder) for folder in samples]
    names = [folder.resolve().name for folder in folders]
    repeated = sorted({name for name in names if names.count(name) > 1})
    require(
        not repeated, f"--samples names more than one set called {', '.join(repeated)}; a set is named by its folder"
    )
    require(
        baseline in names,
        f"--baseline {baseline} is not among the sets (--samples names {', '.join(names)}); "
        "the speed-ups are relative to it, so it must be timed in every round",
    )
    dev = check_device(device or default_device())
    sets = {}
    for name, folder in zip(names, folders):
        stats = read_stats(folder)
        precision = stats.get("precision", "fp32")
        require(
            dev.type == "cuda" or precision not in CUDA_ONLY_PRECISIONS,
            f"--samples {folder} was sampled at precision {precision}, which needs --device cuda",
        )
        sets[name] = (folder, stats)
    return dev, sets


# ---- the sets, rebuilt --------------------------------------------------------------------------


def caching_loader():
    """A load_model that loads each (checkpoint, EMA choice) once and hands out the same model."""
    from duodiff.models.checkpoints import load_model

    loaded = {}

    def load(path, use_ema=True, device="cpu"):
        key = (str(Path(path).resolve()), bool(use_ema), str(device))
        if key not in loaded:
            loaded[key] = load_model(path, use_ema=use_ema, device=device)
        return loaded[key]

    return load


def main_model(models: dict):
    """The set's main model: the only one, or DuoDiff's shallow model (sample_set.main_value)."""
    return models.get("model", models.get("shallow"))


def set_runner(stats: dict, models: dict, diffusion, null, noise, y, seed: int, device):
    """One pass of the set: its whole sampling loop on the fixed batch, as `duodiff sample` runs a
    batch (sample_set.sample_batch), returning once the device has finished it."""
    method, threshold, t_switch = stats["method"], stats.get("threshold"), stats.get("t_switch")
    guidance_scale, precision = float(stats.get("guidance_scale", 0.0)), stats.get("precision", "fp32")
    sampler, steps, eta = stats["sampler"], stats["steps"], float(stats.get("eta", 0.0))
    clip_denoised = stats.get("autoencoder") is None  # latents are not bounded (sample_batch)

    def run() -> None:
        generator = torch.Generator().manual_seed(seed)  # the sampler's own noise: the same every pass
        denoiser = make_denoiser(method, models, threshold, t_switch, y, guidance_scale, null, cache_settings(stats))
        with torch.inference_mode(), precision_context(precision, device):
            diffusion.sample(denoiser, noise, sampler, steps, eta=eta, generator=generator, clip_denoised=clip_denoised)
        synchronize(device)

    return run


def build_runners(sets: dict, batch_size: int, seed: int, device) -> dict:
    """{set name: its pass} for every set, the models loaded once each (caching_loader)."""
    load = caching_loader()
    loaded, shapes = {}, {}
    for name, (folder, stats) in sets.items():
        method = stats["method"]
        late = stats.get("checkpoint_late") if method == "duodiff" else None
        # The set was sampled, so its pair of models was accepted then: no swapped-paths check again.
        models, diffusion, metas = load_models(method, stats["checkpoint"], late, stats.get("use_ema", True), device,
                                               allow_deeper_shallow=True, load=load)  # fmt: skip
        for model in models.values():
            model.eval()
        null = set_null_label(float(stats.get("guidance_scale", 0.0)), models, metas)
        config = main_model(models).config
        loaded[name] = (stats, models, diffusion, null)
        shapes[name] = (config.in_chans, config.img_size, config.num_classes)
    distinct = sorted(set(shapes.values()))
    require(
        len(distinct) == 1,
        "the sets' models differ in (channels, image size, classes): "
        + ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        + "; time the sets of one study together",
    )
    in_chans, img_size, num_classes = distinct[0]
    runners = {}
    for name, (stats, models, diffusion, null) in loaded.items():
        # Drawn on the CPU in sample_batch's order (noise, then labels from the real classes): the
        # noise is the same for every set.
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn((batch_size, in_chans, img_size, img_size), generator=generator).to(device)
        y = None
        if num_classes > 0:
            y = torch.randint(label_classes(num_classes, null), (batch_size,), generator=generator).to(device)
        runners[name] = set_runner(stats, models, diffusion, null, noise, y, seed, device)
    return runners


# ---- timing ---------------------------------------------------------------------------------------


def measure(runners: dict, rounds: int, clock, progress: bool = False) -> dict:
    """-> {name: [seconds of round 1, ..., round `rounds`]}.

    Warm-up: every runner once, untimed. Then `rounds` rounds, each running every runner once in
    the fixed order of `runners`, each call timed alone: clock() before and after it (a runner
    returns once its work is done: synchronised on CUDA)."""
    from tqdm import tqdm

    for run in runners.values():
        for _ in range(WARMUP_ROUNDS):
            run()
    seconds = {name: [] for name in runners}
    for _ in tqdm(range(rounds), desc="timing rounds", unit="round", disable=None if progress else True):
        for name, run in runners.items():
            started = clock()
            run()
            seconds[name].append(clock() - started)
    return seconds


def summarize(seconds: dict, baseline: str, batch_size: int) -> dict:
    """Per set: the per-round speed-ups against `baseline`, their median and its interval, and the
    median seconds per pass and images/s."""
    for name, times in seconds.items():
        require(all(t > 0 for t in times), f"the clock measured a pass of {name} as {min(times)} s; it must advance")
    base = seconds[baseline]
    result = {}
    for name, times in seconds.items():
        speedups = [b / t for b, t in zip(base, times)]
        interval = median_interval(speedups, CONFIDENCE)
        per_batch = median(times)
        result[name] = {
            "speedup": interval["median"],
            "speedup_ci_low": interval["low"],
            "speedup_ci_high": interval["high"],
            "images_per_s": batch_size / per_batch,
            "seconds_per_batch": per_batch,
            "seconds": list(times),
            "speedups": speedups,
        }
    return result


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model as /proc/cpuinfo gives it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def default_clock(device: torch.device):
    """The command's clock, chosen once torch's thread count is set (timing_clock's rule): the
    process's CPU time on a CPU with one torch thread, else the wall clock."""
    return time.process_time if timing_clock(device) == "cpu" else time.perf_counter


def clock_name(clock) -> str:
    module, name = getattr(clock, "__module__", None), getattr(clock, "__qualname__", None)
    return f"{module}.{name}" if module and name else repr(clock)


# ---- the command ----------------------------------------------------------------------------------


def run_time(*, samples, baseline, output_dir, rounds, batch_size, threads, seed, device, progress, clock) -> dict:
    """Time every set of `samples` alone, interleaved in rounds, against the `baseline` set ->
    output_dir/timing.json and timing.csv (docs/architecture.md, "Timing files"). `clock`: a
    monotonic clock in seconds, or None for the command's choice (default_clock: the process's
    CPU time on a CPU with one torch thread, time.perf_counter otherwise)."""
    dev, sets = check_time_args(samples=samples, baseline=baseline, rounds=rounds, batch_size=batch_size,
                                threads=threads, seed=seed, device=device)  # fmt: skip
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    clock = clock if clock is not None else default_clock(dev)
    try:
        started = time.perf_counter()
        runners = build_runners(sets, batch_size, seed, dev)
        seconds = measure(runners, rounds, clock, progress)
        elapsed = time.perf_counter() - started
    finally:
        torch.set_num_threads(previous_threads)
    measured = summarize(seconds, baseline, batch_size)
    k_low, k_high, coverage = interval_ranks(rounds, CONFIDENCE)
    settings = {
        "baseline": baseline,
        "rounds": rounds,
        "warmup_rounds": WARMUP_ROUNDS,
        "batch_size": batch_size,
        "threads": threads,
        "seed": seed,
        "device": str(dev),
        "device_name": device_name(dev),
        "torch_version": torch.__version__,
        "clock": clock_name(clock),
        "order": list(sets),
        "confidence": CONFIDENCE,
        "interval_method": INTERVAL_METHOD,
        "interval_ranks": [k_low, k_high],
        "interval_coverage": coverage,
        "elapsed_s": elapsed,
    }
    result = {"format": "duodiff-timing", "version": 1, **settings, "sets": {}}
    for name, (folder, stats) in sets.items():
        result["sets"][name] = {
            "samples": str(folder),
            **{key: stats.get(key) for key in ("method", "setting", "sampler", "steps", "precision", "guidance_scale")},
            **measured[name],
        }
    output_dir = Path(output_dir)
    write_json(output_dir / "timing.json", result)
    rows = [{"set": name, **entry, **settings} for name, entry in result["sets"].items()]
    rows = [{key: row[key] for key in CSV_COLUMNS} for row in rows]
    write_csv(output_dir / "timing.csv", rows, CSV_COLUMNS)
    return result


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "time",
        help="time every sample set alone, interleaved in rounds: the measured speed-ups",
        description="Rebuild each sample set's sampling policy from its stats.json and time it on one fixed "
        "noise batch: one untimed warm-up pass of every set, then --rounds rounds of every set once in a fixed "
        "order. Writes OUT/timing.json and OUT/timing.csv: per set the median speed-up over the rounds "
        "against --baseline with its 95% interval, and the median images/s.",
    )
    add_flag(parser, "--samples", required=True, nargs="+", help="sample set folders (each with its stats.json)")
    add_flag(parser, "--baseline", default="full",
             help="the set the speed-ups are relative to (a folder name of --samples)")  # fmt: skip
    add_flag(parser, "--output-dir", required=True, help="folder for timing.json and timing.csv")
    add_flag(parser, "--rounds", type=int, default=6,
             help="timed rounds, every set once per round (>= 6 for a 95%% interval of the median)")  # fmt: skip
    add_flag(parser, "--batch-size", type=int, default=64, help="images per timed pass (one fixed noise batch)")
    add_flag(parser, "--threads", type=int, default=1,
             help="torch CPU threads (torch.set_num_threads); with 1 on a CPU the passes are timed in "
             "the process's CPU time")  # fmt: skip
    add_flag(parser, "--seed", type=int, default=0, help="seed of the noise batch, its labels and the sampler's noise")
    add_flag(parser, "--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    add_flag(parser, "--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.set_defaults(func=_main)


def _main(args) -> None:
    # Every argument of run_time but the clock is a flag of the same name (the flags hold the
    # defaults); the clock is the command's own choice (default_clock).
    names = [name for name in inspect.signature(run_time).parameters if name != "clock"]
    run_time(**{name: getattr(args, name) for name in names}, clock=None)
