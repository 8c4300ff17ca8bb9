"""The check pass of `duodiff train`: every argument checked once, at the edge, before any work.

`check_train_args` is called once per process, by run_train (and by the CLI before it relaunches
itself under torchrun); it raises DuodiffError naming the bad value and what is allowed, and
resolves the arguments into a TrainPlan. The layers below it (build_model, the models, the
diffusion) trust what it passed on. The checks that need a file or the data (a resumed
checkpoint's settings, the dataset's shape) are here too, called where those are read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from duodiff.core import distributed
from duodiff.core.config import load_yaml
from duodiff.core.data import CHANNELS, DATASETS, NUM_CLASSES, dataset_digest
from duodiff.core.diffusion import LOSS_WEIGHTINGS, RECIPE_KEYS, GaussianDiffusion
from duodiff.core.errors import check_choice, check_int, check_number, require
from duodiff.core.fingerprint import check_state, fingerprint
from duodiff.core.guidance import check_class_count, check_label_dropout
from duodiff.models import CLASSIFIER_TYPES, EARLY_EXIT_KEYS, KIND_ALIASES, MODEL_KINDS, UViTConfig, checkpoints
from duodiff.models.early_exit import PROBE_HEADS

# The arguments a resumed run must share with its checkpoint: what it computes. The others say
# where things are and how often the run reports.
COMPUTING_ARGS = (
    "n_steps", "batch_size", "lr", "weight_decay", "beta1", "beta2", "warmup_steps", "grad_clip",
    "ema_decay", "use_amp", "seed", "classifier_type", "freeze_backbone", "use_unweighted_loss",
)  # fmt: skip


@dataclass(frozen=True)
class TrainPlan:
    """The checked and resolved arguments: everything a run needs besides the data."""

    kind: str  # uvit | early_exit (aliases resolved)
    model_config: dict  # the model YAML as the user wrote it (stored in model.pt)
    config: UViTConfig
    diffusion: GaussianDiffusion
    image_size: int
    device: str  # cpu | cuda
    settings: dict  # what a resumed checkpoint must match
    train_args: dict  # every argument, as model.pt and checkpoint.pt record them
    backbone_state: dict | None  # --load-backbone's weights
    fingerprint: dict  # settings + the sha256 of the backbone and latents files (core/fingerprint.py);
    # the training images' digest is added once they are loaded (with_dataset_digest)


def check_train_args(args: dict, world_size: int) -> TrainPlan:
    """Check every argument of run_train (DuodiffError naming the value and what is allowed) and
    resolve them; world_size: the number of training processes."""
    check_choice("--model", args["model"], [*MODEL_KINDS, *KIND_ALIASES])
    kind = KIND_ALIASES.get(args["model"], args["model"])
    require(args["config_path"] is not None, "--config-path is required (a model YAML such as config/models/digits.yaml)")
    require(args["log_path"] is not None, "--log-path is required (the folder for model.pt, loss.csv, checkpoint.pt)")
    require(not Path(args["log_path"]).is_file(), f"--log-path {args['log_path']} is a file; it must be a folder")
    check_choice("--dataset", args["dataset"], DATASETS)
    _check_optimization(args, world_size)
    device = args["device"] or distributed.default_device()
    check_choice("--device", device, ("cpu", "cuda"))
    require(device == "cpu" or torch.cuda.is_available(), "--device cuda: no CUDA device is available; use --device cpu")
    diffusion = GaussianDiffusion(
        args["num_timesteps"], args["beta_start"], args["beta_end"], args["parametrization"], args["beta_schedule"],
        **{k: args[k] for k in RECIPE_KEYS},
    )
    _check_early_exit_flags(args, kind)

    model_config = load_yaml(args["config_path"])  # stored in model.pt as the user wrote it
    config = UViTConfig.from_dict(model_config, source=str(args["config_path"]))
    latents_fingerprint = None
    if args["latents"] is not None:
        image_size, latents_fingerprint = check_latents(args, config)
    else:
        image_size = _check_image_and_dataset(args, config)
    if kind == "early_exit" and args["classifier_type"] == "attention_probe" and config.probe_design == "duodiff":
        require(
            config.probe_hidden % PROBE_HEADS == 0,
            f"{args['config_path']}: probe_hidden ({config.probe_hidden}) must be divisible by the attention probe's "
            f"heads ({PROBE_HEADS})",
        )
    backbone_state = None
    if args["load_backbone"] is not None:
        backbone_state = read_backbone(args["load_backbone"], config, diffusion, args["config_path"])

    settings = {
        "model": kind, "model_config": config.to_dict(), "dataset": args["dataset"], "image_size": image_size,
        "diffusion": diffusion.config(), **{k: args[k] for k in COMPUTING_ARGS},
        # Settings added later enter only when they differ from the old behaviour, so checkpoints
        # written before them still resume.
        **({"loss_weighting": args["loss_weighting"], "min_snr_gamma": args["min_snr_gamma"]}
           if args["loss_weighting"] != "uniform" else {}),
        **({"label_dropout": args["label_dropout"]} if args["label_dropout"] != 0 else {}),
        # What the latents were encoded with, not where the file lies: a moved file still resumes.
        **({"latents": latents_fingerprint} if latents_fingerprint is not None else {}),
    }  # fmt: skip
    # --restart says what to do with old state, nothing about the model: model.pt's bytes do not depend on it.
    train_args = {k: (str(v) if isinstance(v, Path) else v) for k, v in args.items() if k != "restart"}
    train_args.update(model=kind, image_size=image_size, device=device, world_size=world_size)
    if latents_fingerprint is not None:  # `duodiff sample` checks its --autoencoder against it
        train_args["latents_fingerprint"] = latents_fingerprint
    return TrainPlan(kind, model_config, config, diffusion, image_size, device, settings, train_args, backbone_state,
                     fingerprint(_input_files(args), settings))


def _input_files(args: dict) -> dict:
    # The backbone and the latents by their bytes, not their paths: a full model retrained in place
    # (same path, same step) must not be resumed over, a moved but equal file may be.
    return {"backbone weights": args["load_backbone"], "latents": args["latents"]}


def with_dataset_digest(plan: TrainPlan, data) -> TrainPlan:
    """The plan with the loaded training images in its fingerprint ("dataset images",
    core/data.dataset_digest): known only once the data is read, after the check pass. Training
    on --latents needs none: the latents file is hashed whole."""
    digests = {"dataset images": dataset_digest(data)}
    return replace(plan, fingerprint=fingerprint(_input_files(plan.train_args), plan.settings, digests))


def _check_optimization(args: dict, world_size: int) -> None:
    """Step counts, optimizer, EMA and loss weighting; the global batch splits evenly across ranks."""
    for name in ("n_steps", "batch_size", "log_every_n_steps", "save_every_n_steps"):
        check_int(f"--{name.replace('_', '-')}", args[name], 1)
    for name in ("warmup_steps", "num_workers", "seed"):
        check_int(f"--{name.replace('_', '-')}", args[name], 0)
    check_number("--lr", args["lr"], 0, math.inf, low_open=True, high_open=True)
    check_number("--weight-decay", args["weight_decay"], 0, math.inf, high_open=True)
    check_number("--beta1", args["beta1"], 0, 1, high_open=True)
    check_number("--beta2", args["beta2"], 0, 1, high_open=True)
    check_number("--grad-clip", args["grad_clip"], 0, math.inf, high_open=True)
    check_number("--ema-decay", args["ema_decay"], 0, 1, high_open=True)
    check_choice("--loss-weighting", args["loss_weighting"], LOSS_WEIGHTINGS)
    check_number("--min-snr-gamma", args["min_snr_gamma"], 0, math.inf, low_open=True, high_open=True)
    require(
        args["batch_size"] % world_size == 0,
        f"--batch-size {args['batch_size']} must be divisible by the number of processes ({world_size}); "
        "it is the global batch, split evenly across ranks",
    )


def _check_early_exit_flags(args: dict, kind: str) -> None:
    if kind == "early_exit":
        require(
            args["classifier_type"] is not None,
            f"--model {args['model']} needs --classifier-type (one of {', '.join(CLASSIFIER_TYPES)})",
        )
        check_choice("--classifier-type", args["classifier_type"], CLASSIFIER_TYPES)
        require(not args["freeze_backbone"] or args["load_backbone"], "--freeze-backbone needs --load-backbone (a trained U-ViT model.pt)")
        return
    for flag in ("classifier_type", "load_backbone"):
        require(args[flag] is None, f"--{flag.replace('_', '-')} applies to --model early_exit only")
    for flag in ("freeze_backbone", "use_unweighted_loss"):
        require(not args[flag], f"--{flag.replace('_', '-')} applies to --model early_exit only")


def _check_image_and_dataset(args: dict, config: UViTConfig) -> int:
    """The image size (default: the config's img_size), which the dataset's channels and class
    count must fit -> the image size."""
    image_size = args["image_size"] if args["image_size"] is not None else config.img_size
    check_int("--image-size", image_size, 1)
    require(
        image_size == config.img_size,
        f"--image-size {image_size} does not match img_size {config.img_size} in {args['config_path']}",
    )
    dataset, config_path = args["dataset"], args["config_path"]
    require(
        CHANNELS[dataset] == config.in_chans,
        f"--dataset {dataset} has {CHANNELS[dataset]} channel(s) but {config_path} has in_chans {config.in_chans}",
    )
    check_label_dropout(args["label_dropout"], config.num_classes, config_path)
    if NUM_CLASSES[dataset] is not None:
        check_class_count(config.num_classes, NUM_CLASSES[dataset], args["label_dropout"], config_path, dataset)
    return image_size


def check_latents(args: dict, config: UViTConfig) -> tuple[int, dict]:
    """--latents (a `duodiff encode` file) against the model and the dataset flags -> (the latent
    side, the fingerprint `encode` stored). The model works on the latents: its in_chans and
    img_size must be theirs; --dataset and --image-size name the images they were encoded from."""
    from duodiff.core.latent import read_latents_info

    path, config_path = args["latents"], args["config_path"]
    shape, fingerprint = read_latents_info(path)
    _, channels, height, width = shape
    require(
        (config.in_chans, config.img_size, config.img_size) == (channels, height, width),
        f"--latents {path} holds {channels}x{height}x{width} latents but {config_path} has in_chans "
        f"{config.in_chans}, img_size {config.img_size}; use a model config for the autoencoder's latents "
        f"(in_chans {channels}, img_size {height})",
    )
    require(
        fingerprint.get("dataset") == args["dataset"],
        f"--latents {path} was encoded from --dataset {fingerprint.get('dataset')}, not {args['dataset']}",
    )
    require(
        args["image_size"] is None or args["image_size"] == fingerprint.get("image_size"),
        f"--latents {path} was encoded from {fingerprint.get('image_size')}-pixel images, not --image-size {args['image_size']}",
    )
    check_batch_fits(args["batch_size"], shape[0], f"the {shape[0]} latents in --latents {path}")
    return height, fingerprint


def check_batch_fits(batch_size: int, n_items: int, items: str) -> None:
    """The global batch (--batch-size, split across torchrun's ranks) at most the training set
    (`items`, its n_items described): a larger one would hold some images twice in every step."""
    require(
        batch_size <= n_items,
        f"--batch-size {batch_size} is more than {items}; --batch-size is the global batch (all ranks together) and "
        f"must be at most the training set's size, {n_items}",
    )


def check_processes(kwargs: dict, nproc: int) -> None:
    """What must hold before N training processes start: the usual arguments, and one GPU each."""
    check_train_args(dict(kwargs), nproc)
    device = kwargs["device"] or distributed.default_device()
    if device == "cuda":
        available = torch.cuda.device_count()
        require(nproc <= available, f"--nproc-per-node {nproc} needs {nproc} GPUs, but {available} are visible")


def read_backbone(path, config, diffusion, config_path) -> dict:
    """The weights of a trained U-ViT model.pt (EMA if it has them) after checking it fits the
    run's UViTConfig `config`."""
    obj = checkpoints.load_model_file(path)
    require(obj["kind"] == "uvit", f"--load-backbone {path}: expected a U-ViT model (kind uvit), found kind {obj['kind']!r}")
    theirs, ours = UViTConfig.from_dict(obj["model_config"], source=str(path)).to_dict(), config.to_dict()
    # The probe settings belong to the early-exit part, not the backbone.
    differing = [k for k in ours if k not in EARLY_EXIT_KEYS and theirs[k] != ours[k]]
    require(
        not differing,
        f"--load-backbone {path} was trained with a different model config than {config_path}: "
        + ", ".join(f"{k} {theirs[k]!r} vs {ours[k]!r}" for k in differing),
    )
    # Both sides as GaussianDiffusion states them (a linear schedule is left out of config()).
    theirs, ours = GaussianDiffusion(**obj["diffusion"]).config(), diffusion.config()
    differing = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    require(
        not differing,
        f"--load-backbone {path} was trained with different diffusion settings: "
        + ", ".join(f"--{k.replace('_', '-')} {theirs.get(k, 'linear')!r} vs {ours.get(k, 'linear')!r}" for k in differing),
    )
    return obj["ema_state_dict"] if obj["ema_state_dict"] is not None else obj["state_dict"]


def check_checkpoint(checkpoint: dict, current: dict, path, restart: bool, discard) -> bool:
    """True when checkpoint.pt at `path` was made from the run's inputs and settings (TrainPlan.
    fingerprint): resume it. Otherwise refused in one line naming what changed, or with `restart`
    discarded (core/fingerprint.check_state) -> False."""
    stored = checkpoint.get("fingerprint")
    if stored is None and isinstance(checkpoint.get("settings"), dict):
        # Written before fingerprints: its settings (the backbone then by path only), no files.
        stored = {"files": {}, "settings": {k: v for k, v in checkpoint["settings"].items() if k != "load_backbone"}}
    if isinstance(stored, dict) and "label_dropout" in stored.get("settings", {}) and "label_dropout" not in current["settings"]:
        # Entered only when set: a run without it differs too.
        current = {**current, "settings": {**current["settings"], "label_dropout": 0.0}}
    return check_state(stored, current, f"{path}", restart, discard)


def check_data_fits(data, config, config_path, label_dropout=0.0, batch_size=None) -> None:
    """The loaded training data against the run's UViTConfig `config` (imagefolder: its shape
    and class count are known only once read; with label dropout, num_classes counts the null class)
    and against the global batch_size (the dataset's size is known only once read)."""
    require(
        config.img_size == data.image_size and config.in_chans == data.channels,
        f"--dataset {data.name} gives {data.channels}x{data.image_size}x{data.image_size} images but "
        f"{config_path} expects in_chans {config.in_chans}, img_size {config.img_size}",
    )
    check_class_count(config.num_classes, data.num_classes, label_dropout, config_path, data.name)
    if batch_size is not None:
        check_batch_fits(batch_size, len(data), f"the {len(data)} training images of --dataset {data.name}")
