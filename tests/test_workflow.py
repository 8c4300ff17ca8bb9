"""The Snakemake workflow: the DAG each shipped config plans, config validation, the profiles, and
(slow) the whole tiny study end to end.

Expected job counts are computed here from the config values alone (one training per model, one
sample set per grid point, three scores per set), not from the workflow's own helpers. Snakemake
runs as a subprocess, as users run it, in a scratch folder that links config/, tests/ and
profiles/ from the repository, so no test touches the checkout's results/ or .snakemake/.
"""

from __future__ import annotations

import ast
import copy
import csv
import dataclasses
import json
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
    )


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
        "score": n_scored,  # Inception's and (headline classifier) the classifier's scores, one job a set
        "cmmd": n_scored if cmmd else 0,
        "flops": 1,  # one job counts every sample set
        "timing": 1,  # one job times every sample set, alone
        "tables": 1,
        "plots": 1,
        "all": 1,
    }
    return {rule: count for rule, count in jobs.items() if count}


# ---- the DAG of every shipped config ------------------------------------------------------------


@pytest.fixture(scope="session")
def dry_runs(tmp_path_factory):
    """`snakemake -n` of every shipped config, plus one targeted and two profile runs, run
    side by side (each is mostly Snakemake's start-up)."""
    workdir = add_autoencoders(make_workdir(tmp_path_factory.mktemp("dry")))
    runs = {config: ("--configfile", config, "-n") for config in SHIPPED_CONFIGS}
    runs["tiny_latent"] = ("--configfile", TINY_LATENT, "-n", "-p")
    runs["target"] = ("--configfile", "config/config.yaml", "-n", "results/digits/tables/fid.csv")
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
                                          "config": "config/autoencoders/sd-kl-f8.json", "scale_factor": 0.23010}
    assert imagenet256["dataset"]["image_size"] == 256 and imagenet256["sampling"]["n_samples"] == 50_000
    # U-ViT's configs/imagenet256_uvit.py and train_ldm_discrete.py: Stable Diffusion's schedule,
    # DPM-Solver 50 steps, guidance scale 0.4 on label dropout 0.15.
    assert imagenet256["diffusion"] | {"parametrization": None} == {
        "num_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "parametrization": None}  # fmt: skip
    assert (imagenet256["sampling"]["sampler"], imagenet256["sampling"]["steps"]) == ("dpm_solver", 50)
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


def test_a_table_target_plans_exactly_what_the_tables_need(dry_runs):
    # tables read every set's stats, scores and timing (the measured speed-ups); the plots and `all`
    # are not needed for them.
    _, results = dry_runs
    result = results["target"]
    assert result.returncode == 0, result.stderr
    expected = expected_jobs(load("config/config.yaml"))
    del expected["plots"], expected["all"]
    assert job_counts(result.stdout) == expected


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
    # Every set samples with the configured steps, but the fewer-steps sets with their own.
    steps = sorted(flags["--steps"] for flags in samples)
    expected_steps = [str(cfg["sampling"]["steps"])] * (len(samples) - len(cfg["sampling"]["fewer_steps"]))
    assert steps == sorted(expected_steps + [str(n) for n in cfg["sampling"]["fewer_steps"]])
    for flags in samples:
        assert (flags["--n-samples"], flags["--batch-size"], flags["--sampler"]) == (
            str(cfg["sampling"]["n_samples"]), str(cfg["sampling"]["batch_size"]), "ddim")
        assert flags["--precision"] == "fp32"  # the schema default
        assert "--no-ema" not in flags
    duodiff = [f for f in samples if f["--method"] == "duodiff"]
    assert sorted(int(f["--t-switch"]) for f in duodiff) == sorted(cfg["duodiff"]["t_switch"])
    assert all(f["--checkpoint-path-late"] == "results/tiny/models/full/model.pt" for f in duodiff)
    early_sets = [f for f in samples if f["--method"] == "early_exit"]
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


def planned_jobs(output: str, rule: str) -> list:
    """The jobs of `rule` in a dry run's output, each as {"input": set of paths, "wildcards": {...}}."""
    jobs, job = [], None
    for line in output.splitlines():
        if re.fullmatch(r"(local)?rule \w+:", line):
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
        if name == "full" or name.startswith("full_steps"):
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
        if re.fullmatch(r"(local)?rule \w+:", line):
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
    assert flags["--samples"].split() == [f"{root}/samples/{name}" for name in expected_sets(cfg)]
    assert (flags["--baseline"], flags["--output-dir"], flags["--device"]) == ("full", f"{root}/timing", "cpu")
    timing = cfg["timing"]
    assert (flags["--rounds"], flags["--batch-size"], flags["--threads"]) == tuple(
        str(timing[key]) for key in ("rounds", "batch_size", "threads"))  # fmt: skip
    # profiles/default gives Snakemake every core (`cores: all`); the timing job takes them all.
    assert planned_threads(output, "timing") == [available_cpu_count()]
    assert f"{root}/timing/timing.json" in planned_files(output)


# ---- config validation -----------------------------------------------------------------------------


def modified(cfg: dict, edit) -> dict:
    cfg = copy.deepcopy(cfg)
    edit(cfg)
    return cfg


def _mismatched_shallow(cfg, workdir):
    shallow = load(cfg["models"]["shallow"][0]) | {"patch_size": 4}
    path = workdir / "shallow_patch4.yaml"
    path.write_text(yaml.safe_dump(shallow))
    cfg["models"]["shallow"] = [str(path)]


def _label_dropout_in_one_training(cfg, workdir):
    # Class-conditional models with the null class (digits' 10 classes + 1), dropout for the full model only.
    for key, path in (("full", cfg["models"]["full"]), ("shallow", cfg["models"]["shallow"][0])):
        model = workdir / f"cond_{key}.yaml"
        model.write_text(yaml.safe_dump(load(path) | {"num_classes": 11}))
        cfg["models"][key] = model.name if key == "full" else [model.name]
    cfg["train"]["full"]["label_dropout"] = 0.1


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
    ("threshold above 1", lambda c, w: c["early_exit"].update(thresholds=[0.1, 1.5]),
     "invalid config: early_exit.thresholds[1]: 1.5 is greater than the maximum of 1"),
    ("t_switch beyond the sampling steps", lambda c, w: c["duodiff"].update(t_switch=[2, 7]),
     "invalid config: duodiff.t_switch 7 must be in [0, sampling.steps = 6]"),
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
    ("label dropout in one training only", _label_dropout_in_one_training,
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


# ---- the whole tiny study, end to end -------------------------------------------------------------

ID_COLUMNS = ["set", "method", "setting", "classifier_type", "threshold", "t_switch", "shallow_depth", "n_samples"]
TABLE_COLUMNS = {
    "scores": ["score_name", "score", "score_ci_low", "score_ci_high", "score_diff", "score_diff_ci_low",
               "score_diff_ci_high", "verdict", "margin", "quality_limit", "speedup_measured", "speedup_theoretical"],
    "fid": ["fid", "gflops_per_forward", "gflops_per_image", "layer_ratio", "images_per_s", "speedup_measured",
            "speedup_theoretical", "feature_network"],
    "kid": ["kid", "kid_std", "feature_network"],
    "cmmd": ["cmmd", "available", "reason", "embedding_model"],
    "gflops": ["gflops_per_forward", "gflops_per_forward_linear_conv", "gflops_per_image", "layer_ratio",
               "images_per_s", "speedup_measured", "speedup_theoretical"],
}  # fmt: skip


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory):
    workdir = make_workdir(tmp_path_factory.mktemp("tiny"))
    result = snakemake(workdir, "--configfile", TINY, "--cores", "2", timeout=1800)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    return workdir


@pytest.mark.slow
def test_tiny_study_tables_have_one_row_per_set_and_the_contract_columns(tiny_study):
    sets = expected_sets(load(TINY))
    for table, columns in TABLE_COLUMNS.items():
        with open(tiny_study / "results" / "tiny" / "tables" / f"{table}.csv") as f:
            rows = list(csv.DictReader(f))
        assert sorted(row["set"] for row in rows) == sorted(scored_sets(load(TINY))), table
        assert set(ID_COLUMNS + columns) <= set(rows[0]), table
    for name in ("summary.md", "summary.tex", "summary.html"):
        assert (tiny_study / "results" / "tiny" / "tables" / name).stat().st_size > 0


@pytest.mark.slow
def test_tiny_study_has_the_fewer_steps_baseline_the_floor_and_operating_points(tiny_study):
    tables = tiny_study / "results" / "tiny" / "tables"
    with open(tables / "scores.csv") as f:
        rows = {row["set"]: row for row in csv.DictReader(f)}
    fewer = rows["full_steps3"]
    # The full model, 3 of the 6 sampling steps: half the network evaluations, same network.
    assert (fewer["method"], fewer["steps"], fewer["score_name"]) == ("fewer_steps", "3", "FD")
    assert float(fewer["speedup_theoretical"]) == pytest.approx(6 / 3)
    assert float(fewer["layer_ratio"]) == pytest.approx(1.0) and float(fewer["speedup_measured"]) > 0
    real = rows["real"]
    assert real["method"] == "real" and real["speedup_theoretical"] == "" and float(real["score"]) >= 0
    for row in rows.values():  # every headline score carries its interval
        assert float(row["score_ci_low"]) <= float(row["score_ci_high"]), row["set"]
    with open(tables / "operating_points.csv") as f:
        points = list(csv.DictReader(f))
    assert [p["family"] for p in points] == ["fewer steps", "attention_probe", "shallow depth 1"]
    info = json.loads((tiny_study / "results" / "tiny" / "feature_net" / "feature_net.json").read_text())
    assert 0 <= info["heldout_accuracy"] <= 1 and info["n_heldout"] == 359


@pytest.mark.slow
def test_tiny_study_plots_and_grids_exist(tiny_study):
    for name in PLOTS:
        for suffix in (".png", ".pdf"):
            assert (tiny_study / "results" / "tiny" / "plots" / f"{name}{suffix}").stat().st_size > 0
    for name in expected_sets(load(TINY)):
        assert (tiny_study / "results" / "tiny" / "samples" / name / "grid.png").stat().st_size > 0


@pytest.mark.slow
def test_tiny_study_sample_sets_were_made_with_the_configured_settings(tiny_study):
    cfg = load(TINY)
    sampling = cfg["sampling"]
    for name in expected_sets(cfg):
        stats = json.loads((tiny_study / "results" / "tiny" / "samples" / name / "stats.json").read_text())
        steps = int(name.removeprefix("full_steps")) if name.startswith("full_steps") else sampling["steps"]
        assert (stats["sampler"], stats["steps"], stats["n_samples"], stats["batch_size"], stats["seed"]) == (
            sampling["sampler"], steps, sampling["n_samples"], sampling["batch_size"], sampling["seed"])
        method = {"full": "full", "shallow": "shallow", "ee": "early_exit", "duodiff": "duodiff"}[name.split("_")[0]]
        assert stats["method"] == method
        if method == "early_exit":
            assert stats["threshold"] == float(name.rsplit("_thr", 1)[1])
            assert stats["classifier_type"] == name[len("ee_"):name.rindex("_thr")]
        if method == "duodiff":
            assert stats["t_switch"] == int(name.rsplit("_ts", 1)[1])
            assert stats["shallow_depth"] == int(name.split("_")[1][1:])
        for metric in ("fid", "cmmd", "gflops"):
            assert (tiny_study / "results" / "tiny" / "metrics" / name / f"{metric}.json").is_file()
        rule = {"full": "sample_full", "shallow": "sample_shallow", "early_exit": "sample_early_exit", "duodiff": "sample_duodiff"}[method]
        rule = "sample_fewer_steps" if name.startswith("full_steps") else rule
        assert (tiny_study / "results" / "tiny" / "logs" / rule / f"{name}.log").is_file()
        assert (tiny_study / "results" / "tiny" / "benchmarks" / rule / f"{name}.tsv").is_file()


@pytest.mark.slow
def test_tiny_study_times_every_set_alone(tiny_study):
    study = tiny_study / "results" / "tiny"
    timing = json.loads((study / "timing" / "timing.json").read_text())
    cfg = load(TINY)
    assert list(timing["sets"]) == expected_sets(cfg) and timing["baseline"] == "full"
    assert (timing["rounds"], timing["batch_size"], timing["threads"]) == tuple(
        cfg["timing"][key] for key in ("rounds", "batch_size", "threads"))  # fmt: skip
    assert timing["sets"]["full"]["speedups"] == [1.0] * cfg["timing"]["rounds"]
    with open(study / "timing" / "timing.csv") as f:
        assert [row["set"] for row in csv.DictReader(f)] == expected_sets(cfg)
    assert (study / "logs" / "timing.log").is_file() and (study / "benchmarks" / "timing.tsv").is_file()


@pytest.mark.slow
def test_tiny_study_report_builds(tiny_study):
    result = snakemake(tiny_study, "--configfile", TINY, "--report", "results/tiny/report.html")
    assert result.returncode == 0, result.stderr
    page = (tiny_study / "results" / "tiny" / "report.html").read_text()
    assert "quality_vs_gflops.png" in page and "fid.csv" in page


@pytest.mark.slow
def test_tiny_study_second_run_has_nothing_to_do(tiny_study):
    result = snakemake(tiny_study, "--configfile", TINY, "-n")
    assert result.returncode == 0, result.stderr
    assert "Nothing to be done" in result.stdout + result.stderr


def changed_jobs(workdir: Path, name: str, edit) -> dict:
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(modified(load(TINY), edit)))
    result = snakemake(workdir, "--configfile", path, "-n")
    assert result.returncode == 0, result.stderr
    return job_counts(result.stdout)


@pytest.mark.slow
def test_tiny_study_same_settings_in_another_key_order_change_nothing(tiny_study):
    def reverse(mapping):
        if not isinstance(mapping, dict):
            return mapping
        return {key: reverse(mapping[key]) for key in reversed(list(mapping))}

    path = tiny_study / "reversed.yaml"
    path.write_text(yaml.safe_dump(reverse(load(TINY)), sort_keys=False))
    result = snakemake(tiny_study, "--configfile", path, "-n")
    assert result.returncode == 0, result.stderr
    assert "Nothing to be done" in result.stdout + result.stderr


@pytest.mark.slow
def test_tiny_study_changing_one_threshold_reruns_only_what_depends_on_it(tiny_study):
    cfg = load(TINY)
    n_classifiers = len(cfg["early_exit"]["classifier_types"])

    def edit(c):
        c["early_exit"]["thresholds"][-1] = 0.3

    # One new sample set per classifier type, its scores (one job for FID and FD, one for CMMD),
    # GFLOPs and timing (one job each for every set), and the tables and plots.
    assert changed_jobs(tiny_study, "threshold", edit) == {
        "sample_early_exit": n_classifiers, "score": n_classifiers,
        "cmmd": n_classifiers, "flops": 1, "timing": 1, "tables": 1, "plots": 1, "all": 1,
    }  # fmt: skip


@pytest.mark.slow
def test_tiny_study_changing_a_training_setting_reruns_that_model_and_its_sets(tiny_study):
    n_t_switch = len(load(TINY)["duodiff"]["t_switch"])

    def edit(c):
        c["train"]["shallow"]["lr"] = 0.002

    # The shallow model, the shallow set and every DuoDiff set (they use it), their scores.
    n_sets = 1 + n_t_switch
    assert changed_jobs(tiny_study, "shallow_lr", edit) == {
        "train_shallow": 1, "sample_shallow": 1, "sample_duodiff": n_t_switch,
        "score": n_sets, "cmmd": n_sets, "flops": 1, "timing": 1, "tables": 1, "plots": 1, "all": 1,
    }  # fmt: skip


@pytest.mark.slow
def test_tiny_study_changing_a_metric_setting_rescores_only(tiny_study):
    n_sets = len(expected_sets(load(TINY)))

    def edit(c):
        c.setdefault("metrics", {}).setdefault("fid", {})["kid_subsets"] = 50

    n_scored = len(scored_sets(load(TINY)))
    # kid_subsets is a metrics.fid key, shared by the Inception and the classifier scores.
    assert changed_jobs(tiny_study, "kid_subsets", edit) == {
        "score": n_scored, "tables": 1, "plots": 1, "all": 1}


def test_a_guided_study_passes_label_dropout_and_the_guidance_scale_to_every_job(tmp_path):
    workdir = make_workdir(tmp_path / "work")

    def guided(c):
        _label_dropout_in_one_training(c, workdir)
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


# ---- the latent path, end to end --------------------------------------------------------------------


@pytest.fixture(scope="session")
def latent_study(tmp_path_factory):
    workdir = add_autoencoders(make_workdir(tmp_path_factory.mktemp("latent")))
    result = snakemake(workdir, "--configfile", TINY_LATENT, "--cores", "2", timeout=1800)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    return workdir / "results" / "tiny_latent"


@pytest.mark.slow
def test_latent_study_encodes_trains_samples_decodes_and_scores(latent_study):
    import numpy as np
    from PIL import Image

    cfg = load(TINY_LATENT)
    with np.load(latent_study / "latents" / "latents.npz") as f:
        assert f["latents"].shape == (1797, 4, 4, 4) and f["labels"].shape == (1797,)  # digits: never flipped
    for name in expected_sets(cfg):
        folder = latent_study / "samples" / name
        images = sorted((folder / "images").glob("*.png"))
        assert len(images) == cfg["sampling"]["n_samples"]
        with Image.open(images[0]) as image:
            assert (image.mode, image.size) == ("L", (8, 8))  # decoded digits, not 4x4x4 latents
        stats = json.loads((folder / "stats.json").read_text())
        assert (stats["img_size"], stats["in_chans"], stats["latent_size"], stats["latent_chans"]) == (8, 1, 4, 4)
        assert stats["autoencoder"]["path"] == "tiny_autoencoder" and stats["decode_time_s"] > 0
        gflops = json.loads((latent_study / "metrics" / name / "gflops.json").read_text())
        assert gflops["gflops_decoder_per_image"] > 0 and gflops["gflops_per_image"] > 0
        assert json.loads((latent_study / "metrics" / name / "fid.json").read_text())["fid"] >= 0
    with open(latent_study / "tables" / "gflops.csv") as f:
        rows = {row["set"]: row for row in csv.DictReader(f)}
    assert sorted(rows) == sorted(expected_sets(cfg))
    # The tables' GFLOPs are the network's alone (the papers' convention), not network + decoder.
    full = json.loads((latent_study / "metrics" / "full" / "gflops.json").read_text())
    assert float(rows["full"]["gflops_per_image"]) == pytest.approx(full["gflops_per_image"])
    model = json.loads(json.dumps(load_model_args(latent_study / "models" / "full" / "model.pt")))
    assert model["latents"] == "results/tiny_latent/latents/latents.npz"
    assert model["latents_fingerprint"]["scale_factor"] == 0.5


def load_model_args(path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)["train_args"]
