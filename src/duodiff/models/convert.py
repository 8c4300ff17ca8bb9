"""`duodiff convert`: a published U-ViT checkpoint (Bao et al., baofff/U-ViT) -> this project's model.pt.

What U-ViT releases, and what this reads:
- a plain state dict (`cifar10_uvit_small.pth`, ..., the `nnet_ema` weights the papers evaluate);
- a dict holding one under 'nnet_ema';
- a training checkpoint folder `<step>.ckpt/` as U-ViT's TrainState.save writes it
  (nnet.pth, nnet_ema.pth, step.pth, ...): nnet_ema.pth is read, step.pth gives the step.

Parameter names: our U-ViT (duodiff.models.uvit) keeps libs/uvit.py's module names and layouts
(patch_embed.proj, time_embed.0/.2, label_emb, pos_embed, in_blocks.<i>, mid_block,
out_blocks.<i>.skip_linear, norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2, norm, decoder_pred,
final_layer), so the map is the identity; its dropouts and timm's Mlp.drop hold no parameters.
Every key and shape is still checked against the model the model YAML builds, and a mismatch is
one DuodiffError naming the file, the first bad keys and the shapes expected.

Time conditioning. U-ViT's pixel-space models are trained on the continuous VP-SDE of its sde.py,
VPSDE(beta_min=0.1, beta_max=20) on t in [0, 1], with

    abar(t) = exp(-(beta_min t + (beta_max - beta_min) t^2 / 2))   (cum_alpha: E[x_t|x_0] = sqrt(abar) x_0),

and the network sees `t * 999` (ScoreModel.predict). Our sampler feeds the integer step k of a
discrete schedule to the network as it is (normalize_timesteps: false), so the converted network
at step k is the U-ViT network at t = k / 999: the map is fixed by the network's input, not
chosen. It fits a 1,000-step schedule exactly (k = 0..999 <-> t = 0..1), which is why the
conversion requires num_timesteps 1000. The discrete linear schedule 1e-4 -> 0.02 is the VP-SDE
sampled with beta_k = beta(k / 999) / 1000 (Song et al. 2011.13456, Appendix B), and
log abar_k = sum_{i<=k} log(1 - beta_i) differs from log abar(k / 999) = -integral in two ways:
the sum's first term (abar_0 = 1 - 1e-4: noise of std 0.01 where t = 0 has none), which dominates
sqrt(1 - abar) at small k, and log(1 - beta) ~ -beta - beta^2 / 2, whose second-order terms add up
to about 0.067 at k = 999, so that sqrt(abar) is 3.4% lower there; in between the two agree closely.
`compare_alpha_bar` measures it; `duodiff convert` prints it and stores it in model.pt under
"converted_from".

That comparison means something only for that approximation: a pixel-space checkpoint on the
discrete process fed the 0-based index. The exact recipes need none: `--noise-process vp_sde
--time-input t_times_999` is U-ViT's continuous models' own (CIFAR-10, CelebA 64, ImageNet 64,
ImageNet 256 L/2), `--beta-schedule scaled_linear --time-input index_plus_one` its discrete latent
models' (ImageNet 256 and 512 H/2); and a latent checkpoint (`--autoencoder`) compared with the
pixel models' SDE would mean nothing. model.pt then stores the recipe instead.
"""

from __future__ import annotations

import math
import pickle
import zipfile
from pathlib import Path

import torch

from duodiff.core.config import load_yaml
from duodiff.core.diffusion import GaussianDiffusion, add_diffusion_recipe_flags
from duodiff.core.errors import DuodiffError, check_choice, require
from duodiff.core.flags import add_flag
from duodiff.models import checkpoints

# sde.py's ScoreModel.predict calls the network with t * 999: the network's time input for t = 1.
UVIT_TIME_SCALE = 999
# The names U-ViT's TrainState gives its EMA network: the key in a checkpoint dict and the file
# stem in a checkpoint folder (utils.py: torch.save(val.state_dict(), f'{key}.pth')).
EMA_KEY = "nnet_ema"
STEP_FILE = "step.pth"
SHOWN_KEYS = 5  # bad keys listed in an error message


def _torch_load(path: Path):
    try:
        # weights_only: a foreign file; U-ViT's hold only tensors, dicts and numbers.
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as error:
        raise DuodiffError(
            f"{path}: not a readable PyTorch file (truncated, corrupt or not a state dict?): {error}"
        ) from None


def read_uvit_checkpoint(path) -> tuple[dict, int | None, str]:
    """(state dict of tensors, training step or None, where in `path` the weights were) of a
    U-ViT checkpoint file or training checkpoint folder."""
    path = Path(path)
    step = None
    if path.is_dir():
        require(
            (path / f"{EMA_KEY}.pth").is_file(),
            f"{path}: a folder, but no {EMA_KEY}.pth in it (U-ViT's <step>.ckpt folders hold one)",
        )
        if (path / STEP_FILE).is_file():
            step = _torch_load(path / STEP_FILE)
        path, where = path / f"{EMA_KEY}.pth", f"{EMA_KEY}.pth of a checkpoint folder"
    else:
        require(path.is_file(), f"{path}: no such file or folder")
        where = "plain state dict"
    obj = _torch_load(path)
    if isinstance(obj, dict) and EMA_KEY in obj:
        step = obj.get("step", step)
        obj, where = obj[EMA_KEY], f"'{EMA_KEY}' entry of a dict"
    keys = f" with keys {', '.join(map(str, list(obj)[:SHOWN_KEYS]))}" if isinstance(obj, dict) else ""
    require(
        isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()),
        f"{path}: expected U-ViT weights (a state dict of tensors, or a dict with '{EMA_KEY}'); found {type(obj).__name__}{keys}",
    )
    return obj, (int(step) if isinstance(step, (int, torch.Tensor)) else None), where


def check_state_dict(state: dict, expected: dict, path, config_path) -> None:
    """Every key of `expected` (name -> tensor) in `state` with its shape, and nothing else;
    one DuodiffError listing the first missing, unexpected and misshapen keys otherwise."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshapen = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or misshapen):
        return

    def listed(keys, show):
        more = f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
        return ", ".join(show(k) for k in keys[:SHOWN_KEYS]) + more

    problems = []
    if missing:
        problems.append(f"missing {listed(missing, lambda k: f'{k} {tuple(expected[k].shape)}')}")
    if unexpected:
        problems.append(f"unexpected {listed(unexpected, lambda k: f'{k} {tuple(state[k].shape)}')}")
    if misshapen:
        problems.append(
            "wrong shapes " + listed(misshapen, lambda k: f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k].shape)})")
        )
    raise DuodiffError(
        f"{path}: the weights do not fit the U-ViT of {config_path}: {'; '.join(problems)}. "
        "Is the model YAML the published model's (img_size, patch_size, embed_dim, depth = U-ViT's depth + 1, "
        "num_classes, mlp_time_embed, qkv_bias, conv)?"
    )


def vp_sde_alpha_bar(t: float, beta_min: float, beta_max: float) -> float:
    """abar(t) of U-ViT's VPSDE: exp(-integral_0^t beta), beta(s) = beta_min + s (beta_max - beta_min)."""
    return math.exp(-(beta_min * t + 0.5 * (beta_max - beta_min) * t * t))


def compare_alpha_bar(diffusion: GaussianDiffusion, timesteps, beta_min: float, beta_max: float) -> dict:
    """sqrt(abar) and sqrt(1 - abar) of the discrete schedule at each integer step k against the
    VP-SDE's at t = k / 999 (the module docstring derives the map). Differences are relative to
    the discrete values, the ones our sampler uses (never 0: 0 < abar_k < 1)."""
    abar = diffusion._float64["alphas_cumprod"]  # float64: 1 - abar near k = 0 needs the digits
    rows = []
    for k in timesteps:
        require(0 <= k < diffusion.num_timesteps, f"timestep {k} is outside [0, {diffusion.num_timesteps})")
        ours, theirs = float(abar[k]), vp_sde_alpha_bar(k / UVIT_TIME_SCALE, beta_min, beta_max)
        row = {"k": k, "t": k / UVIT_TIME_SCALE, "alpha_bar": ours, "alpha_bar_uvit": theirs}
        row["rel_diff_sqrt_alpha_bar"] = abs(math.sqrt(ours) - math.sqrt(theirs)) / math.sqrt(ours)
        row["rel_diff_sqrt_one_minus_alpha_bar"] = abs(math.sqrt(1 - ours) - math.sqrt(1 - theirs)) / math.sqrt(1 - ours)
        rows.append(row)
    return {
        "map": f"t = k / {UVIT_TIME_SCALE}",
        "sde": {"beta_min": beta_min, "beta_max": beta_max},
        "timesteps": rows,
        "max_rel_diff_sqrt_alpha_bar": max(r["rel_diff_sqrt_alpha_bar"] for r in rows),
        "max_rel_diff_sqrt_one_minus_alpha_bar": max(r["rel_diff_sqrt_one_minus_alpha_bar"] for r in rows),
    }


# U-ViT's recipes a checkpoint can be converted under (workflow/rules/validation.smk keeps a copy:
# the workflow does not import duodiff): its VP-SDE (sde.py VPSDE) and its discrete latent models'
# schedule (stable_diffusion_beta_schedule).
UVIT_SDE = {"sde_beta_min": 0.1, "sde_beta_max": 20.0}
UVIT_DISCRETE_LATENT = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def check_uvit_recipe(*, noise_process, time_input, beta_schedule, beta_start, beta_end, sde_beta_min, sde_beta_max,
                      latent) -> None:  # fmt: skip
    """The noise process and time input a U-ViT checkpoint was trained for, or one DuodiffError naming
    the bad value and what is allowed: the continuous VP-SDE (beta 0.1 -> 20) fed t * 999 (its
    pixel models and ImageNet 256 L/2); the discrete scaled-linear 0.00085 -> 0.012 process fed
    n = index + 1 (its discrete latent models, H/2); for a pixel checkpoint, the approximation of
    its VP-SDE on the discrete linear schedule fed the 0-based step (the module docstring)."""
    prefix = f"--noise-process {noise_process}"
    if noise_process == "vp_sde":
        require(
            time_input == "t_times_999",
            f"{prefix} with --time-input {time_input}: U-ViT's continuous checkpoints see t * {UVIT_TIME_SCALE}; "
            "allowed: --time-input t_times_999",
        )
        for key, value in UVIT_SDE.items():
            got = {"sde_beta_min": sde_beta_min, "sde_beta_max": sde_beta_max}[key]
            flag = "--" + key.replace("_", "-")
            require(float(got) == value, f"{prefix} with {flag} {got}: U-ViT's VP-SDE has {value}; allowed: {flag} {value}")
    elif latent:
        require(
            time_input == "index_plus_one",
            f"{prefix} with --time-input {time_input} for a latent checkpoint: U-ViT's discrete latent checkpoints "
            "(ImageNet 256/512 H) see n = index + 1; allowed: --time-input index_plus_one (or --noise-process vp_sde "
            "--time-input t_times_999 for its continuous ones)",
        )
        for key, value in UVIT_DISCRETE_LATENT.items():
            got = {"beta_schedule": beta_schedule, "beta_start": beta_start, "beta_end": beta_end}[key]
            flag = "--" + key.replace("_", "-")
            require(
                got == value,
                f"{prefix} with {flag} {got} for a latent checkpoint: U-ViT's discrete latent checkpoints use Stable "
                f"Diffusion's schedule; allowed: {flag} {value}",
            )
    else:
        require(
            time_input == "index" and beta_schedule == "linear",
            f"{prefix} with --time-input {time_input} and --beta-schedule {beta_schedule} for a pixel checkpoint: "
            "U-ViT's pixel checkpoints are continuous; allowed: --noise-process vp_sde --time-input t_times_999 "
            "(their recipe), or the discrete approximation --time-input index --beta-schedule linear",
        )


def _checked_settings(config_path, num_timesteps, parametrization, dataset, compare_timesteps, label_dropout, latent) -> dict:
    """The model YAML as written, after the checks that make U-ViT's weights mean what they meant."""
    from duodiff.core.data import CHANNELS, DATASETS, NUM_CLASSES
    from duodiff.core.guidance import check_class_count, check_label_dropout
    from duodiff.models import UViTConfig

    model_config = load_yaml(config_path)
    config = UViTConfig.from_dict(model_config, source=str(config_path))
    require(
        not config.normalize_timesteps,
        f"{config_path} has normalize_timesteps: true, but U-ViT's checkpoints see the raw step (t * {UVIT_TIME_SCALE}); "
        "use a model YAML with normalize_timesteps: false",
    )
    require(
        num_timesteps == UVIT_TIME_SCALE + 1,
        f"--num-timesteps {num_timesteps}: U-ViT's networks see t * {UVIT_TIME_SCALE} for t in [0, 1], which integer steps "
        f"0..{UVIT_TIME_SCALE} cover only with --num-timesteps {UVIT_TIME_SCALE + 1}",
    )
    require(
        parametrization == "predict_noise",
        f"--parametrization {parametrization}: U-ViT's pixel-space checkpoints predict the noise (pred='noise_pred'); "
        "use predict_noise",
    )
    if dataset is not None:
        check_choice("--dataset", dataset, DATASETS)
    if dataset is not None and not latent:  # a latent model's channels are the autoencoder's (validation.smk)
        require(
            CHANNELS[dataset] == config.in_chans,
            f"--dataset {dataset} has {CHANNELS[dataset]} channel(s) but {config_path} has in_chans {config.in_chans}",
        )
    # A published model with a null class (U-ViT's ImageNet 256: num_classes 1001, p_uncond 0.15)
    # records it as training with label dropout does, so guided sampling finds it.
    check_label_dropout(label_dropout, config.num_classes, config_path)
    if dataset is not None and NUM_CLASSES[dataset] is not None:
        check_class_count(config.num_classes, NUM_CLASSES[dataset], label_dropout, config_path, dataset)
    require(len(compare_timesteps) > 0, "--compare-timesteps must name at least one timestep")
    return model_config


def run_convert(
    *, checkpoint, config_path, output, num_timesteps, beta_start, beta_end, beta_schedule, parametrization, dataset,
    noise_process, time_input, sde_beta_min, sde_beta_max, compare_timesteps, label_dropout, autoencoder, scale_factor,
) -> dict | None:  # fmt: skip
    """Convert `checkpoint` (U-ViT weights) for the model YAML `config_path` into `output`
    (model.pt, kind uvit, loaded by sampling and early-exit training as a trained one).

    Returns the ᾱ comparison (compare_alpha_bar), also stored in model.pt, or None where it
    means nothing (the module docstring)."""
    from duodiff.core.latent import autoencoder_record
    from duodiff.models import build_model

    latent = autoencoder is not None
    check_uvit_recipe(
        noise_process=noise_process, time_input=time_input, beta_schedule=beta_schedule, beta_start=beta_start,
        beta_end=beta_end, sde_beta_min=sde_beta_min, sde_beta_max=sde_beta_max, latent=latent,
    )  # fmt: skip
    model_config = _checked_settings(
        config_path, num_timesteps, parametrization, dataset, compare_timesteps, label_dropout, latent
    )
    diffusion = GaussianDiffusion(
        num_timesteps, beta_start, beta_end, parametrization, beta_schedule, noise_process, time_input, sde_beta_min, sde_beta_max
    )  # fmt: skip
    approximated = noise_process == "discrete" and time_input == "index" and not latent
    comparison = compare_alpha_bar(diffusion, compare_timesteps, sde_beta_min, sde_beta_max) if approximated else None
    # A latent model decodes through the autoencoder and scale it was trained with: recorded as
    # training records its latents, so `duodiff sample` refuses another one.
    record = autoencoder_record(autoencoder, None, scale_factor) if latent else None
    state, step, where = read_uvit_checkpoint(checkpoint)
    model = build_model("uvit", model_config, num_timesteps=num_timesteps)
    check_state_dict(state, model.state_dict(), checkpoint, config_path)
    not_finite = "a converted model would sample black images: convert a checkpoint with finite weights"
    checkpoints.check_finite(state, checkpoint, f"the U-ViT weights ({where})", not_finite)
    model.load_state_dict(state)  # names and shapes checked above; copying into the model's float32 casts
    weights = model.state_dict()
    # A float64 weight beyond float32's range becomes inf in the cast.
    checkpoints.check_finite(weights, checkpoint, "the U-ViT weights cast to float32", not_finite)
    fingerprint = (
        {"autoencoder_sha256": record["sha256"], "scale_factor": record["scale_factor"], "dataset": dataset, "source": "convert"}
        if latent
        else None
    )
    checkpoints.save_model(
        output, kind="uvit", classifier_type=None, model_config=model_config, diffusion=diffusion.config(),
        # Only U-ViT's EMA weights are published: they are the model's weights, and no second copy is kept.
        state_dict=weights, ema_state_dict=None, step=step,
        # The training settings known: the dataset (sampling records it so `duodiff fid` checks the
        # reference's), and the label dropout that gave the model its null class.
        train_args={
            k: v for k, v in (("dataset", dataset), ("label_dropout", label_dropout), ("latents_fingerprint", fingerprint)) if v
        } or None,
        converted_from={
            "checkpoint": str(checkpoint), "weights": where, "time_conditioning": comparison,
            "recipe": {
                "noise_process": noise_process, "time_input": time_input, "beta_schedule": beta_schedule,
                **({"scale_factor": float(scale_factor)} if latent else {}),
            },
        },
    )
    return comparison


def _timesteps(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise DuodiffError(f"--compare-timesteps must be integers separated by commas; got {text!r}") from None


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("convert", help="a published U-ViT checkpoint (libs/uvit.py names, EMA weights) -> model.pt")
    add_flag(p, "--checkpoint", required=True, help="U-ViT weights: a state dict .pth, a dict with 'nnet_ema', "
             "or a <step>.ckpt folder with nnet_ema.pth")  # fmt: skip
    add_flag(p, "--config-path", required=True, help="model YAML of the same architecture (normalize_timesteps: false)")
    add_flag(p, "--output", required=True, help="model.pt to write")
    add_flag(p, "--num-timesteps", type=int, default=1000)
    add_flag(p, "--beta-start", type=float, default=1e-4)
    add_flag(p, "--beta-end", type=float, default=0.02)
    add_flag(p, "--parametrization", default="predict_noise", help="U-ViT's pixel models: predict_noise")
    add_flag(p, "--beta-schedule", default="linear", help="linear (U-ViT pixel models) | scaled_linear (latent models)")
    add_flag(p, "--dataset", default=None, help="the dataset the published model was trained on (recorded for duodiff fid)")
    add_flag(p, "--label-dropout", type=float, default=0.0, help="the label dropout (p_uncond) the published model "
             "was trained with; > 0 records its null class (the last class token) for guided sampling "
             "(U-ViT's ImageNet 256: 0.15)")  # fmt: skip
    add_diffusion_recipe_flags(p)
    add_flag(p, "--autoencoder", default=None, help="a latent checkpoint's autoencoder (U-ViT's autoencoder_kl.pth): "
             "recorded with --scale-factor, so sampling decodes through the same one")  # fmt: skip
    add_flag(p, "--scale-factor", type=float, default=0.18215, help="the latents' scale (U-ViT's ImageNet: 0.18215)")
    add_flag(p, "--compare-timesteps", default="0,1,10,100,250,500,750,999", help="steps k at which ᾱ is compared with "
             "the VP-SDE's at t = k / 999")  # fmt: skip
    p.set_defaults(func=_cli)


def _cli(args) -> None:
    kwargs = {k: v for k, v in vars(args).items() if k not in ("command", "func") and not k.startswith("_")}
    kwargs["compare_timesteps"] = _timesteps(kwargs["compare_timesteps"])
    comparison = run_convert(**kwargs)
    print(f"converted {args.checkpoint} -> {args.output}")
    if comparison is None:
        print(
            f"recipe: noise process {args.noise_process}, time input {args.time_input} "
            f"({'latent, scale ' + str(args.scale_factor) if args.autoencoder else 'pixel space'}); "
            "no schedule comparison: it applies only to a pixel checkpoint approximated on the discrete process"
        )
        return
    print(f"time conditioning: discrete schedule at step k vs U-ViT's VP-SDE at {comparison['map']}")
    for row in comparison["timesteps"]:
        print(
            f"  k {row['k']:4d}: sqrt(abar) rel. diff {row['rel_diff_sqrt_alpha_bar']:.3g}, "
            f"sqrt(1-abar) rel. diff {row['rel_diff_sqrt_one_minus_alpha_bar']:.3g}"
        )
    print(
        f"max relative difference: sqrt(abar) {comparison['max_rel_diff_sqrt_alpha_bar']:.3g}, "
        f"sqrt(1-abar) {comparison['max_rel_diff_sqrt_one_minus_alpha_bar']:.3g}"
    )
