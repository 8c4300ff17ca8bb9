"""U-ViT's released checkpoints (issue 24): each shipped variant, laid over its study, sets exactly
U-ViT's recipe, and `snakemake -n` plans it end to end with `models.full_checkpoint` set: the
checkpoint converted (convert_full) instead of trained, every sample set in U-ViT's sampler, the
reference from U-ViT's statistics in pytorch-fid's protocol.

The expected recipes are written out here from U-ViT's own files (configs/*.py, sde.py, eval*.py,
datasets.py's fid_stat), not read from the variants. An empty file stands in for each checkpoint:
a dry run only needs it to be there."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_workflow import REPO, job_counts, load, make_workdir, model_depth, planned_commands, snakemake

CONTINUOUS = {"--noise-process": "vp_sde", "--time-input": "t_times_999"}
DISCRETE_LATENT = {"--time-input": "index_plus_one", "--beta-schedule": "scaled_linear", "--beta-start": "0.00085",
                   "--beta-end": "0.012"}  # fmt: skip
# checkpoint -> (study config, U-ViT's architecture: its configs/*.py nnet with depth + 1 = our blocks,
# recipe flags, sampler, steps, guidance scale, label dropout (p_uncond), autoencoder file, FID statistics)
RELEASED = {
    "cifar10_uvit_small": ("config/cifar10.yaml", dict(img_size=32, patch_size=2, in_chans=3, embed_dim=512, depth=13,
                           num_heads=8, num_classes=0, conv=True), CONTINUOUS, "euler_maruyama", 1000, 0.0, 0.0, None,
                           "fid_stats_cifar10_train_pytorch.npz"),
    "celeba64_uvit_small": ("config/celeba64.yaml", dict(img_size=64, patch_size=4, in_chans=3, embed_dim=512, depth=13,
                            num_heads=8, num_classes=0, conv=True), CONTINUOUS, "euler_maruyama", 1000, 0.0, 0.0, None,
                            "fid_stats_celeba64_train_50000_ddim.npz"),
    "imagenet64_uvit_mid": ("config/imagenet64.yaml", dict(img_size=64, patch_size=4, in_chans=3, embed_dim=768, depth=17,
                            num_heads=12, num_classes=1000, conv=True), CONTINUOUS, "dpm_solver_fast", 50, 0.0, 0.0, None,
                            "fid_stats_imagenet64_guided_diffusion.npz"),
    "imagenet64_uvit_large": ("config/imagenet64.yaml", dict(img_size=64, patch_size=4, in_chans=3, embed_dim=1024,
                              depth=21, num_heads=16, num_classes=1000, conv=True), CONTINUOUS, "dpm_solver_fast", 50, 0.0,
                              0.0, None, "fid_stats_imagenet64_guided_diffusion.npz"),
    "imagenet256_uvit_large": ("config/imagenet256.yaml", dict(img_size=32, patch_size=2, in_chans=4, embed_dim=1024,
                               depth=21, num_heads=16, num_classes=1001, conv=True), CONTINUOUS, "dpm_solver_fast", 50,
                               0.4, 0.15, "autoencoder_kl.pth", "fid_stats_imagenet256_guided_diffusion.npz"),
    "imagenet256_uvit_huge": ("config/imagenet256.yaml", dict(img_size=32, patch_size=2, in_chans=4, embed_dim=1152,
                              depth=29, num_heads=16, num_classes=1001, conv=False), DISCRETE_LATENT, "dpm_solver_fast",
                              50, 0.4, 0.1, "autoencoder_kl_ema.pth", "fid_stats_imagenet256_guided_diffusion.npz"),
}  # fmt: skip


def variant(name) -> str:
    return f"config/variants/{name}.yaml"


def merged(name) -> dict:
    """The study's config with the variant laid over it, as Snakemake merges two --configfile's
    (nested mappings key by key, anything else replaced)."""

    def merge(base, over):
        out = dict(base)
        for key, value in over.items():
            out[key] = merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
        return out

    return merge(load(RELEASED[name][0]), load(variant(name)))


@pytest.fixture(scope="module")
def released_dry_runs(tmp_path_factory):
    workdir = make_workdir(tmp_path_factory.mktemp("released"))
    for name in RELEASED:
        checkpoint = workdir / merged(name)["models"]["full_checkpoint"]
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.touch()
    runs = {name: ("--configfile", RELEASED[name][0], variant(name), "-n", "-p") for name in RELEASED}
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = dict(zip(runs, pool.map(lambda args: snakemake(workdir, *args), runs.values())))
    return results


def test_every_released_checkpoint_has_a_variant_and_the_readme_points_at_it():
    shipped = {p.stem for p in (REPO / "config" / "variants").glob("*_uvit_*.yaml")}
    assert shipped == set(RELEASED)
    readme = (REPO / "config" / "README.md").read_text()
    for name in RELEASED:
        assert f"`{name}.pth`" in readme or f"`{name}.pth` " in readme, name
        assert f"`config/variants/{name}.yaml`" in readme, name


@pytest.mark.parametrize("name", RELEASED)
def test_a_variant_sets_exactly_uvits_recipe(name):
    study, architecture, recipe, sampler, steps, guidance, dropout, autoencoder, statistics = RELEASED[name]
    cfg, own = merged(name), load(variant(name))
    # The variant itself states every part of the recipe (not inherited by accident from the study).
    assert {"diffusion", "sampling", "reference", "metrics"} <= set(own) and "full_checkpoint" in own["models"]
    assert cfg["experiment"] == name and cfg["models"]["full_checkpoint"] == f"assets/uvit/{name}.pth"
    model = load(cfg["models"]["full"])
    assert {k: model.get(k, True if k == "conv" else 0) for k in architecture} == architecture
    assert model["normalize_timesteps"] is False and model.get("mlp_time_embed", False) is False
    diffusion = cfg["diffusion"]
    assert diffusion["num_timesteps"] == 1000 and diffusion["parametrization"] == "predict_noise"
    if recipe is CONTINUOUS:
        assert (diffusion["noise_process"], diffusion["time_input"]) == ("vp_sde", "t_times_999")
        assert (diffusion["sde_beta_min"], diffusion["sde_beta_max"]) == (0.1, 20.0)
    else:
        assert diffusion.get("noise_process", "discrete") == "discrete" and diffusion["time_input"] == "index_plus_one"
        assert (diffusion["beta_schedule"], diffusion["beta_start"], diffusion["beta_end"]) == ("scaled_linear", 0.00085, 0.012)
    sampling = cfg["sampling"]
    assert (sampling["sampler"], sampling["steps"], sampling["guidance_scale"]) == (sampler, steps, guidance)
    assert sampling["n_samples"] == 50_000
    assert all(cfg["train"][stage].get("label_dropout", 0.0) == dropout for stage in ("full", "shallow", "early_exit"))
    if autoencoder is None:
        assert cfg.get("autoencoder", {}).get("path") is None
    else:
        assert cfg["autoencoder"]["path"] == f"assets/stable-diffusion/{autoencoder}"
        assert cfg["autoencoder"]["scale_factor"] == 0.18215
    assert cfg["reference"]["statistics"] == f"assets/fid_stats/{statistics}"
    assert cfg["metrics"]["fid"]["mode"] == "legacy_pytorch" and cfg["metrics"]["cmmd"]["enabled"] is False
    assert all(0 < t < steps for t in cfg["duodiff"]["t_switch"]) and all(0 < n < steps for n in sampling["fewer_steps"])


@pytest.mark.parametrize("name", RELEASED)
def test_dry_run_plans_convert_full_and_every_sample_set(released_dry_runs, name):
    result = released_dry_runs[name]
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = merged(name)
    counts = job_counts(result.stdout)
    shallow = len(cfg["models"]["shallow"])
    assert counts["convert_full"] == 1 and "train_full" not in counts
    assert counts["train_shallow"] == shallow
    assert counts["train_early_exit"] == len(cfg["early_exit"]["classifier_types"])
    assert counts["sample_full"] == 1 and counts.get("sample_fewer_steps", 0) == len(cfg["sampling"]["fewer_steps"])
    assert counts["sample_shallow"] == shallow
    assert counts["sample_early_exit"] == len(cfg["early_exit"]["classifier_types"]) * len(cfg["early_exit"]["thresholds"])
    assert counts["sample_duodiff"] == shallow * len(cfg["duodiff"]["t_switch"])
    _, _, recipe, sampler, steps, guidance, dropout, autoencoder, statistics = RELEASED[name]
    commands = planned_commands(result.stdout)
    (convert,) = [flags for cmd, flags in commands if cmd == "convert"]
    assert convert["--checkpoint"] == f"assets/uvit/{name}.pth" and convert["--config-path"] == cfg["models"]["full"]
    assert {k: convert.get(k) for k in recipe} == recipe
    if recipe is DISCRETE_LATENT:  # the discrete process is the default: no --noise-process flag
        assert convert.get("--noise-process", "discrete") == "discrete"
    assert float(convert.get("--label-dropout", 0)) == dropout
    assert convert.get("--autoencoder") == (autoencoder and f"assets/stable-diffusion/{autoencoder}")
    samples = [flags for cmd, flags in commands if cmd == "sample"]
    assert len(samples) == sum(counts[r] for r in counts if r.startswith("sample_"))
    for flags in samples:
        assert flags["--sampler"] == sampler  # the recipe itself travels in model.pt (convert's flags above)
        assert int(flags["--steps"]) == steps or int(flags["--steps"]) in cfg["sampling"]["fewer_steps"]
        assert float(flags.get("--guidance-scale", 0)) == guidance
    (reference,) = [flags for cmd, flags in commands if cmd == "reference"]
    assert reference["--statistics"] == f"assets/fid_stats/{statistics}"
    assert reference["--mode"] == "legacy_pytorch"


@pytest.mark.parametrize("name", RELEASED)
def test_the_full_model_file_fits_the_published_weights(name):
    """The model file builds exactly the parameter names and shapes of U-ViT's libs/uvit.py network
    of that architecture (test_convert.uvit_shapes, written from libs/uvit.py)."""
    import torch
    from test_convert import uvit_shapes

    from duodiff.models import build_model, load_model_config

    architecture = dict(RELEASED[name][1])
    config = load_model_config(REPO / merged(name)["models"]["full"])
    with torch.device("meta"):  # names and shapes only: no memory for U-ViT-H's weights
        model = build_model("uvit", config)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == uvit_shapes(**architecture)
    assert model_depth(Path(merged(name)["models"]["full"])) == architecture["depth"]
