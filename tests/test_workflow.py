"""The Snakemake workflow: the DAG each shipped config plans, config validation, the profiles, and
(slow) the whole tiny study end to end.

Expected job counts are computed here from the config values alone (one training per model, one
sample set per grid point, three scores per set), not from the workflow's own helpers. Snakemake
runs as a subprocess, as users run it, in a scratch folder that links config/, tests/ and
profiles/ from the repository, so no test touches the checkout's results/ or .snakemake/.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "workflow" / "Snakefile"
BIN = Path(sys.executable).parent  # the environment running the tests also runs the pipeline
SNAKEMAKE = BIN / "snakemake"
SHIPPED_CONFIGS = ["config/config.yaml", "config/cifar10.yaml", "config/celeba64.yaml", "config/imagenet64.yaml",
                   "config/imagenet256.yaml"]  # fmt: skip
TINY = "tests/configs/tiny.yaml"
TINY_LATENT = "tests/configs/tiny_latent.yaml"
OTHER_EXPERIMENT = "tiny_other"
PLOTS = ["quality_vs_gflops", "paired_difference", "quality_vs_time", "exit_heatmap", "mean_exit_layer", "fid_vs_tswitch", "training_curves",
         "sample_grids"]
GPU_RULES = ["encode", "reference", "train_full", "train_shallow", "train_early_exit", "sample_full", "sample_shallow",
             "sample_early_exit", "sample_duodiff", "score", "cmmd_reference", "cmmd", "timing"]  # fmt: skip


# ---- helpers ---------------------------------------------------------------------------------------


def make_workdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name in ("config", "tests", "profiles"):
        link = path / name
        if not link.exists():
            link.symlink_to(REPO / name)
    return path


def add_autoencoders(workdir: Path) -> Path:
    """The autoencoder tiny_latent.yaml names: a tiny random one (a diffusers folder).
    config/imagenet256.yaml's is left absent, as on a fresh clone: its dry run plans without it."""
    from conftest import save_tiny_autoencoder

    save_tiny_autoencoder(workdir / load(TINY_LATENT)["autoencoder"]["path"])
    return workdir


def snakemake(workdir: Path, *args, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [str(SNAKEMAKE), "--snakefile", str(SNAKEFILE), "--directory", str(workdir), *map(str, args)],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def job_counts(output: str) -> dict:
    """The first 'Job stats' table of Snakemake's output as {rule: count} (without 'total')."""
    lines = output.splitlines()
    start = lines.index("Job stats:") + 3  # header, column names, dashes
    counts = {}
    for line in lines[start:]:
        rule, count = line.split()
        if rule == "total":
            return counts
        counts[rule] = int(count)
    raise AssertionError("no 'total' line in the job stats")


def load(path) -> dict:
    with open(REPO / path) as f:
        return yaml.safe_load(f)


def model_depth(path) -> int:
    return load(path)["depth"]


def expected_sets(cfg: dict) -> list:
    """The generated sample sets, in table order (the real-data set is scored too: scored_sets)."""
    depths = [model_depth(p) for p in cfg["models"]["shallow"]]
    return (
        ["full"]
        + [f"full_steps{n}" for n in sorted(cfg["sampling"].get("fewer_steps", []), reverse=True)]
        + [f"shallow_d{d}" for d in depths]
        + [f"ee_{c}_thr{float(t)!r}" for c in cfg["early_exit"]["classifier_types"] for t in cfg["early_exit"]["thresholds"]]
        + [f"duodiff_d{d}_ts{t}" for d in depths for t in cfg["duodiff"]["t_switch"]]
        + [f"cache_N{n}_k{cache_keep(cfg)}" for n in cfg.get("cache", {}).get("interval", [])]
        + l2c_sets(cfg)
        + composed_sets(cfg)
    )


def l2c_sets(cfg: dict) -> list:
    return [f"l2c_thr{float(t)!r}" for t in cfg.get("learning_to_cache", {}).get("thresholds", [])]


def cache_keep(cfg: dict) -> int:
    return cfg.get("cache", {}).get("keep_blocks", 1)  # the schema's default


def composed_sets(cfg: dict) -> list:
    """The sets of the config's `composed` entries, written out by hand, entry by entry."""
    sets = []
    for entry in cfg.get("composed", []):
        knob = next(k for k in ("t_switch", "threshold", "cache_interval", "steps") if isinstance(entry.get(k), list))
        for value in entry[knob]:
            e = {**entry, knob: value}
            name = f"duodiff_d{e['duodiff']}_ts{e['t_switch']}" if "duodiff" in e else ""
            if "early_exit" in e:
                name += ("_" if name else "") + f"ee_{e['early_exit']}_thr{float(e['threshold'])!r}"
            if "cache_interval" in e:
                name += f"_cache_N{e['cache_interval']}_k{e['cache_keep']}"
            name += f"_steps{e['steps']}" if "steps" in e else ""
            sets += [name] if name not in sets else []
    return sets


def composed_rule(name: str) -> str:
    """The rule (sample.smk) that samples a composed set."""
    if not name.startswith("duodiff"):
        return "sample_composed_early_exit_steps"
    if "_cache_" in name:
        return "sample_composed_duodiff_cache"
    form = "duodiff_early_exit" if "_ee_" in name else "duodiff"
    return f"sample_composed_{form}" + ("_steps" if "_steps" in name else "")


def scored_sets(cfg: dict) -> list:
    return expected_sets(cfg) + (["real"] if cfg["reference"].get("n_real", 0) else [])


def expected_jobs(cfg: dict) -> dict:
    n_shallow = len(cfg["models"]["shallow"])
    n_classifiers = len(cfg["early_exit"]["classifier_types"])
    n_thresholds = len(cfg["early_exit"]["thresholds"])
    n_t_switch = len(cfg["duodiff"]["t_switch"])
    n_fewer = len(cfg["sampling"].get("fewer_steps", []))
    n_sets = len(expected_sets(cfg))
    n_scored = len(scored_sets(cfg))
    classifier = cfg.get("metrics", {}).get("headline") == "classifier"
    cmmd = cfg.get("metrics", {}).get("cmmd", {}).get("enabled", True)  # false: no CMMD job at all
    jobs = {
        "encode": int(cfg.get("autoencoder", {}).get("path") is not None),  # latent diffusion
        "reference": 1,
        "real_set": int(n_scored > n_sets),
        "feature_net": int(classifier),
        "cmmd_reference": int(cmmd),
        "train_full": 1,
        "train_shallow": n_shallow,
        "train_early_exit": n_classifiers,
        "sample_full": 1,
        "sample_fewer_steps": n_fewer,
        "sample_shallow": n_shallow,
        "sample_early_exit": n_classifiers * n_thresholds,
        "sample_duodiff": n_shallow * n_t_switch,
        "sample_cache": len(cfg.get("cache", {}).get("interval", [])),
        "train_router": int(bool(l2c_sets(cfg))),  # one router for every l2c set
        "sample_l2c": len(l2c_sets(cfg)),
        **{rule: [composed_rule(name) for name in composed_sets(cfg)].count(rule)
           for rule in {composed_rule(name) for name in composed_sets(cfg)}},
        "score": n_scored,  # Inception's and (headline classifier) the classifier's scores, one job a set
        "cmmd": n_scored if cmmd else 0,
        "flops": 1,  # one job counts every sample set
        # Round 0 of every searched family: the rounds after it, and their probes, are planned only
        # once round 0 has run (checkpoint search_round, rules/search.smk).
        "search_round": search_family_count(cfg),
        "search_result": search_family_count(cfg),  # each family's finished trace, asked for by rule all
        "timing": 1,  # one job times every sample set, alone
        "tables": 1,
        "plots": 1,
        "all": 1,
    }
    return {rule: count for rule, count in jobs.items() if count}


def search_family_count(cfg: dict) -> int:
    """Families searched (rules/common.smk, search_families): fewer steps, early exit per
    classifier type, DuoDiff per shallow depth, each composed entry, and caching."""
    if not cfg.get("search", {}).get("enabled", True):
        return 0
    return (int(bool(cfg["sampling"].get("fewer_steps", []))) + len(cfg["early_exit"]["classifier_types"])
            + len(cfg["models"]["shallow"]) * int(bool(cfg["duodiff"]["t_switch"])) + len(cfg.get("composed", []))
            + int(bool(cfg.get("cache", {}).get("interval", []))) + int(bool(l2c_sets(cfg))))


def test_a_dry_run_plans_round_0_of_every_family_with_its_grid(dry_runs):
    _, results = dry_runs
    jobs = planned_jobs(results["tiny_commands"].stdout, "search_round")
    assert sorted((job["wildcards"]["family"], job["wildcards"]["round"]) for job in jobs) == [
        ("cache-k1", "0"), ("composed-duodiff_d1_ts2_cache_N_k1", "0"),
        ("composed-duodiff_d1_ts2_ee_attention_probe_thr_steps4", "0"), ("duodiff-d1", "0"),
        ("early_exit-attention_probe", "0"), ("fewer_steps", "0"), ("l2c", "0")]
    grid = {job["wildcards"]["family"]: job["input"] for job in jobs}
    assert grid["early_exit-attention_probe"] == {
        f"results/tiny/metrics/{name}/fd_classifier.json"
        for name in ("full", "ee_attention_probe_thr0.1", "ee_attention_probe_thr0.5")
    }
    assert "--grid 0.1 0.5" in results["tiny_commands"].stdout and "--budget 1" in results["tiny_commands"].stdout


def modified(cfg: dict, edit) -> dict:
    cfg = copy.deepcopy(cfg)
    edit(cfg)
    return cfg


def label_dropout_in_one_training(cfg, workdir):
    # Class-conditional models with the null class (digits' 10 classes + 1), dropout for the full model only.
    for key, path in (("full", cfg["models"]["full"]), ("shallow", cfg["models"]["shallow"][0])):
        model = workdir / f"cond_{key}.yaml"
        model.write_text(yaml.safe_dump(load(path) | {"num_classes": 11}))
        cfg["models"][key] = model.name if key == "full" else [model.name]
    cfg["train"]["full"]["label_dropout"] = 0.1


# ---- the DAG of every shipped config ------------------------------------------------------------


@pytest.fixture(scope="session")
def dry_runs(tmp_path_factory):
    """`snakemake -n` of every shipped config, plus one targeted and two profile runs, run
    side by side (each is mostly Snakemake's start-up)."""
    workdir = add_autoencoders(make_workdir(tmp_path_factory.mktemp("dry")))
    runs = {config: ("--configfile", config, "-n") for config in SHIPPED_CONFIGS}
    runs["tiny_latent"] = ("--configfile", TINY_LATENT, "-n", "-p")
    runs["target"] = ("--configfile", "config/config.yaml", "-n", "results/digits/tables/fid.csv")
    # The design card's usage: the configured experiment's table at results/tables/.
    runs["legacy_target"] = ("--configfile", "config/config.yaml", "-n", "results/tables/fid.csv")
    runs["tiny_commands"] = ("--configfile", TINY, "-n", "-p")
    # The same study under another experiment name, as a user who runs a second config in the same folder.
    (workdir / "tiny_other.yaml").write_text(yaml.safe_dump(load(TINY) | {"experiment": OTHER_EXPERIMENT}))
    runs["tiny_other"] = ("--configfile", "tiny_other.yaml", "-n")
    # What profiles/slurm's `set-resources: {train_full: {gpu: 2}}` does to the training commands.
    runs["tiny_two_gpus"] = ("--configfile", TINY, "-n", "-p", "--set-resources", "train_full:gpu=2")
    runs["profile_slurm"] = ("--profile", "profiles/slurm", "--configfile", "config/config.yaml", "-n")
    # A sampling variant laid over its study: config/variants/cifar10_dpm_solver.yaml.
    runs["variant"] = ("--configfile", "config/cifar10.yaml", "config/variants/cifar10_dpm_solver.yaml", "-n", "-p")
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = dict(zip(runs, pool.map(lambda args: snakemake(workdir, *args), runs.values())))
    return workdir, results


@pytest.mark.parametrize("study, model", [("cifar10", "cifar10_pretrained"), ("celeba64", "celeba64_pretrained")])
def test_released_pixel_checkpoint_plans_with_uvits_continuous_recipe(tmp_path, study, model):
    """config/README.md's recipe for U-ViT's released CIFAR-10 / CelebA checkpoints laid over the
    study: the VP-SDE, t * 999, the Euler-Maruyama reverse SDE with 1,000 steps, the checkpoint
    converted instead of trained (an empty file stands in for the checkpoint: a dry run only needs it there)."""
    workdir = make_workdir(tmp_path)
    (workdir / "assets").mkdir()
    (workdir / "assets" / f"{study}_uvit_small.pth").touch()
    overlay = {"diffusion": {"num_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
                             "parametrization": "predict_noise", "noise_process": "vp_sde", "time_input": "t_times_999"},
               "models": {**load(f"config/{study}.yaml")["models"], "full": f"config/models/{model}.yaml",
                          "full_checkpoint": f"assets/{study}_uvit_small.pth"},
               "sampling": {**load(f"config/{study}.yaml")["sampling"], "sampler": "euler_maruyama", "steps": 1000},
               "duodiff": {"t_switch": [300]}}
    (workdir / "released.yaml").write_text(yaml.safe_dump(overlay))
    result = snakemake(workdir, "--configfile", f"config/{study}.yaml", "released.yaml", "-n", "-p")
    assert result.returncode == 0, result.stderr[-3000:]
    counts = job_counts(result.stdout)
    assert counts.get("convert_full") == 1 and "train_full" not in counts
    assert "--sampler euler_maruyama" in result.stdout and "--steps 1000" in result.stdout
    assert "--noise-process vp_sde" in result.stdout and "--time-input t_times_999" in result.stdout


@pytest.mark.parametrize("config", SHIPPED_CONFIGS)
def test_dry_run_plans_one_job_per_grid_point(dry_runs, config):
    _, results = dry_runs
    result = results[config]
    assert result.returncode == 0, result.stderr
    assert job_counts(result.stdout) == expected_jobs(load(config))


@pytest.mark.parametrize(
    "config", ["config/cifar10.yaml", "config/celeba64.yaml", "config/imagenet64.yaml", "config/imagenet256.yaml"]
)
def test_dry_run_of_a_cluster_config_warns_about_the_missing_data(dry_runs, config):
    # The data roots of the paper configs do not exist here: planning still works, and says so.
    _, results = dry_runs
    root = load(config)["dataset"]["root"]
    assert f"dataset.root {root} does not exist" in results[config].stdout + results[config].stderr
    autoencoder = load(config).get("autoencoder", {}).get("path")
    if autoencoder is not None:  # nor does the latent config's autoencoder: planned all the same
        assert f"autoencoder.path {autoencoder} does not exist" in results[config].stdout + results[config].stderr


def test_paper_configs_have_the_papers_settings():
    cifar = load("config/cifar10.yaml")
    assert load(cifar["models"]["full"])["depth"] == 13 and load(cifar["models"]["full"])["patch_size"] == 2
    assert [model_depth(p) for p in cifar["models"]["shallow"]] == [3]
    assert cifar["train"]["full"]["n_steps"] == cifar["train"]["shallow"]["n_steps"] == 500_000
    assert cifar["train"]["early_exit"]["n_steps"] == 100_000
    assert cifar["train"]["full"]["batch_size"] == 128 and cifar["train"]["full"]["ema_decay"] == 0.9999
    assert cifar["train"]["full"]["use_amp"] and cifar["device"] == "cuda"
    assert (cifar["sampling"]["sampler"], cifar["sampling"]["steps"]) == ("ddpm", 1000)
    assert cifar["sampling"]["n_samples"] == 50_000
    assert len(cifar["early_exit"]["classifier_types"]) == 4
    celeba = load("config/celeba64.yaml")
    assert [model_depth(p) for p in celeba["models"]["shallow"]] == [3, 5, 7]
    assert 300 in celeba["duodiff"]["t_switch"]
    assert load(load("config/imagenet64.yaml")["models"]["full"])["num_classes"] == 1000
    imagenet256 = load("config/imagenet256.yaml")
    full = load(imagenet256["models"]["full"])  # U-ViT-L/2 in KL-f8 latents, 1000 classes + the null class
    assert (full["depth"], full["embed_dim"], full["num_heads"], full["patch_size"]) == (21, 1024, 16, 2)
    assert (full["in_chans"], full["img_size"], full["num_classes"]) == (4, 32, 1001)
    assert [model_depth(p) for p in imagenet256["models"]["shallow"]] == [3]
    assert imagenet256["autoencoder"] == {"path": "assets/stable-diffusion/autoencoder_kl.pth", "batch_size": 64,
                                          "config": "config/autoencoders/sd-kl-f8.json", "scale_factor": 0.18215}
    assert imagenet256["dataset"]["image_size"] == 256 and imagenet256["sampling"]["n_samples"] == 50_000
    # U-ViT-L/2's recipe (train_ldm.py, eval_ldm.py; libs/autoencoder.py's scale 0.18215): the
    # continuous VP-SDE, t * 999, DPM-Solver-fast 50 steps, guidance scale 0.4 on label dropout 0.15.
    assert imagenet256["diffusion"] | {"parametrization": None} == {
        "num_timesteps": 1000, "noise_process": "vp_sde", "sde_beta_min": 0.1, "sde_beta_max": 20.0,
        "time_input": "t_times_999", "parametrization": None}  # fmt: skip
    assert (imagenet256["sampling"]["sampler"], imagenet256["sampling"]["steps"]) == ("dpm_solver_fast", 50)
    assert imagenet256["sampling"]["guidance_scale"] == 0.4
    assert {imagenet256["train"][stage]["label_dropout"] for stage in ("full", "shallow", "early_exit")} == {0.15}


def test_latent_dry_runs_encode_once_train_on_the_latents_and_decode_every_set(dry_runs):
    _, results = dry_runs
    result = results["tiny_latent"]
    assert result.returncode == 0, result.stderr
    cfg = load(TINY_LATENT)
    assert job_counts(result.stdout) == expected_jobs(cfg)
    commands = planned_commands(result.stdout)
    latents = "results/tiny_latent/latents/latents.npz"
    (encode,) = [flags for name, flags in commands if name == "encode"]
    assert (encode["--output"], encode["--autoencoder"], encode["--scale-factor"]) == (latents, "tiny_autoencoder", "0.5")
    assert (encode["--dataset"], encode["--batch-size"]) == ("digits", "256")
    assert encode["--restart"] is True  # chunks of other images or settings are discarded, not refused
    train = [flags for name, flags in commands if name == "train"]
    assert len(train) == 3 and all(flags["--latents"] == latents for flags in train)
    samples = [flags for name, flags in commands if name == "sample"]
    assert len(samples) == len(expected_sets(cfg))
    assert all((f["--autoencoder"], f["--scale-factor"]) == ("tiny_autoencoder", "0.5") for f in samples)
    assert all("--autoencoder-config" not in f for f in samples)  # a folder has its own config.json
    for rule in ("train_full", "train_shallow", "train_early_exit"):
        assert all(latents in job["input"] for job in planned_jobs(result.stdout, rule)), rule
    # flops counts the decoder from the folder's config.json: the folder is its input.
    assert all("tiny_autoencoder" in job["input"] for job in planned_jobs(result.stdout, "flops"))
    # The pixel-space tiny study has none of it.
    commands = planned_commands(results["tiny_commands"].stdout)
    assert not any(name == "encode" or "--latents" in flags or "--autoencoder" in flags for name, flags in commands)


def test_imagenet256_dry_run_plans_the_latent_path(dry_runs):
    _, results = dry_runs
    counts = job_counts(results["config/imagenet256.yaml"].stdout)
    for rule in ("encode", "train_full", "train_shallow", "train_early_exit", "sample_full", "sample_shallow",
                 "sample_early_exit", "sample_duodiff", "score", "flops", "tables"):  # fmt: skip
        assert counts.get(rule, 0) >= 1, rule
    assert counts["encode"] == 1


@pytest.mark.parametrize(("run", "copies"), [("target", {}), ("legacy_target", {"table_copy": 1})])
def test_a_table_target_plans_exactly_what_the_tables_need(dry_runs, run, copies):
    # tables read every set's stats, scores and timing (the measured speed-ups); the plots and `all`
    # are not needed for them. `snakemake results/tables/fid.csv` (the design card's usage) builds
    # the study's own table in results/digits/ and copies it there.
    _, results = dry_runs
    result = results[run]
    assert result.returncode == 0, result.stderr
    expected = expected_jobs(load("config/config.yaml"))
    del expected["plots"], expected["all"]
    assert job_counts(result.stdout) == {**expected, **copies}
    if copies:
        assert "results/digits/tables/fid.csv" in result.stdout and "output: results/tables/fid.csv" in result.stdout


def planned_files(output: str) -> set:
    """Every output, log and benchmark file of a dry run's jobs."""
    files = set()
    for line in output.splitlines():
        key, _, paths = line.strip().partition(": ")
        if key in ("output", "log", "benchmark") and line.startswith("    "):
            files.update(path.strip() for path in paths.split(","))
    return files


def test_two_experiments_keep_their_files_apart(dry_runs):
    # One study per folder: every file a job writes, tables, plots, logs and benchmarks included,
    # lies under results/<experiment>/, so running a second config beside the first keeps both.
    _, results = dry_runs
    files = {}
    for run, experiment in (("tiny_commands", "tiny"), ("tiny_other", OTHER_EXPERIMENT)):
        assert results[run].returncode == 0, results[run].stderr
        files[experiment] = planned_files(results[run].stdout)
        outside = [path for path in files[experiment] if not path.startswith(f"results/{experiment}/")]
        assert not outside, outside
        for name in ("tables/fid.csv", "tables/summary.md", "plots/quality_vs_gflops.png", "logs/tables.log",
                     "benchmarks/plots.tsv"):  # fmt: skip
            assert f"results/{experiment}/{name}" in files[experiment], name
    assert not files["tiny"] & files[OTHER_EXPERIMENT]
    # The same jobs, each in its own experiment's folder.
    renamed = {path.replace(f"results/{OTHER_EXPERIMENT}/", "results/tiny/", 1) for path in files[OTHER_EXPERIMENT]}
    assert renamed == files["tiny"]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("config", [*SHIPPED_CONFIGS, TINY])
def test_make_writes_each_experiments_report_in_its_own_folder(config):
    # `make run` / `make report` read the experiment name from the config file (-n: print only).
    result = subprocess.run(["make", "-n", "-s", "report", f"CONFIG={config}"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"--configfile {config} --report results/{load(config)['experiment']}/report.html" in result.stdout


def planned_commands(output: str) -> list:
    """The `duodiff` command lines of a dry run with -p, each as (sub-command, {flag: value})."""
    commands = []
    for line in output.splitlines():
        if not line.startswith("Shell command: duodiff "):
            continue
        words = shlex.split(line.removeprefix("Shell command: ").split(" > ")[0])
        flags, key = {}, None
        for word in words[2:]:
            if word.startswith("--"):
                key = word
                flags[key] = True
            else:
                flags[key] = word if flags[key] is True else f"{flags[key]} {word}"
        commands.append((words[1], flags))
    return commands


def test_a_sampling_variant_samples_its_studys_models_and_trains_nothing_of_its_own(dry_runs):
    _, results = dry_runs
    result = results["variant"]
    assert result.returncode == 0, result.stderr
    commands = planned_commands(result.stdout)
    trains = [flags for name, flags in commands if name == "train"]
    samples = [flags for name, flags in commands if name == "sample"]
    assert trains and all(flags["--log-path"].startswith("results/cifar10/models/") for flags in trains)
    base, variant = load("config/cifar10.yaml"), load("config/variants/cifar10_dpm_solver.yaml")
    # Snakemake lays the second config file over the first key by key.
    merged = base | variant | {key: base[key] | variant[key] for key in ("models", "sampling", "duodiff")}
    assert len(samples) == len(expected_sets(merged))
    for flags in samples:
        assert flags["--output-folder"].startswith("results/cifar10_dpm_solver/samples/")
        assert flags["--checkpoint-path"].startswith("results/cifar10/models/")
        assert flags["--sampler"] == "dpm_solver" and flags["--steps"] in ("20", "10")
    assert sorted(int(f["--t-switch"]) for f in samples if "--t-switch" in f) == list(range(2, 20, 2))


@pytest.mark.parametrize("study", ["cifar10", "celeba64", "imagenet64"])
def test_each_paper_study_has_a_dpm_solver_variant_of_its_grids(study):
    variant = load(f"config/variants/{study}_dpm_solver.yaml")
    base = load(f"config/{study}.yaml")
    assert variant["models"] == {"trained_in": base["experiment"]} and variant["experiment"] != base["experiment"]
    assert variant["sampling"]["sampler"] == "dpm_solver"
    # The same tenths of the trajectory as the study's own t_switch grid.
    steps = variant["sampling"]["steps"]
    assert [t * base["sampling"]["steps"] // steps for t in variant["duodiff"]["t_switch"]] == base["duodiff"]["t_switch"]


def test_training_gets_one_process_per_gpu_of_its_job(dry_runs):
    _, results = dry_runs
    for run, full_processes in (("tiny_commands", "0"), ("tiny_two_gpus", "2")):
        result = results[run]
        assert result.returncode == 0, result.stderr
        train = [flags for name, flags in planned_commands(result.stdout) if name == "train"]
        jobs = expected_jobs(load(TINY))
        assert len(train) == jobs["train_full"] + jobs["train_shallow"] + jobs["train_early_exit"]
        for flags in train:
            expected = full_processes if flags["--log-path"].endswith("models/full") else "0"
            assert flags["--nproc-per-node"] == expected, flags["--log-path"]


def test_every_setting_reaches_its_command(dry_runs):
    # Each config key becomes the flag of the same name, with the configured value (or the
    # schema default), so a changed setting changes the job's params and reruns it.
    _, results = dry_runs
    result = results["tiny_commands"]
    assert result.returncode == 0, result.stderr
    commands = planned_commands(result.stdout)
    cfg = load(TINY)
    train = [flags for name, flags in commands if name == "train"]
    full = next(f for f in train if f["--log-path"].endswith("models/full"))
    for key, value in cfg["train"]["full"].items():
        assert full[f"--{key.replace('_', '-')}"] == str(value), key
    assert (full["--model"], full["--config-path"], full["--dataset"], full["--device"]) == (
        "uvit", cfg["models"]["full"], "digits", "cpu")
    assert full["--num-timesteps"] == "1000" and full["--grad-clip"] == "1.0"  # schema defaults
    assert "--freeze-backbone" not in full
    early = next(f for f in train if f["--model"] == "early_exit")
    assert early["--load-backbone"] == "results/tiny/models/full/model.pt"
    assert early["--freeze-backbone"] is True and early["--n-steps"] == str(cfg["train"]["early_exit"]["n_steps"])
    samples = [flags for name, flags in commands if name == "sample"]
    assert len(samples) == len(expected_sets(cfg))
    # Every set samples with the configured steps, but the fewer-steps sets and composed sets with
    # steps in their name with their own.
    steps = sorted(flags["--steps"] for flags in samples)
    own = [str(n) for n in cfg["sampling"]["fewer_steps"]]
    own += [name.rsplit("_steps", 1)[1] for name in composed_sets(cfg) if "_steps" in name]
    expected_steps = [str(cfg["sampling"]["steps"])] * (len(samples) - len(own))
    assert steps == sorted(expected_steps + own)
    for flags in samples:
        assert (flags["--n-samples"], flags["--batch-size"], flags["--sampler"]) == (
            str(cfg["sampling"]["n_samples"]), str(cfg["sampling"]["batch_size"]), "ddim")
        assert flags["--precision"] == "fp32"  # the schema default
        assert "--no-ema" not in flags
    plain = [f for f in samples if Path(f["--output-folder"]).name not in composed_sets(cfg)]
    duodiff = [f for f in plain if f["--method"] == "duodiff"]
    assert sorted(int(f["--t-switch"]) for f in duodiff) == sorted(cfg["duodiff"]["t_switch"])
    assert all(f["--checkpoint-path-late"] == "results/tiny/models/full/model.pt" for f in duodiff)
    # The composed set of all three ingredients: the shallow model, then the early-exit model.
    composed_flags = {Path(f["--output-folder"]).name: f for f in samples if Path(f["--output-folder"]).name in composed_sets(cfg)}
    composed = next(f for name, f in composed_flags.items() if "_ee_" in name)
    cached = next(f for name, f in composed_flags.items() if "_cache_" in name)
    assert len(composed_flags) == 2
    assert (composed["--checkpoint-path"], composed["--checkpoint-path-late"]) == (
        "results/tiny/models/shallow_d1/model.pt", "results/tiny/models/ee_attention_probe/model.pt")
    assert (composed["--t-switch"], composed["--threshold"], composed["--steps"]) == ("2", "0.5", "4")
    # DuoDiff with caching: the shallow model, then the full model cached
    assert (cached["--checkpoint-path"], cached["--checkpoint-path-late"]) == (
        "results/tiny/models/shallow_d1/model.pt", "results/tiny/models/full/model.pt")
    assert (cached["--t-switch"], cached["--cache-interval"], cached["--cache-keep"]) == ("2", "2", "1")
    assert "--threshold" not in cached
    early_sets = [f for f in plain if f["--method"] == "early_exit"]
    assert sorted(float(f["--threshold"]) for f in early_sets) == sorted(cfg["early_exit"]["thresholds"])
    # CMMD: the reference is embedded by one job, with the same settings as every set's job.
    (embed_reference,) = [flags for name, flags in commands if name == "cmmd-reference"]
    cmmd = [flags for name, flags in commands if name == "cmmd"]
    assert len(cmmd) == len(scored_sets(cfg))  # the real-data set is scored too
    for flags in [embed_reference, *cmmd]:
        assert flags["--batch-size"] == str(cfg["metrics"]["cmmd"]["batch_size"]) and "--max-count" not in flags
    assert embed_reference["--output"] == "results/tiny/reference/clip_embeddings.npz"
    assert all(flags["--reference"] == embed_reference["--output"] for flags in cmmd)
    tables = next(flags for name, flags in commands if name == "tables")
    assert sorted(tables["--sets"].split()) == sorted(scored_sets(cfg))
    assert tables["--headline"] == cfg["metrics"]["headline"]
    # The headline FD: every scored set through the feature network too, in the job that scores it
    # with Inception (`duodiff score` writes both files into the set's metrics folder).
    scores = [flags for name, flags in commands if name == "score"]
    assert sorted(flags["--output-dir"] for flags in scores) == sorted(f"results/tiny/metrics/{s}" for s in scored_sets(cfg))
    assert all(flags["--feature-net"] == "results/tiny/feature_net/model.pt" for flags in scores)
    (net,) = [flags for name, flags in commands if name == "feature-net"]
    assert (net["--epochs"], net["--feature-dim"]) == ("2", "16")
    (real,) = [flags for name, flags in commands if name == "real-set"]
    assert (real["--n-reference"], real["--n-images"]) == ("16", "8")
    # One split for both sides (reference.split_seed, default 0): the floor never takes a reference image.
    (reference_flags,) = [flags for name, flags in commands if name == "reference"]
    assert real["--split-seed"] == reference_flags["--split-seed"] == "0"


def planned_jobs(output: str, rule: str) -> list:
    """The jobs of `rule` in a dry run's output, each as {"input": set of paths, "wildcards": {...}}."""
    jobs, job = [], None
    for line in output.splitlines():
        if re.fullmatch(r"(local)?(?:rule|checkpoint) \w+:", line):
            job = {"input": set(), "wildcards": {}} if line.split()[-1] == f"{rule}:" else None
            if job is not None:
                jobs.append(job)
        elif job is not None and line.startswith("    input: "):
            job["input"] = {path.strip() for path in line.removeprefix("    input: ").split(",")}
        elif job is not None and line.startswith("    wildcards: "):
            job["wildcards"] = dict(item.split("=", 1) for item in line.removeprefix("    wildcards: ").split(", "))
    return jobs


def test_every_file_a_job_reads_is_its_input(dry_runs):
    # So Snakemake orders the jobs right and reruns a job whose files changed: `duodiff flops`
    # builds the networks from the checkpoints that stats.json names, `duodiff fid` reads the whole
    # reference folder (and with --feature-net the network's feature_net.json beside it), and
    # `duodiff plots` checks the real-data set's folder like every set's.
    _, results = dry_runs
    output = results["tiny_commands"].stdout
    cfg, root = load(TINY), "results/tiny"
    full = f"{root}/models/full/model.pt"

    def models(name):  # from the set name's grammar (docs/architecture.md)
        if name == "full" or name.startswith(("full_steps", "cache_", "l2c_")):  # caching reuses the full model's work
            return {full}
        if name.startswith("shallow_d"):
            return {f"{root}/models/{name}/model.pt"}
        if name.startswith("ee_"):
            return {f"{root}/models/{name[:name.rindex('_thr')]}/model.pt"}
        depth = name.split("_")[1]  # duodiff_d<depth>_ts<t_switch>: the shallow model, then the full one
        return {f"{root}/models/shallow_{depth}/model.pt", full}

    (flops,) = planned_jobs(output, "flops")  # one job counts every set: it reads every set's models
    assert {path for path in flops["input"] if path.endswith("model.pt")} == set().union(*map(models, expected_sets(cfg)))
    for name in expected_sets(cfg):
        assert {f"{root}/samples/{name}/stats.json", f"{root}/samples/{name}/exit_layers.pt"} <= flops["input"], name
    # ... and writes each set's gflops.json from that set's folder.
    ((_, flags),) = [command for command in planned_commands(output) if command[0] == "flops"]
    pairs = list(zip(flags["--samples"].split(), flags["--output"].split()))
    assert pairs == [(f"{root}/samples/{name}", f"{root}/metrics/{name}/gflops.json") for name in expected_sets(cfg)]
    reference = {f"{root}/reference/features.npz", f"{root}/reference/reference.json"}
    for job in planned_jobs(output, "score"):
        assert reference | {f"{root}/feature_net/model.pt", f"{root}/feature_net/feature_net.json"} <= job["input"]
    (plots,) = planned_jobs(output, "plots")
    assert f"{root}/samples/real/stats.json" in plots["input"]


def planned_threads(output: str, rule: str) -> list:
    """The `threads:` of each job of `rule` in a dry run's output."""
    threads, current = [], None
    for line in output.splitlines():
        if re.fullmatch(r"(local)?(?:rule|checkpoint) \w+:", line):
            current = line.split()[-1] == f"{rule}:"
        elif current and line.startswith("    threads: "):
            threads.append(int(line.removeprefix("    threads: ")))
    return threads


def test_one_timing_job_times_every_set_alone(dry_runs):
    # `duodiff time` reads every set's stats.json and the models they name, times them all in one
    # job against the full model, and asks for every core, so that nothing runs beside it.
    from snakemake.utils import available_cpu_count

    _, results = dry_runs
    output = results["tiny_commands"].stdout
    cfg, root = load(TINY), "results/tiny"
    (job,) = planned_jobs(output, "timing")
    assert {f"{root}/samples/{name}/stats.json" for name in expected_sets(cfg)} <= job["input"]
    models = {f"{root}/models/{name}/model.pt" for name in ("full", "shallow_d1", "ee_attention_probe")}
    assert {path for path in job["input"] if path.endswith("model.pt")} == models
    ((_, flags),) = [command for command in planned_commands(output) if command[0] == "time"]
    # Then the searches' probes, which a dry run cannot know yet (Snakemake holds their place with
    # <TBD>, and names the inputs after it out of place: what follows the sets is not checked).
    expected = [f"{root}/samples/{name}" for name in expected_sets(cfg)]
    assert flags["--samples"].split()[: len(expected)] == expected
    assert (flags["--baseline"], flags["--output-dir"], flags["--device"]) == ("full", f"{root}/timing", "cpu")
    timing = cfg["timing"]
    assert (flags["--rounds"], flags["--batch-size"], flags["--threads"]) == tuple(
        str(timing[key]) for key in ("rounds", "batch_size", "threads"))  # fmt: skip
    # profiles/default gives Snakemake every core (`cores: all`); the timing job takes them all.
    assert planned_threads(output, "timing") == [available_cpu_count()]
    assert f"{root}/timing/timing.json" in planned_files(output)


# ---- profiles ----------------------------------------------------------------------------------------


def snakemake_options() -> set:
    from snakemake.cli import get_argument_parser

    return {option for action in get_argument_parser()._actions for option in action.option_strings}


@pytest.mark.parametrize("profile", ["default", "slurm"])
def test_profile_keys_are_snakemake_options(profile):
    settings = load(f"profiles/{profile}/config.yaml")
    unknown = [key for key in settings if f"--{key}" not in snakemake_options()]
    assert unknown == []


def test_slurm_profile_uses_the_plugin_settings_and_resources_it_knows(dry_runs):
    from snakemake_executor_plugin_slurm import ExecutorSettings

    settings = load("profiles/slurm/config.yaml")
    assert settings["executor"] == "slurm"
    plugin_fields = {f.name for f in dataclasses.fields(ExecutorSettings)}
    plugin_keys = [k.removeprefix("slurm-").replace("-", "_") for k in settings if k.startswith("slurm-")]
    assert plugin_keys and set(plugin_keys) <= plugin_fields
    # set-resources silently ignores a misspelt rule name: every name must be a rule of the DAG.
    _, results = dry_runs
    rules = set().union(*(job_counts(results[config].stdout) for config in SHIPPED_CONFIGS))
    assert set(settings["set-resources"]) <= rules
    for rule in GPU_RULES:
        assert settings["set-resources"][rule]["gpu"] == 1, rule
    for resources in [settings["default-resources"], *settings["set-resources"].values()]:
        assert not re.search(r"--(gres|gpus)\b", str(resources.get("slurm_extra", "")))


def test_slurm_profile_is_not_overridden_by_the_workflow_profile(tmp_path, monkeypatch):
    # Snakemake also applies profiles/default to every run from the repository; it must not turn
    # the slurm executor back into the local one.
    from snakemake.cli import parse_args

    monkeypatch.chdir(make_workdir(tmp_path))
    _, args = parse_args(["--snakefile", str(SNAKEFILE), "--profile", "profiles/slurm", "-n"])
    assert args.executor == "slurm"
    assert args.retries == 2 and args.rerun_incomplete
    _, args = parse_args(["--snakefile", str(SNAKEFILE), "-n"])
    assert args.executor in (None, "local") and args.keep_going and args.rerun_incomplete


def test_dry_run_with_each_profile(dry_runs):
    # Every run from the repository applies profiles/default (Snakemake's workflow profile), so
    # the shipped-config runs above already used it; profiles/slurm is added on top here.
    _, results = dry_runs
    assert "workflow specific profile profiles/default" in results["config/config.yaml"].stderr
    result = results["profile_slurm"]
    assert result.returncode == 0, result.stderr
    assert "profiles/slurm" in result.stderr
    assert job_counts(result.stdout) == expected_jobs(load("config/config.yaml"))


def test_a_guided_study_passes_label_dropout_and_the_guidance_scale_to_every_job(tmp_path):
    workdir = make_workdir(tmp_path / "work")

    def guided(c):
        label_dropout_in_one_training(c, workdir)
        for stage in ("full", "shallow", "early_exit"):
            c["train"][stage]["label_dropout"] = 0.15
        c["sampling"]["guidance_scale"] = 0.4

    (workdir / "guided.yaml").write_text(yaml.safe_dump(modified(load(TINY), guided)))
    for configfile, dropout, scale in (("guided.yaml", "0.15", "0.4"), (TINY, None, None)):
        result = snakemake(workdir, "--configfile", configfile, "-n", "-p")
        assert result.returncode == 0, result.stderr
        commands = planned_commands(result.stdout)
        trains = [flags for name, flags in commands if name == "train"]
        samples = [flags for name, flags in commands if name == "sample"]
        assert trains and samples
        # Unguided studies keep their command lines as they were (no flag at its default 0).
        assert all(flags.get("--label-dropout") == dropout for flags in trains)
        assert all(flags.get("--guidance-scale") == scale for flags in samples)
    # Started from a published checkpoint, train.full.label_dropout is the published model's: recorded.
    (workdir / "uvit.pth").write_bytes(b"")  # a dry run reads no input
    published = modified(load(workdir / "guided.yaml"), lambda c: c["models"].update(full_checkpoint="uvit.pth"))
    (workdir / "published.yaml").write_text(yaml.safe_dump(published))
    result = snakemake(workdir, "--configfile", "published.yaml", "-n", "-p")
    assert result.returncode == 0, result.stderr
    (convert,) = [flags for name, flags in planned_commands(result.stdout) if name == "convert"]
    assert convert["--label-dropout"] == "0.15" and convert["--dataset"] == "digits"


