"""Config validation: every bad config is refused before any job starts, with one message naming the
key (a real run, and a dry run where the refusal must hold there too), and a missing data root
stops a real run. Snakemake runs as a subprocess in a scratch folder (test_workflow.py's helpers)."""

from __future__ import annotations

import ast
import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml
from test_workflow import REPO, TINY, label_dropout_in_one_training, load, make_workdir, modified, snakemake

# ---- config validation -----------------------------------------------------------------------------


def _mismatched_shallow(cfg, workdir):
    shallow = load(cfg["models"]["shallow"][0]) | {"patch_size": 4}
    path = workdir / "shallow_patch4.yaml"
    path.write_text(yaml.safe_dump(shallow))
    cfg["models"]["shallow"] = [str(path)]


def _even_full_model(cfg, workdir):
    path = workdir / "full_depth4.yaml"
    path.write_text(yaml.safe_dump(load(cfg["models"]["full"]) | {"depth": 4}))
    cfg["models"]["full"] = "full_depth4.yaml"


def _pixel_models_with_an_autoencoder(cfg, workdir):
    from conftest import TINY_AUTOENCODER

    (workdir / "ae").mkdir(exist_ok=True)
    (workdir / "ae" / "config.json").write_text(json.dumps(TINY_AUTOENCODER))  # what the check reads
    cfg["autoencoder"] = {"path": "ae"}


def _single_file_autoencoder(cfg, workdir):
    (workdir / "ae.pth").touch()
    cfg["autoencoder"] = {"path": "ae.pth"}


# (name, edit of the tiny config, text the error must contain). Each is refused before any job.
BAD_CONFIGS = [
    ("euler_maruyama on the discrete process", lambda c, w: c["sampling"].update(sampler="euler_maruyama"),
     "invalid config: sampling.sampler euler_maruyama integrates the continuous VP-SDE, but diffusion.noise_process "
     "is 'discrete'"),
    ("threshold above 1", lambda c, w: c["early_exit"].update(thresholds=[0.1, 1.5]),
     "invalid config: early_exit.thresholds[1]: 1.5 is greater than the maximum of 1"),
    ("t_switch beyond the sampling steps", lambda c, w: c["duodiff"].update(t_switch=[2, 7]),
     "invalid config: duodiff.t_switch 7 must be in [0, sampling.steps = 6]"),
    ("cache interval beyond the sampling steps", lambda c, w: c.update(cache={"interval": [2, 7]}),
     "invalid config: cache.interval 7 must be in [1, sampling.steps = 6]"),
    ("Learning-to-Cache threshold above 1", lambda c, w: c.update(learning_to_cache={"thresholds": [0.5, 1.5]}),
     "invalid config: learning_to_cache.thresholds[1]: 1.5 is greater than the maximum of 1"),
    ("cache interval 0", lambda c, w: c.update(cache={"interval": [0]}),
     "invalid config: cache.interval[0]: 0 is less than the minimum of 1"),
    ("cache keeping the whole network", lambda c, w: c.update(cache={"interval": [2], "keep_blocks": 2}),
     "invalid config: cache.keep_blocks 2 must be in [1, 1]: models.full tests/configs/models/tiny.yaml has depth 3"),
    ("unknown classifier type", lambda c, w: c["early_exit"].update(classifier_types=["linear_probe"]),
     "invalid config: early_exit.classifier_types[0]: 'linear_probe' is not one of ['attention_probe', "
     "'mlp_probe_per_layer', 'mlp_probe_per_timestep', 'mlp_probe_per_layer_per_timestep']"),
    ("unknown dataset", lambda c, w: c["dataset"].update(name="mnist"),
     "invalid config: dataset.name: 'mnist' is not one of ['digits', 'cifar10', 'celeba', 'imagenet64', 'imagenet256', "
     "'imagefolder']"),
    ("a variant that samples its own models", lambda c, w: c["models"].update(trained_in=c["experiment"]),
     "invalid config: models.trained_in is 'tiny', the experiment itself"),
    ("zero batch size", lambda c, w: c["sampling"].update(batch_size=0),
     "invalid config: sampling.batch_size: 0 is less than the minimum of 1"),
    ("misspelt training key", lambda c, w: c["train"]["early_exit"].update(n_step=5),
     "invalid config: train.early_exit: Unevaluated properties are not allowed ('n_step' was unexpected)"),
    ("shallow model with another patch size", _mismatched_shallow,
     "has patch_size 4 but models.full tests/configs/models/tiny.yaml has 2"),
    ("ddpm with fewer steps than timesteps", lambda c, w: c["sampling"].update(sampler="ddpm"),
     "invalid config: sampling.steps is 6, but the ddpm sampler visits all diffusion.num_timesteps = 1000 steps"),
    ("unknown precision", lambda c, w: c["sampling"].update(precision="fp8"),
     "invalid config: sampling.precision: 'fp8' is not one of ['fp32', 'tf32', 'bf16', 'fp16']"),
    ("tf32 on the CPU", lambda c, w: c["sampling"].update(precision="tf32"),
     "invalid config: sampling.precision tf32 needs device: cuda (device is cpu); on the CPU use fp32 or bf16"),
    ("even model depth", _even_full_model,
     "invalid config: models.full full_depth4.yaml has depth 4; a U-ViT needs an odd depth (depth // 2 in-blocks, "
     "1 mid-block, depth // 2 out-blocks), e.g. 3 or 5"),
    ("shallow and full models swapped",
     lambda c, w: c["models"].update(full="tests/configs/models/tiny_d1.yaml", shallow=["tests/configs/models/tiny.yaml"]),
     "invalid config: models.shallow tests/configs/models/tiny.yaml has depth 3, but a DuoDiff shallow model must be "
     "shallower than models.full tests/configs/models/tiny_d1.yaml (depth 1)"),
    ("shallow model as deep as the full one", lambda c, w: c["models"].update(shallow=["tests/configs/models/tiny.yaml"]),
     "invalid config: models.shallow tests/configs/models/tiny.yaml has depth 3, but a DuoDiff shallow model must be "
     "shallower than models.full tests/configs/models/tiny.yaml (depth 3)"),
    ("digits models with the cifar10 dataset", lambda c, w: c["dataset"].update(name="cifar10"),
     "invalid config: models.full tests/configs/models/tiny.yaml has img_size 8, but dataset cifar10 gives 32x32 images "
     "(dataset.image_size: null = its native size); set dataset.image_size: 8 or use a model config for 32x32 images"),
    ("dataset without a native size", lambda c, w: c["dataset"].update(name="imagefolder"),
     "invalid config: dataset.image_size is null, but dataset imagefolder has no native size; set it to the img_size "
     "of models.full tests/configs/models/tiny.yaml (8)"),
    ("guidance without a null class", lambda c, w: c["sampling"].update(guidance_scale=0.4),
     "invalid config: sampling.guidance_scale is 0.4, which needs class-conditional models with a null class: "
     "models.full tests/configs/models/tiny.yaml has num_classes 0 and train.full.label_dropout 0.0"),
    ("label dropout on an unconditional model",
     lambda c, w: [c["train"][stage].update(label_dropout=0.1) for stage in ("full", "shallow", "early_exit")],
     "invalid config: train.*.label_dropout is set (full 0.1, shallow 0.1, early_exit 0.1), but models.full "
     "tests/configs/models/tiny.yaml has num_classes 0: label dropout needs a class-conditional model"),
    ("label dropout in one training only", label_dropout_in_one_training,
     "invalid config: train.full, train.shallow and train.early_exit must all drop labels or none (label_dropout "
     "full 0.1, shallow 0.0, early_exit 0.0): they share the null class"),
    ("grayscale models with an RGB dataset", lambda c, w: c["dataset"].update(name="imagefolder", image_size=8),
     "invalid config: models.full tests/configs/models/tiny.yaml has in_chans 1, but dataset imagefolder has 3 "
     "channel(s); use a model config with in_chans: 3"),
    ("autoencoder config without an autoencoder",
     lambda c, w: c.update(autoencoder={"config": "config/autoencoders/sd-kl-f8.json"}),
     "invalid config: autoencoder.config is config/autoencoders/sd-kl-f8.json, but autoencoder.path is null"),
    ("pixel-space models with an autoencoder", _pixel_models_with_an_autoencoder,
     "invalid config: models.full tests/configs/models/tiny.yaml has in_chans 1, img_size 8, but the autoencoder turns "
     "8x8 images into 4 latent channels downsampled 2x; use a model config with in_chans: 4, img_size: 4"),
    ("composed entry with two lists",
     lambda c, w: c.update(composed=[{"steps": [3, 4], "early_exit": "attention_probe", "threshold": [0.1, 0.2]}]),
     "invalid config: composed[0]: exactly one of threshold, steps must be a list (the swept knob); got 2: threshold, "
     "steps"),
    ("composed entry without a list",
     lambda c, w: c.update(composed=[{"steps": 3, "duodiff": 1, "t_switch": 2}]),
     "exactly one of t_switch, steps must be a list (the swept knob); got 0"),
    ("composed entry with a classifier the study does not train",
     lambda c, w: c.update(composed=[{"steps": 3, "early_exit": "mlp_probe_per_layer", "threshold": [0.1]}]),
     "early_exit 'mlp_probe_per_layer' is not one of early_exit.classifier_types (attention_probe)"),
    ("composed entry with a shallow depth the study does not train",
     lambda c, w: c.update(composed=[{"steps": 3, "duodiff": 3, "t_switch": [1]}]),
     "duodiff 3 is not a shallow depth of models.shallow ([1])"),
    ("composed entry at the study's steps",
     lambda c, w: c.update(composed=[{"steps": [3, 6], "early_exit": "attention_probe", "threshold": 0.1}]),
     "steps 6 must be in [1, sampling.steps = 6) with any sampler but ddpm (at sampling.steps, leave steps out)"),
    ("composed t_switch beyond the entry's steps",
     lambda c, w: c.update(composed=[{"steps": 3, "duodiff": 1, "t_switch": [2, 4]}]),
     "t_switch 4 must be in [0, 3] (the entry's steps)"),
    ("composed entry of one ingredient",
     lambda c, w: c.update(composed=[{"early_exit": "attention_probe", "threshold": [0.1, 0.2]}]),
     "combines early_exit; a composed entry needs two or more of duodiff (+ t_switch), early_exit (+ threshold), "
     "cache_interval (+ cache_keep), steps"),
    ("composed caching without duodiff",
     lambda c, w: c.update(composed=[{"steps": 3, "cache_interval": [2], "cache_keep": 1}]),
     "cache_interval composes with duodiff alone (caching the full model's phase); got it with steps"),
    ("composed caching without its keep",
     lambda c, w: c.update(composed=[{"duodiff": 1, "t_switch": 2, "cache_interval": [2]}]),
     "cache_interval and cache_keep go together"),
    ("composed caching keeping too many blocks",
     lambda c, w: c.update(composed=[{"duodiff": 1, "t_switch": 2, "cache_interval": [2], "cache_keep": 9}]),
     "cache_keep 9 must be in [1, "),
    ("single-file autoencoder without its architecture", _single_file_autoencoder,
     "invalid config: autoencoder.path ae.pth is a single checkpoint file; set autoencoder.config to its architecture"),
]  # fmt: skip
# Also refused by a dry run, which plans every job of a config that passes (the even depth
# planned 79 jobs).
REFUSED_IN_DRY_RUN = ["even model depth", "shallow and full models swapped", "shallow model as deep as the full one",
                      "digits models with the cifar10 dataset"]  # fmt: skip


@pytest.fixture(scope="session")
def bad_config_runs(tmp_path_factory):
    workdir = make_workdir(tmp_path_factory.mktemp("bad"))
    tiny = load(TINY)
    args = []
    for i, (_, edit, _) in enumerate(BAD_CONFIGS):
        path = workdir / f"bad{i}.yaml"
        path.write_text(yaml.safe_dump(modified(tiny, lambda c: edit(c, workdir))))
        # A real run, not a dry run: the config must be refused before any job starts.
        args.append(("--configfile", path, "--cores", "1"))
    # A dataset that needs files, at a root that does not exist (with models for its 3x32x32 images).
    for name in ("tiny", "tiny_d1"):
        model = load(f"tests/configs/models/{name}.yaml") | {"img_size": 32, "in_chans": 3}
        (workdir / f"{name}_rgb32.yaml").write_text(yaml.safe_dump(model))

    def missing_root(c):
        c["dataset"].update(name="cifar10", root="no/such/dir")
        c["models"].update(full="tiny_rgb32.yaml", shallow=["tiny_d1_rgb32.yaml"])

    path = workdir / "missing_root.yaml"
    path.write_text(yaml.safe_dump(modified(tiny, missing_root)))
    args.append(("--configfile", path, "--cores", "1"))
    names = [name for name, _, _ in BAD_CONFIGS]
    args += [("--configfile", workdir / f"bad{names.index(name)}.yaml", "-n") for name in REFUSED_IN_DRY_RUN]
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda a: snakemake(workdir, *a), args))
    return workdir, results


@pytest.mark.parametrize("index", range(len(BAD_CONFIGS)), ids=[name for name, _, _ in BAD_CONFIGS])
def test_bad_config_is_refused_before_any_job_with_a_message_naming_the_key(bad_config_runs, index):
    workdir, results = bad_config_runs
    result = results[index]
    assert result.returncode != 0
    assert BAD_CONFIGS[index][2] in result.stderr
    assert "Building DAG of jobs" not in result.stderr + result.stdout
    assert not (workdir / "results").exists()


@pytest.mark.parametrize("name", REFUSED_IN_DRY_RUN)
def test_bad_config_is_refused_by_a_dry_run_too(bad_config_runs, name):
    workdir, results = bad_config_runs
    index = [n for n, _, _ in BAD_CONFIGS].index(name)
    result = results[len(BAD_CONFIGS) + 1 + REFUSED_IN_DRY_RUN.index(name)]
    assert result.returncode != 0
    assert BAD_CONFIGS[index][2] in result.stdout + result.stderr  # a dry run logs to stdout
    assert "Building DAG of jobs" not in result.stderr + result.stdout and "Job stats" not in result.stdout


def test_dataset_tables_of_the_workflow_match_duodiff_data():
    # The workflow does not import duodiff (Snakemake may run outside the jobs' environment), so
    # validation.smk keeps its own copy of each dataset's native image size and channel count.
    from duodiff.core import data

    text = (REPO / "workflow" / "rules" / "validation.smk").read_text()

    def table(name):  # the literal assigned to `name` at the top level, over one line or several
        match = re.search(rf"^{name} = (\{{.*?\}})$", text, flags=re.M | re.S)
        return ast.literal_eval(match[1])

    assert table("DATASET_NATIVE_SIZE") == data.NATIVE_SIZE
    assert table("DATASET_CHANNELS") == data.CHANNELS


def test_missing_data_root_stops_a_real_run(bad_config_runs):
    workdir, results = bad_config_runs
    result = results[len(BAD_CONFIGS)]
    assert result.returncode != 0
    assert "invalid config: dataset.root no/such/dir does not exist for dataset cifar10" in result.stderr
    assert not (workdir / "results").exists()




# ---- a released checkpoint's recipe (models.full_checkpoint) ---------------------------------------
# The noise process, time input and sampler must be those the checkpoint was trained for (U-ViT's
# configs: the continuous VP-SDE fed t * 999; the discrete latent H models fed n = index + 1 on
# Stable Diffusion's schedule; a pixel checkpoint approximated on the discrete linear schedule fed
# the 0-based step). (name, base config, diffusion / sampling edit, text the error must contain).
CONTINUOUS = {"noise_process": "vp_sde", "time_input": "t_times_999"}
DISCRETE_LATENT = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                   "time_input": "index_plus_one"}  # fmt: skip
PREFIX = "invalid config: models.full_checkpoint is set with diffusion.noise_process"
BAD_CHECKPOINT_RECIPES = [
    ("continuous with the 0-based step", "tiny", {"noise_process": "vp_sde"}, {},
     f"{PREFIX} vp_sde, but diffusion.time_input is 'index'; U-ViT's continuous checkpoints see t * 999: allowed: "
     "t_times_999"),
    ("continuous with index + 1", "tiny_latent", {"noise_process": "vp_sde", "time_input": "index_plus_one"}, {},
     f"{PREFIX} vp_sde, but diffusion.time_input is 'index_plus_one'; U-ViT's continuous checkpoints see t * 999: "
     "allowed: t_times_999"),
    ("continuous with another SDE", "tiny", {**CONTINUOUS, "sde_beta_max": 10.0}, {},
     f"{PREFIX} vp_sde, but diffusion.sde_beta_max is 10.0; U-ViT's VP-SDE has sde_beta_max 20.0: allowed: 20.0"),
    ("discrete latent with the 0-based step", "tiny_latent", {**DISCRETE_LATENT, "time_input": "index"}, {},
     f"{PREFIX} discrete in latent space, but diffusion.time_input is 'index'; U-ViT's discrete latent checkpoints "
     "(ImageNet 256/512 H) see n = index + 1: allowed: index_plus_one"),
    ("discrete latent with t * 999", "tiny_latent", {**DISCRETE_LATENT, "time_input": "t_times_999"}, {},
     f"{PREFIX} discrete in latent space, but diffusion.time_input is 't_times_999'"),
    ("discrete latent with DDPM's linear betas", "tiny_latent", {"time_input": "index_plus_one"}, {},
     f"{PREFIX} discrete in latent space, but diffusion.beta_schedule is linear; U-ViT's discrete latent checkpoints "
     "use Stable Diffusion's schedule: allowed: beta_schedule scaled_linear"),
    ("discrete latent with other betas", "tiny_latent", {**DISCRETE_LATENT, "beta_end": 0.02}, {},
     f"{PREFIX} discrete in latent space, but diffusion.beta_end is 0.02; U-ViT's discrete latent checkpoints use "
     "Stable Diffusion's schedule: allowed: beta_end 0.012"),
    ("discrete pixel with t * 999", "tiny", {"time_input": "t_times_999"}, {},
     f"{PREFIX} discrete in pixel space, but diffusion.time_input is 't_times_999' and diffusion.beta_schedule "
     "'linear'; U-ViT's pixel checkpoints are continuous: allowed: noise_process vp_sde with time_input t_times_999"),
    ("discrete pixel with index + 1", "tiny", {"time_input": "index_plus_one"}, {},
     f"{PREFIX} discrete in pixel space, but diffusion.time_input is 'index_plus_one'"),
    ("euler_maruyama on a discrete latent checkpoint", "tiny_latent", DISCRETE_LATENT, {"sampler": "euler_maruyama"},
     "invalid config: sampling.sampler euler_maruyama integrates the continuous VP-SDE, but diffusion.noise_process "
     "is 'discrete'"),
]  # fmt: skip
# Accepted: U-ViT's three recipes with a checkpoint (a dry run plans convert_full).
GOOD_CHECKPOINT_RECIPES = [
    ("continuous pixel, euler_maruyama", "tiny", CONTINUOUS, {"sampler": "euler_maruyama"}),
    ("continuous latent, dpm_solver_fast", "tiny_latent", CONTINUOUS, {"sampler": "dpm_solver_fast"}),
    ("discrete latent, dpm_solver_fast", "tiny_latent", DISCRETE_LATENT, {"sampler": "dpm_solver_fast"}),
    ("discrete pixel approximation, ddim", "tiny", {}, {}),
]  # fmt: skip


def _checkpoint_config(base, diffusion, sampling) -> dict:
    def edit(c):
        c["models"]["full_checkpoint"] = "uvit.pth"
        c.setdefault("diffusion", {}).update(diffusion)
        c["sampling"].update(sampling)

    return modified(load(TINY if base == "tiny" else "tests/configs/tiny_latent.yaml"), edit)


@pytest.fixture(scope="module")
def checkpoint_recipe_runs(tmp_path_factory):
    from test_workflow import add_autoencoders

    workdir = add_autoencoders(make_workdir(tmp_path_factory.mktemp("recipes")))
    (workdir / "uvit.pth").touch()  # the checkpoint's file: nothing reads it before a job
    args = []
    for i, (_, base, diffusion, sampling, _) in enumerate(BAD_CHECKPOINT_RECIPES):
        (workdir / f"bad{i}.yaml").write_text(yaml.safe_dump(_checkpoint_config(base, diffusion, sampling)))
        args.append(("--configfile", f"bad{i}.yaml", "--cores", "1"))  # a real run: refused before any job
    for i, (_, base, diffusion, sampling) in enumerate(GOOD_CHECKPOINT_RECIPES):
        (workdir / f"good{i}.yaml").write_text(yaml.safe_dump(_checkpoint_config(base, diffusion, sampling)))
        args.append(("--configfile", f"good{i}.yaml", "-n"))
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda a: snakemake(workdir, *a), args))
    return workdir, results


@pytest.mark.parametrize("index", range(len(BAD_CHECKPOINT_RECIPES)), ids=[r[0] for r in BAD_CHECKPOINT_RECIPES])
def test_a_checkpoint_with_a_recipe_it_was_not_trained_in_is_refused_before_any_job(checkpoint_recipe_runs, index):
    workdir, results = checkpoint_recipe_runs
    result = results[index]
    assert result.returncode != 0
    assert BAD_CHECKPOINT_RECIPES[index][4] in result.stderr
    assert "Building DAG of jobs" not in result.stderr + result.stdout
    assert not (workdir / "results").exists()


@pytest.mark.parametrize("index", range(len(GOOD_CHECKPOINT_RECIPES)), ids=[r[0] for r in GOOD_CHECKPOINT_RECIPES])
def test_a_checkpoint_in_one_of_uvits_recipes_plans_its_conversion(checkpoint_recipe_runs, index):
    from test_workflow import job_counts

    _, results = checkpoint_recipe_runs
    result = results[len(BAD_CHECKPOINT_RECIPES) + index]
    assert result.returncode == 0, result.stderr[-2000:]
    counts = job_counts(result.stdout)
    assert counts["convert_full"] == 1 and "train_full" not in counts and counts["sample_full"] == 1
