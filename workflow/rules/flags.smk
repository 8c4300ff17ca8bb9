# The translation of config blocks into `duodiff` flags: each rule's params (the `flags` of the
# rule files). A changed setting changes the flags, so the params rerun trigger reruns the jobs
# that use it, and only those.

import shlex


def cli_flags(settings: dict) -> str:
    """{'n_steps': 10, 'use_amp': True, 'root': None} -> '--n-steps 10 --use-amp'.

    Config keys are named like the `duodiff` flags, so each setting reaches the command under
    its own name; true booleans become switches, false ones and None are left out. Flags come
    sorted by name: the string is a rule's params, and the same settings written in another
    order in the YAML must not look like a change (that would retrain everything)."""
    parts = []
    for key, value in sorted(settings.items()):
        flag = f"--{key.replace('_', '-')}"
        if value is None or value is False:
            continue
        if value is True:
            parts.append(flag)
        else:
            parts.append(f"{flag} {shlex.quote(str(value))}")
    return " ".join(parts)


def dataset_flags() -> str:
    dataset = config["dataset"]
    return cli_flags(
        {
            "dataset": dataset["name"],
            "data_root": dataset["root"],
            "download": dataset["download"],
            "image_size": dataset["image_size"],
        }
    )


def diffusion_flags() -> str:
    """The diffusion block; the linear schedule, the discrete process, the index time input and the
    VP-SDE's default betas, `duodiff`'s defaults and the only recipe before the keys existed, are
    left out, so those jobs keep their params (no rerun)."""
    defaults = {
        "beta_schedule": "linear",
        "noise_process": "discrete",
        "time_input": "index",
        "sde_beta_min": 0.1,
        "sde_beta_max": 20.0,
    }
    return cli_flags({k: v for k, v in config["diffusion"].items() if not (k in defaults and v == defaults[k])})


def unless_zero(settings: dict, *keys) -> dict:
    """`settings` without `keys` whose value is 0, the command's default and the behaviour before
    these keys existed: jobs run before them keep their params (no rerun)."""
    return {key: value for key, value in settings.items() if not (key in keys and value == 0)}


def train_flags(stage: str):
    """Every `duodiff train` setting of train.<stage>, plus dataset, diffusion and device; in
    latent diffusion also --latents, the rule's input (so a function of the job's input)."""
    flags = " ".join(
        [
            dataset_flags(),
            diffusion_flags(),
            cli_flags(unless_zero(config["train"][stage], "label_dropout")),
            cli_flags({"device": config["device"]}),
        ]
    )
    if config["autoencoder"]["path"] is None:
        return flags
    return lambda wildcards, input: f"{flags} --latents {shlex.quote(input.latents)}"


def autoencoder_flags() -> str:
    """The decoder of `duodiff sample` (and the encoder of `duodiff encode`); empty in pixel space."""
    autoencoder = config["autoencoder"]
    if autoencoder["path"] is None:
        return ""
    return cli_flags(
        {
            "autoencoder": autoencoder["path"],
            "autoencoder_config": autoencoder["config"],
            "scale_factor": autoencoder["scale_factor"],
        }
    )


def encode_flags() -> str:
    settings = {"batch_size": config["autoencoder"]["batch_size"], "device": config["device"]}
    return " ".join([dataset_flags(), autoencoder_flags(), cli_flags(settings)])


def router_flags() -> str:
    """`duodiff train-router`'s settings: config `learning_to_cache` (all but thresholds) and the
    sampling grid the router is for (sampler, steps, eta, guidance scale, EMA), plus device."""
    sampling = config["sampling"]
    settings = {key: value for key, value in config["learning_to_cache"].items() if key != "thresholds"}
    settings.update({key: sampling[key] for key in ("sampler", "steps", "eta")})
    settings.update(no_ema=not sampling["use_ema"], device=config["device"], guidance_scale=sampling["guidance_scale"])
    return cli_flags(unless_zero(settings, "guidance_scale"))


def sampling_flags(steps=None) -> str:
    """The `duodiff sample` settings of config `sampling`; `steps` overrides its steps (fewer steps)."""
    sampling = config["sampling"]
    settings = {
        key: sampling[key] for key in ("sampler", "steps", "eta", "n_samples", "batch_size", "seed", "precision")
    }
    if steps is not None:
        settings["steps"] = steps
    settings["no_ema"] = not sampling["use_ema"]
    settings["device"] = config["device"]
    settings["guidance_scale"] = sampling["guidance_scale"]
    # Pixel-space, unguided sets keep the exact flags they had before these keys existed (no rerun).
    return " ".join(
        flags for flags in (cli_flags(unless_zero(settings, "guidance_scale")), autoencoder_flags()) if flags
    )


def fid_mode_settings() -> dict:
    """metrics.fid.mode and legacy_weights. Mode clean, `duodiff`'s default, is left out, so the
    jobs of results made before modes existed keep their params and do not rerun."""
    fid = config["metrics"]["fid"]
    return {"mode": None if fid["mode"] == "clean" else fid["mode"], "legacy_weights": fid["legacy_weights"]}


def reference_flags() -> str:
    metrics = config["metrics"]
    settings = {
        "n_reference": config["reference"]["n_reference"],
        "split_seed": config["reference"]["split_seed"],
        "max_reference": metrics["fid"]["max_reference"],
        "statistics": config["reference"]["statistics"],
        "batch_size": metrics["fid"]["batch_size"],
        "feature_network": metrics["feature_network"],
        "num_workers": metrics["num_workers"],
        "device": config["device"],
        **fid_mode_settings(),
    }
    return " ".join([dataset_flags(), cli_flags(settings)])


def score_flags() -> str:
    """`duodiff score`: metrics.fid's settings (max_samples is Inception's budget, which `duodiff
    score` gives Inception only; max_reference is the reference's, reference_flags)."""
    metrics = config["metrics"]
    settings = {key: value for key, value in metrics["fid"].items() if key != "max_reference"}
    settings.update(fid_mode_settings())
    settings["no_intervals"] = not metrics["intervals"]
    return cli_flags({**settings, "num_workers": metrics["num_workers"], "device": config["device"]})


def feature_net_flags() -> str:
    return " ".join([dataset_flags(), cli_flags(config["metrics"]["classifier"])])


def real_set_flags() -> str:
    reference = config["reference"]
    return " ".join(
        [
            dataset_flags(),
            cli_flags(
                {
                    "n_reference": reference["n_reference"],
                    "n_images": reference["n_real"],
                    "split_seed": reference["split_seed"],
                    "mode": fid_mode_settings()["mode"],
                }
            ),
        ]
    )


def cmmd_flags() -> str:
    settings = {key: value for key, value in config["metrics"]["cmmd"].items() if key != "enabled"}
    return cli_flags({**settings, "device": config["device"]})


def convert_flags() -> str:
    """The diffusion settings stored in model.pt, the dataset the model is recorded under and the
    label dropout it was published with (train.full.label_dropout: its null class, for guidance)."""
    recorded = {"dataset": config["dataset"]["name"], "label_dropout": config["train"]["full"].get("label_dropout", 0)}
    # A latent checkpoint records its autoencoder and scale (the rule's input autoencoder), so
    # sampling decodes through the same; its channels are the autoencoder's, not the dataset's.
    autoencoder = config["autoencoder"]
    latent = (
        {"autoencoder": autoencoder["path"], "scale_factor": autoencoder["scale_factor"]} if autoencoder["path"] else {}
    )
    return " ".join([diffusion_flags(), cli_flags(unless_zero(recorded, "label_dropout")), cli_flags(latent)])


def timing_flags() -> str:
    """`duodiff time`: the timing block and the device (the torch thread count is timing.threads,
    not the job's threads)."""
    return cli_flags({**config["timing"], "device": config["device"]})
