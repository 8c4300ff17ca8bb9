"""Every bad input a user can give a `duodiff` command, and the one line it gets back.

Each case runs the real CLI in-process and checks: exit status 2, a single line on stderr naming
the bad value and what is allowed (the substrings below), no traceback, and no output written.
Where a refused command finds earlier results in place (NOTHING_LOST), they must survive as they
were. Outputs that cannot be written (a file where a folder must be, a read-only file system) are
checked for every sub-command. The workflow's config-level bad inputs (schema and cross-checks)
are listed in tests/test_workflow.py::BAD_CONFIGS; this file covers the sub-commands.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from duodiff import cli
from duodiff.core.images import save_png
from duodiff.core.io import write_json
from duodiff.models import build_model, checkpoints
from duodiff.models.checkpoints import save_model

CONFIG = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=3, num_heads=2)
DIFFUSION = dict(num_timesteps=50, beta_start=1e-4, beta_end=0.02, parametrization="predict_noise")
SAMPLE = "--sampler ddim --steps 10 --n-samples 4 --batch-size 4 --seed 0"

# (command line with {placeholders}, substrings the one-line message must contain)
BAD_INPUTS = [
    ("train --model gan --config-path {cfg} --log-path {out}", ["--model", "'gan'", "uvit", "early_exit"]),
    ("train --model uvit --config-path {cfg} --log-path {out} --n-steps 0", ["--n-steps", "0"]),
    ("train --model uvit --config-path {cfg} --log-path {out} --batch-size -4", ["--batch-size", "-4"]),
    ("train --model uvit --config-path {cfg} --log-path {out} --dataset mnist", ["--dataset", "'mnist'", "digits", "cifar10"]),
    (
        "train --model early_exit --config-path {cfg} --log-path {out} --classifier-type linear_probe",
        ["--classifier-type", "'linear_probe'", "attention_probe", "mlp_probe_per_layer_per_timestep"],
    ),
    ("train --model uvit --config-path {tmp}/nope.yaml --log-path {out}", ["nope.yaml", "does not exist"]),
    ("train --model uvit --config-path {bad_cfg} --log-path {out}", ["depth", "odd", "4"]),
    (
        "train --model uvit --config-path {cfg_rgb} --log-path {out} --dataset cifar10 --data-root {tmp}/none",
        ["cifar10", "{tmp}/none", "--download"],
    ),
    ("train --model uvit --config-path {cfg} --log-path {out} --dataset cifar10 --data-root {tmp}", ["cifar10", "3 channel", "in_chans 1"]),
    (
        "train --model uvit --config-path {cfg} --log-path {out} --device cpu --nproc-per-node 2 --batch-size 7",
        ["--batch-size 7", "divisible by the number of processes (2)"],
    ),
    ("train --model uvit --config-path {cfg} --log-path {out} --nproc-per-node -1", ["--nproc-per-node", "non-negative integer", "-1"]),
    ("train --model uvit --config-path {cfg} --log-path {out} --label-dropout 0.2",
     ["--label-dropout 0.2 needs a class-conditional model", "num_classes 0"]),
    ("train --model uvit --config-path {cfg} --log-path {out} --label-dropout 1", ["--label-dropout", "[0, 1)", "1.0"]),
    # Guidance needs the null class that label dropout trains: an unconditional model has none.
    ("sample --checkpoint-path {full} --method full --guidance-scale 0.4 " + SAMPLE + " --output-folder {out}",
     ["--guidance-scale 0.4 needs a class-conditional model trained with --label-dropout > 0", "{full} has num_classes 0"]),
    ("sample --checkpoint-path {full} --method fast " + SAMPLE + " --output-folder {out}", ["--method", "'fast'", "duodiff"]),
    ("sample --checkpoint-path {ee} --method early_exit --threshold 1.5 " + SAMPLE + " --output-folder {out}", ["--threshold", "[0, 1]", "1.5"]),
    (
        "sample --checkpoint-path {shallow} --checkpoint-path-late {full} --method duodiff --t-switch 11 " + SAMPLE + " --output-folder {out}",
        ["--t-switch", "[0, 10]", "11"],
    ),
    (
        "sample --checkpoint-path {shallow} --checkpoint-path-late {full} --method duodiff --t-switch -1 " + SAMPLE + " --output-folder {out}",
        ["--t-switch", "non-negative integer", "-1"],
    ),
    ("sample --checkpoint-path {full} --method full --eta -1 " + SAMPLE + " --output-folder {out}", ["--eta", ">= 0", "-1"]),
    # The shallow and full checkpoints swapped, or the same depth twice: refused unless meant.
    (
        "sample --checkpoint-path {full} --checkpoint-path-late {shallow} --method duodiff --t-switch 2 " + SAMPLE + " --output-folder {out}",
        ["--checkpoint-path {full} (3 blocks) must be shallower than --checkpoint-path-late {shallow} (1 block)",
         "swap the two paths", "--allow-deeper-shallow"],
    ),
    # The same file twice is not a swap: it is said so.
    (
        "sample --checkpoint-path {full} --checkpoint-path-late {full} --method duodiff --t-switch 2 " + SAMPLE + " --output-folder {out}",
        ["--checkpoint-path and --checkpoint-path-late are the same file ({full}, 3 blocks)", "--allow-deeper-shallow"],
    ),
    (
        "sample --checkpoint-path {full} --method full --allow-deeper-shallow " + SAMPLE + " --output-folder {out}",
        ["--allow-deeper-shallow", "--method duodiff only", "--method full"],
    ),
    ("sample --checkpoint-path {full} --method full --sampler euler --steps 10 --n-samples 4 --batch-size 4 --seed 0 --output-folder {out}", ["--sampler", "'euler'", "ddim"]),
    ("sample --checkpoint-path {full} --method full --sampler ddim --steps 10 --n-samples 0 --batch-size 4 --seed 0 --output-folder {out}", ["--n-samples", "0"]),
    ("sample --checkpoint-path {truncated} --method full " + SAMPLE + " --output-folder {out}", ["truncated.pt", "truncated or corrupt"]),
    ("sample --checkpoint-path {foreign} --method full " + SAMPLE + " --output-folder {out}", ["foreign.pt", "duodiff-model"]),
    ("reference --dataset digits --n-reference 5000 --output-folder {out}", ["--n-reference 5000", "1797"]),
    ("fid --samples {tmp}/none --reference {tmp}/none --output {out}/fid.json", ["--samples {tmp}/none", "no such folder"]),
    ("fid --samples {tmp} --reference {ref8} --output {out}/fid.json", ["--samples {tmp}", "no images/ folder"]),
    # A set scored only against a reference of its own size, channels and dataset.
    (
        "fid --samples {s8} --reference {ref16} --output {out}/fid.json",
        ["--samples {s8} holds 8x8 images with 1 channel", "--reference {ref16} holds 16x16 images with 1 channel",
         "--image-size 8"],
    ),
    ("fid --samples {s8} --reference {ref8_rgb} --output {out}/fid.json", ["8x8 images with 1 channel", "8x8 images with 3 channels"]),
    (
        "fid --samples {s8_cifar10} --reference {ref8_celeba} --output {out}/fid.json",
        ["--samples {s8_cifar10}", "trained on cifar10", "--reference {ref8_celeba}", "celeba images", "--dataset cifar10"],
    ),
    ("fid --samples {mixed} --reference {ref8} --output {out}/fid.json", ["--samples {mixed}", "different shapes", "8x8", "16x16"]),
    ("fid --samples {s8} --reference {ref_old} --output {out}/fid.json", ["--reference {ref_old}", "lacks dataset, image_size, channels", "duodiff reference"]),
    ("fid --samples {corrupt} --reference {ref8} --output {out}/fid.json", ["{corrupt}/images/000001.png", "truncated or corrupt"]),
    ("fid --samples {tmp}/none --reference {tmp}/none --output {out}/fid.json --chunk-size 0", ["--chunk-size", "positive", "0"]),
    ("cmmd --samples {tmp}/none --reference {tmp}/none --output {out}/cmmd.json --chunk-size 0", ["--chunk-size", "positive", "0"]),
    ("cmmd --samples {tmp}/none --reference {tmp}/none --output {out}/cmmd.json", ["--samples {tmp}/none", "no images/ folder"]),
    ("cmmd-reference --reference {tmp}/none --output {out}/clip.npz", ["--reference {tmp}/none", "no images/ folder"]),
    ("cmmd-reference --reference {tmp} --output {out}/clip.npz --max-count 0", ["--max-count", "positive integer", "0"]),
    ("flops --samples {tmp}/none --output {out}/gflops.json", ["{tmp}/none", "stats.json"]),
    ("flops --samples {tmp}/a {tmp}/b --output {out}/gflops.json", ["--samples names 2 set(s) but --output 1 file(s)"]),
    ("score --samples {s8} --reference {tmp}/none --output-dir {out}", ["--reference {tmp}/none", "duodiff reference"]),
    ("score --samples {s8} --reference {ref16} --output-dir {out}", ["8x8 images with 1 channel", "16x16"]),
    ("score --samples {s8} --reference {ref8} --output-dir {out} --feature-net {tmp}/none.pt", ["feature network {tmp}/none.pt: no model.pt and feature_net.json there", "duodiff feature-net"]),
    # Weights with a NaN or inf (a diverged run, a broken conversion) sample black images: refused
    # where model files are loaded, naming the file and the first bad tensor, whatever reads them.
    ("sample --checkpoint-path {nan_model} --method full " + SAMPLE + " --output-folder {out}",
     ["{nan_model}: state_dict tensor 'pos_embed' holds NaN or inf (1 of ", "must be finite"]),
    ("flops --samples {nan_set} --output {out}/gflops.json", ["{nan_model}: state_dict tensor 'pos_embed' holds NaN or inf"]),
    ("train --load-backbone {nan_model} --model early_exit --classifier-type mlp_probe_per_layer --config-path {cfg} --log-path {out}",
     ["{nan_model}: state_dict tensor 'pos_embed' holds NaN or inf"]),
    ("train --log-path {nan_log} --model uvit --config-path {cfg} --n-steps 1 --device cpu",
     ["{nan_log}/checkpoint.pt: model tensor 'pos_embed' holds NaN or inf", "remove it to start afresh"]),
    ("convert --checkpoint {nan_uvit} --config-path {cfg_convert} --output {out}/model.pt",
     ["{nan_uvit}: the U-ViT weights (plain state dict) tensor 'pos_embed' holds NaN or inf (2 of ",
      "convert a checkpoint with finite weights"]),
    # A sigma that is not a covariance (a clearly negative eigenvalue) gives FIDs below 0.
    ("reference --dataset digits --n-reference 2 --statistics {bad_stats} --output-folder {out}",
     ["--statistics {bad_stats}: sigma has the eigenvalue -0.5 (largest 1)", "positive semi-definite"]),
    ("fid --samples {s8} --reference {ref_bad_stats} --output {out}/fid.json",
     ["--reference {ref_bad_stats}: features.npz: sigma has the eigenvalue -0.5", "positive semi-definite"]),
    # Latents files that are not what `duodiff encode` writes, and a batch larger than the data.
    ("train --latents {latents_no_labels} --model uvit --config-path {cfg} --log-path {out} --n-steps 1 --device cpu",
     ["--latents {latents_no_labels}: no labels array in it (it holds latents, fingerprint)", "duodiff encode"]),
    ("train --latents {latents_empty} --model uvit --config-path {cfg} --log-path {out} --n-steps 1 --device cpu",
     ["--latents {latents_empty} holds no latents (shape (0, 1, 8, 8))"]),
    ("train --latents {latents_short} --batch-size 2 --model uvit --config-path {cfg} --log-path {out} --n-steps 1 --device cpu",
     ["--latents {latents_short} holds 4 latents but labels of shape (3,)", "one label per latent, (4,)"]),
    ("train --latents {latents4} --batch-size 8 --model uvit --config-path {cfg} --log-path {out} --n-steps 1 --device cpu",
     ["--batch-size 8 is more than the 4 latents in --latents {latents4}", "global batch", "at most the training set's size, 4"]),
    ("train --batch-size 2000 --model uvit --config-path {cfg} --log-path {out} --n-steps 1 --device cpu",
     ["--batch-size 2000 is more than the 1797 training images of --dataset digits", "global batch"]),
    # Digits have one channel: an RGB autoencoder cannot encode them (refused before any chunk is kept).
    ("encode --dataset digits --autoencoder {vae_rgb} --scale-factor 0.5 --output {out}/latents.npz",
     ["--autoencoder {vae_rgb} takes 3-channel images but --dataset digits has 1-channel ones", "in_channels 1"]),
]


def fake_reference(folder, dataset, image_size, channels):
    """A reference folder as `duodiff reference` leaves it (reference.json, features.npz); the
    features are zeros, as every case here is refused before they are used."""
    folder.mkdir()
    np.savez(folder / "features.npz", features=np.zeros((2, 4), dtype=np.float32))
    meta = {"n": 2, "dataset": dataset, "split": "train", "image_size": image_size, "channels": channels,
            "mode": "clean", "feature_network_key": "fid-helper", "feature_dim": 4}  # fmt: skip
    write_json(folder / "reference.json", {k: v for k, v in meta.items() if v is not None})
    return folder


def fake_samples(folder, sizes, channels=1, dataset=None):
    """A sample set folder: one PNG per entry of `sizes`, and a stats.json naming `dataset`."""
    for i, size in enumerate(sizes):
        save_png(torch.full((channels, size, size), 40 * i, dtype=torch.uint8), folder / "images" / f"{i:06d}.png")
    write_json(folder / "stats.json", {"method": "full", "img_size": sizes[0], "in_chans": channels, "dataset": dataset})
    return folder


def fake_latents(path, n_latents, n_labels=None, labels=True):
    """A latents .npz as `duodiff encode` writes it (1x8x8 latents of digits, CONFIG's shape), with
    n_labels labels (default: one per latent) or none."""
    arrays = {"latents": np.zeros((n_latents, 1, 8, 8), dtype=np.float32),
              "fingerprint": json.dumps({"dataset": "digits", "image_size": 8, "num_classes": 10})}
    if labels:
        arrays["labels"] = np.zeros(n_latents if n_labels is None else n_labels, dtype=np.int64)
    np.savez(path, **arrays)
    return path


def not_a_covariance():
    """A symmetric 2048 x 2048 sigma with the eigenvalue -0.5 (the others 1): no covariance."""
    sigma = np.eye(2048)
    sigma[0, 0] = -0.5
    return sigma


def with_nan(state: dict, key: str, count: int = 1) -> dict:
    """`state` with the first `count` values of state[key] NaN."""
    state = {k: v.clone() for k, v in state.items()}
    state[key].view(-1)[:count] = float("nan")
    return state


@pytest.fixture(scope="session")
def paths(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    torch.manual_seed(0)
    files = {"tmp": tmp, "cfg": tmp / "model.yaml", "bad_cfg": tmp / "even.yaml", "full": tmp / "full.pt",
             "shallow": tmp / "shallow.pt", "ee": tmp / "ee.pt", "truncated": tmp / "truncated.pt",
             "foreign": tmp / "foreign.pt"}  # fmt: skip
    files["cfg"].write_text("".join(f"{k}: {v}\n" for k, v in CONFIG.items()))
    files["cfg_rgb"] = tmp / "rgb.yaml"
    files["cfg_rgb"].write_text("".join(f"{k}: {v}\n" for k, v in {**CONFIG, "img_size": 32, "in_chans": 3}.items()))
    files["bad_cfg"].write_text("".join(f"{k}: {v}\n" for k, v in {**CONFIG, "depth": 4}.items()))
    for name, kind, classifier, depth in (
        ("full", "uvit", None, 3), ("shallow", "uvit", None, 1), ("ee", "early_exit", "mlp_probe_per_layer", 3),
    ):  # fmt: skip
        config = {**CONFIG, "depth": depth}
        model = build_model(kind, config, DIFFUSION["num_timesteps"], classifier)
        save_model(files[name], kind=kind, model_config=config, diffusion=DIFFUSION, classifier_type=classifier,
                   state_dict=model.state_dict(), ema_state_dict=None, step=0, train_args={})  # fmt: skip
    files["truncated"].write_bytes(files["full"].read_bytes()[:1000])
    torch.save({"state_dict": {}}, files["foreign"])
    # References and sample sets for `duodiff fid`.
    files["ref8"] = fake_reference(tmp / "ref8", "digits", 8, 1)
    files["ref16"] = fake_reference(tmp / "ref16", "digits", 16, 1)
    files["ref8_rgb"] = fake_reference(tmp / "ref8_rgb", "cifar10", 8, 3)
    files["ref8_celeba"] = fake_reference(tmp / "ref8_celeba", "celeba", 8, 3)
    files["ref_old"] = fake_reference(tmp / "ref_old", None, None, None)  # a reference.json without them
    files["s8"] = fake_samples(tmp / "s8", [8, 8, 8], dataset="digits")
    files["s8_cifar10"] = fake_samples(tmp / "s8_cifar10", [8, 8, 8], channels=3, dataset="cifar10")
    files["mixed"] = fake_samples(tmp / "mixed", [8, 8, 16])
    files["corrupt"] = tmp / "corrupt"
    shutil.copytree(files["s8"], files["corrupt"])
    png = files["corrupt"] / "images" / "000001.png"
    png.write_bytes(png.read_bytes()[:-20])  # cut off in its last chunks, as by a full disk
    files["afile"] = tmp / "afile"
    files["afile"].write_text("not a folder\n")
    # Files with NaN weights: a model.pt, a sample set made from it, a training checkpoint, U-ViT weights.
    full = checkpoints.load_model_file(files["full"])
    files["nan_model"] = tmp / "nan.pt"
    save_model(files["nan_model"], **{k: v for k, v in full.items() if k not in ("format", "version")}
               | {"state_dict": with_nan(full["state_dict"], "pos_embed")})  # fmt: skip
    files["nan_set"] = fake_samples(tmp / "nan_set", [8] * 4)
    write_json(files["nan_set"] / "stats.json", {"method": "full", "checkpoint": str(files["nan_model"]), "n_samples": 4})
    torch.save(torch.full((10, 4), 3, dtype=torch.long), files["nan_set"] / "exit_layers.pt")
    files["nan_log"] = tmp / "nan_log"
    files["nan_log"].mkdir()
    checkpoints.save({"settings": {}, "model": with_nan(full["state_dict"], "pos_embed"), "ema": None, "optimizer": {},
                      "step": 1}, files["nan_log"] / "checkpoint.pt", checkpoints.TRAIN_STATE_FORMAT)  # fmt: skip
    files["cfg_convert"] = tmp / "convert.yaml"
    files["cfg_convert"].write_text("".join(f"{k}: {v}\n" for k, v in {**CONFIG, "normalize_timesteps": False}.items()))
    files["nan_uvit"] = tmp / "nan_uvit.pth"
    torch.save(with_nan(build_model("uvit", {**CONFIG, "normalize_timesteps": False}, 1000).state_dict(), "pos_embed", 2),
               files["nan_uvit"])  # fmt: skip
    # Statistics whose sigma is not a covariance: a --statistics file, and a reference made from one.
    files["bad_stats"] = tmp / "bad_stats.npz"
    np.savez_compressed(files["bad_stats"], mu=np.zeros(2048), sigma=not_a_covariance())
    files["ref_bad_stats"] = tmp / "ref_bad_stats"
    files["ref_bad_stats"].mkdir()
    np.savez_compressed(files["ref_bad_stats"] / "features.npz", mu=np.zeros(2048), sigma=not_a_covariance(),
                        sigma_sqrt=np.eye(2048))  # fmt: skip
    write_json(files["ref_bad_stats"] / "reference.json", {
        "n": None, "dataset": "digits", "split": "train", "image_size": 8, "channels": 1, "mode": "clean",
        "feature_network_key": "fid-helper", "feature_dim": 2048, "source": "statistics"})  # fmt: skip
    # Latents files: without labels, empty, with a label short, and four latents.
    files["latents_no_labels"] = fake_latents(tmp / "no_labels.npz", 4, labels=False)
    files["latents_empty"] = fake_latents(tmp / "empty.npz", 0)
    files["latents_short"] = fake_latents(tmp / "short.npz", 4, n_labels=3)
    files["latents4"] = fake_latents(tmp / "latents4.npz", 4)
    # An autoencoder for 3-channel images (conftest's tiny one made RGB).
    from conftest import TINY_AUTOENCODER
    from diffusers import AutoencoderKL

    files["vae_rgb"] = tmp / "vae_rgb"
    AutoencoderKL(**{**TINY_AUTOENCODER, "in_channels": 3, "out_channels": 3}).save_pretrained(files["vae_rgb"])
    return files


@pytest.mark.parametrize("line, expected", BAD_INPUTS, ids=[line.split(" --output")[0][:60] for line, _ in BAD_INPUTS])
def test_bad_input_gets_one_clear_line(paths, tmp_path, capsys, line, expected):
    fill = {**{k: str(v) for k, v in paths.items()}, "out": str(tmp_path / "out")}
    try:
        status = cli.main(line.format(**fill).split())
    except SystemExit as stop:  # argparse's own checks (choices, types) exit through SystemExit
        status = stop.code
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"duodiff {line.split()[0]}: error: "), err
    for piece in expected:
        assert piece.format(**fill) in err, (piece, err)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir()), "bad input wrote output"


# ---- earlier results survive a refused command ---------------------------------------------------

# (command line, files already in place that must come through unchanged): a set scored before,
# a sample set made before, the other images of a set with one corrupt PNG.
NOTHING_LOST = [
    ("fid --samples {s8} --reference {ref16} --output {out}/fid.json", ["{out}/fid.json"]),
    ("fid --samples {corrupt} --reference {ref8} --output {out}/fid.json", ["{out}/fid.json"]),
    (
        "sample --checkpoint-path {full} --checkpoint-path-late {shallow} --method duodiff --t-switch 2 " + SAMPLE
        + " --output-folder {out}",
        ["{out}/stats.json", "{out}/images/000000.png", "{out}/parts/batch_00000.pt"],
    ),
]


def snapshot(*folders) -> dict:
    return {p: p.read_bytes() for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("line, existing", NOTHING_LOST, ids=[line.split(" --output")[0][:60] for line, _ in NOTHING_LOST])
def test_refused_command_keeps_earlier_results(paths, tmp_path, capsys, line, existing):
    fill = {**{k: str(v) for k, v in paths.items()}, "out": str(tmp_path / "out")}
    for i, name in enumerate(existing):
        path = tmp_path / name.format(**fill)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"an earlier result %d" % i)
    before = snapshot(tmp_path, paths["tmp"])
    assert cli.main(line.format(**fill).split()) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert snapshot(tmp_path, paths["tmp"]) == before


def test_deeper_shallow_model_runs_when_asked_for(paths, tmp_path):
    line = (
        "sample --checkpoint-path {full} --checkpoint-path-late {shallow} --method duodiff --t-switch 2 "
        "--allow-deeper-shallow --sampler ddim --steps 3 --n-samples 2 --batch-size 2 --seed 0 --device cpu "
        "--no-progress --output-folder {out}"
    )
    fill = {**{k: str(v) for k, v in paths.items()}, "out": str(tmp_path / "out")}
    assert cli.main(line.format(**fill).split()) == 0
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    # --checkpoint-path (3 blocks) ran the first t_switch steps, --checkpoint-path-late (1 block) the rest.
    assert stats["mean_exit_layer_per_step"] == [3.0, 3.0, 1.0]


def run_cli(line: str, capsys) -> tuple[int, str]:
    """`duodiff LINE` in-process -> (exit status, stderr)."""
    try:
        status = cli.main(line.split())
    except SystemExit as stop:
        status = stop.code
    return status, capsys.readouterr().err.strip()


def test_sample_rerun_names_a_truncated_png(paths, tmp_path, capsys):
    # A finished set, one of whose PNGs was cut off afterwards (a full disk, a killed copy): its rerun
    # would have died in grid.png's reading with a traceback; it names the file before any work.
    line = f"sample --checkpoint-path {paths['full']} --method full {SAMPLE} --device cpu --no-progress --output-folder {tmp_path}/set"
    assert run_cli(line, capsys)[0] == 0
    png = tmp_path / "set" / "images" / "000002.png"
    png.write_bytes(png.read_bytes()[:-20])
    before = snapshot(tmp_path)
    status, err = run_cli(line, capsys)
    assert status == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"duodiff sample: error: {png} is not a readable PNG, truncated or corrupt ("), err
    assert f"delete it (its batch is sampled again) or the set folder {tmp_path}/set, and rerun" in err
    assert snapshot(tmp_path) == before  # stats.json, grid.png and the other images as they were
    png.unlink()  # as the message says: the batch is sampled again, the same images as before
    assert run_cli(line, capsys)[0] == 0 and png.is_file()
    assert snapshot(tmp_path)[tmp_path / "set" / "images" / "000001.png"] == before[tmp_path / "set" / "images" / "000001.png"]


def rewrite(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# (headline, score file, key, the value the first two sets get, the rest's value, what the message says)
MIXED_SCORES = [
    ("inception", "fid", "reference", "other/reference", "results/digits/reference",
     "the sets' fid.json were scored against different reference folders, so their scores cannot share a table: "
     "other/reference: full, shallow_d3; results/digits/reference: ee_attention_probe_thr0.05, "),
    ("inception", "fid", "feature_network_sha256", "0" * 64, None,
     f"the sets' fid.json were scored with different feature networks (sha256), so their scores cannot share a table: "
     f"{'0' * 64}: full, shallow_d3; "),
    ("classifier", "fd_classifier", "mode", "legacy_pytorch", "clean",
     "the sets' fd_classifier.json were scored under different protocols (mode), so their scores cannot share a table: "
     "legacy_pytorch: full, full_steps20; clean: "),
]


@pytest.mark.parametrize("headline, file, key, first, rest, message", MIXED_SCORES, ids=[m[2] for m in MIXED_SCORES])
def test_tables_refuse_sets_scored_against_different_references(tmp_path, capsys, headline, file, key, first, rest, message):
    from test_tables import CI_STUDY, ORDER, write_ci_study, write_study

    sets = ORDER if headline == "inception" else list(CI_STUDY)
    (write_study if headline == "inception" else write_ci_study)(tmp_path)
    for i, name in enumerate(sets):
        value = first if i < 2 else rest
        if value is not None:
            rewrite(tmp_path / "metrics" / name / f"{file}.json", **{key: value})
    line = (f"tables --samples-root {tmp_path}/samples --metrics-root {tmp_path}/metrics --sets {' '.join(sets)} "
            f"--output-dir {tmp_path}/tables --headline {headline}")
    status, err = run_cli(line, capsys)
    assert status == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"duodiff tables: error: {message}"), err
    assert "score every set against one reference" in err
    assert not (tmp_path / "tables").exists()


# ---- outputs that cannot be written, for every sub-command ------------------------------------------

# One command line per sub-command, writing to {dest}; every sub-command of duodiff.cli is here.
OUTPUT_COMMANDS = {
    "encode": "encode --dataset digits --autoencoder {tmp} --scale-factor 0.2 --output {dest}/latents.npz",
    "train": "train --model uvit --config-path {cfg} --log-path {dest}",
    "convert": "convert --checkpoint {full} --config-path {cfg} --output {dest}/model.pt",
    "sample": "sample --checkpoint-path {full} --method full " + SAMPLE + " --output-folder {dest}",
    "train-router": "train-router --checkpoint-path {full} --steps 4 --n-steps 1 --output-folder {dest}",
    "reference": "reference --dataset digits --n-reference 2 --output-folder {dest}",
    "feature-net": "feature-net --dataset digits --epochs 1 --output-folder {dest}",
    "real-set": "real-set --dataset digits --n-reference 2 --n-images 2 --output-folder {dest}",
    "fid": "fid --samples {s8} --reference {ref8} --output {dest}/fid.json",
    "score": "score --samples {s8} --reference {ref8} --output-dir {dest}",
    "cmmd-reference": "cmmd-reference --reference {ref8} --output {dest}/clip.npz",
    "cmmd": "cmmd --samples {s8} --reference {ref8} --output {dest}/cmmd.json",
    "flops": "flops --samples {s8} {s8} --output {tmp}/fine.json {dest}/gflops.json",  # the second of two
    "time": "time --samples {s8} --output-dir {dest}",
    "search": "search --family f --template full_steps{{steps}} --knob steps --low 1 --high 8 --cheaper lower "
              "--resolution 1 --integer --budget 1 --grid 4 --headline classifier --margin 0.1 --metrics-root {tmp} "
              "--output {dest}/round0.json",
    "search-result": "search-result --last-round {tmp}/round9.json --output {dest}/search.json",
    "tables": "tables --samples-root {tmp} --metrics-root {tmp} --sets full --output-dir {dest}",
    "plots": "plots --tables-dir {tmp} --samples-root {tmp} --models-root {tmp} --reference {ref8} --output-dir {dest}",
}


def test_every_command_has_its_output_checked():
    assert sorted(OUTPUT_COMMANDS) == sorted(cli.COMMANDS)


@pytest.mark.parametrize("command", OUTPUT_COMMANDS)
def test_output_under_a_file_gets_one_line(paths, capsys, command):
    fill = {**{k: str(v) for k, v in paths.items()}, "dest": str(paths["afile"] / "out")}
    assert cli.main(OUTPUT_COMMANDS[command].format(**fill).split()) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"duodiff {command}: error: --"), err
    assert f"{paths['afile']} is a file, so no folder can be made inside it" in err
    assert paths["afile"].read_text() == "not a folder\n"


# Runs each command line of argv[1] (JSON) through the CLI in one process; prints [status, stderr].
RUN_ALL = """
import contextlib, io, json, sys
from duodiff import cli
results = []
for line in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        results.append([cli.main(line.split()), err.getvalue()])
print(json.dumps(results))
"""


def test_output_on_a_read_only_file_system_gets_one_line(paths, tmp_path):
    # A read-only tmpfs mounted in a private user and mount namespace (no root needed, nothing
    # outside the test sees it); skipped where the kernel does not allow such namespaces.
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run(
        [unshare, "--user", "--map-root-user", "--mount", "mount", "-t", "tmpfs", "-o", "ro", "none", str(read_only)],
        capture_output=True,
    ).returncode != 0:  # fmt: skip
        pytest.skip("no unprivileged mount namespaces here")
    fill = {**{k: str(v) for k, v in paths.items()}, "dest": str(read_only / "out")}
    lines = [OUTPUT_COMMANDS[c].format(**fill) for c in OUTPUT_COMMANDS]
    mount = 'mount -t tmpfs -o ro none "$0" && exec "$@"'
    result = subprocess.run(
        [unshare, "--user", "--map-root-user", "--mount", "sh", "-c", mount, str(read_only),
         sys.executable, "-c", RUN_ALL, json.dumps(lines)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for command, (status, err) in zip(OUTPUT_COMMANDS, json.loads(result.stdout.splitlines()[-1])):
        assert status == 2, (command, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert f"cannot write in {read_only} (it is on a read-only file system)" in err, err
