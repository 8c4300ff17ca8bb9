"""Resumable state is keyed by the content of its inputs (core/fingerprint.py, issue 22): a model or
backbone replaced at the same path with the same step count is never resumed over; the command
line refuses in one line naming what changed and --restart, which discards the state."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from _defaults import cli_args
from conftest import train_kwargs, write_model_yaml

from duodiff.core.errors import DuodiffError
from duodiff.core.fingerprint import changes, fingerprint
from duodiff.core.images import save_png
from duodiff.core.io import file_sha256, torch_save, write_json
from duodiff.metrics import feature_net
from duodiff.metrics.inception import FeatureRun, cached_image_features
from duodiff.sample.sample_set import run_sample
from duodiff.train.loop import run_train

TRAIN = dict(dataset="digits", n_steps=4, batch_size=8, lr=1e-3, warmup_steps=0, ema_decay=0.9,
             log_every_n_steps=2, save_every_n_steps=2, device="cpu")  # fmt: skip


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """Two U-ViTs of the same config and step count, different weights (seeds 0 and 1)."""
    root = tmp_path_factory.mktemp("models")
    config = write_model_yaml(root / "tiny.yaml")
    for seed in (0, 1):
        run_train(**train_kwargs(config, root / f"seed{seed}", **TRAIN, seed=seed))
    return config, root / "seed0" / "model.pt", root / "seed1" / "model.pt"


def test_fingerprint_names_changed_files_by_content_and_settings_by_flag(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"one")
    b.write_bytes(b"one")
    old = fingerprint({"model weights": a}, {"lr": 0.001, "cfg": {"depth": 3}})
    assert changes(old, fingerprint({"model weights": b}, {"lr": 0.001, "cfg": {"depth": 3}})) == []  # moved, same bytes
    b.write_bytes(b"two")  # rewritten in place: hashed again, not matched by its path
    assert changes(old, fingerprint({"model weights": b}, {"lr": 0.002, "cfg": {"depth": 5}})) == [
        f"model weights ({b})", "--cfg.depth 3 -> 5", "--lr 0.001 -> 0.002"]
    assert file_sha256(b) != file_sha256(a)


def sample_args(model, out, **given):
    return cli_args("sample", checkpoint_path=model, method="full", output_folder=out, sampler="ddim", steps=3,
                    n_samples=8, batch_size=4, seed=0, progress=False, **given)  # fmt: skip


def pngs(folder):
    return [p.read_bytes() for p in sorted((folder / "images").glob("*.png"))]


def test_a_model_retrained_in_place_is_not_resampled_over(two_models, tmp_path):
    _, model_a, model_b = two_models
    model = tmp_path / "full" / "model.pt"
    model.parent.mkdir()
    shutil.copy(model_a, model)
    out = tmp_path / "set"
    run_sample(**sample_args(model, out))
    old = pngs(out)
    (out / "parts" / "batch_00001.pt").unlink()  # a killed job: batch 1 not finished
    shutil.copy(model_b, model)  # retrained at the same path, the same step count
    # The command line: one line naming the changed file and --restart, exit 2, nothing sampled.
    cli = subprocess.run([sys.executable, "-m", "duodiff.cli", "sample", "--checkpoint-path", str(model), "--method",
                          "full", "--steps", "3", "--n-samples", "8", "--batch-size", "4", "--output-folder", str(out),
                          "--device", "cpu", "--no-progress"], capture_output=True, text=True, check=False)  # fmt: skip
    assert cli.returncode == 2, cli.stderr
    assert cli.stderr.strip().splitlines() == [cli.stderr.strip()]
    assert f"model weights ({model})" in cli.stderr and "--restart" in cli.stderr
    assert pngs(out)[:4] == old[:4]
    # --restart: the old set is discarded and every image is the new model's.
    run_sample(**sample_args(model, out, restart=True))
    run_sample(**sample_args(model_b, tmp_path / "fresh"))
    assert pngs(out) == pngs(tmp_path / "fresh") and all(new != was for new, was in zip(pngs(out), old))
    # The same model again (even at another path) resumes: a finished set is not resampled.
    part = torch.load(out / "parts" / "batch_00000.pt", weights_only=False)
    run_sample(**sample_args(model_b, out))
    assert torch.load(out / "parts" / "batch_00000.pt", weights_only=False)["wall_time_s"] == part["wall_time_s"]


def test_early_exit_training_is_not_resumed_over_a_replaced_backbone(two_models, tmp_path):
    config, model_a, model_b = two_models
    backbone = tmp_path / "full" / "model.pt"
    backbone.parent.mkdir()
    shutil.copy(model_a, backbone)
    ee = dict(**TRAIN, model="early_exit", classifier_type="attention_probe", load_backbone=str(backbone),
              freeze_backbone=True)  # fmt: skip
    run_train(**train_kwargs(config, tmp_path / "ee", **ee))  # finished: checkpoint.pt at step 4
    shutil.copy(model_b, backbone)  # the full model retrained in place
    with pytest.raises(DuodiffError, match=rf"backbone weights \({backbone}\).*--restart"):
        run_train(**train_kwargs(config, tmp_path / "ee", **ee))
    assert run_train(**train_kwargs(config, tmp_path / "ee", **ee, restart=True))["resumed_from"] is None
    new = torch.load(tmp_path / "ee" / "model.pt", weights_only=False)["state_dict"]
    b = torch.load(model_b, weights_only=False)["ema_state_dict"]
    assert all(torch.equal(new[f"backbone.{key}"], value) for key, value in b.items())


def save_feature_net(folder, seed):
    torch.manual_seed(seed)
    model = feature_net.ClassifierNet(in_chans=1, image_size=8, num_classes=10, feature_dim=4)
    torch_save({"format": feature_net.FORMAT, "config": model.config(), "state_dict": model.state_dict()},
               folder / "model.pt")  # fmt: skip
    write_json(folder / "feature_net.json", {"dataset": "digits", "image_size": 8, "channels": 1, "heldout_accuracy": 0.5})
    return folder / "model.pt"


def test_feature_chunks_of_another_network_are_not_reused(tmp_path):
    images = tmp_path / "images"
    generator = torch.Generator().manual_seed(0)
    for i in range(6):
        save_png(torch.randint(0, 256, (1, 8, 8), generator=generator, dtype=torch.uint8), images / f"{i:06d}.png")
    files = sorted(images.glob("*.png"))
    (tmp_path / "net").mkdir()

    def features(cache):
        fn, resize, info = feature_net.feature_extractor(str(tmp_path / "net" / "model.pt"))
        run = FeatureRun(batch_size=4, device="cpu", num_workers=0, chunk_size=2, cache=cache)
        return cached_image_features(files, fn, info, run, "test", resize), info["feature_network_sha256"]

    save_feature_net(tmp_path / "net", seed=0)
    old, old_sha = features(tmp_path / "cache")  # its chunks stay, as a killed job leaves them
    save_feature_net(tmp_path / "net", seed=1)  # retrained at the same path
    new, new_sha = features(tmp_path / "cache")
    fresh, _ = features(tmp_path / "fresh-cache")
    assert new_sha != old_sha and not np.allclose(new, old)
    np.testing.assert_array_equal(new, fresh)


# ---- the training images themselves (core/data.dataset_digest) --------------------------------------


def write_imagefolder(root, n=4, seed=0):
    """n random 8x8 RGB PNGs in two class folders -> root."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        (root / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / f"class{i % 2}" / f"{i}.png")
    return root


def repaint(path, seed):
    """The image at `path` rewritten in place with other pixels (the folder keeps its file count)."""
    from PIL import Image

    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)


def test_dataset_digest_follows_the_images_not_the_scan(tmp_path, monkeypatch):
    from duodiff.core import data as data_module
    from duodiff.core.data import dataset_digest, load_dataset

    root = write_imagefolder(tmp_path / "data")
    where, first = dataset_digest(load_dataset("imagefolder", root=root, image_size=8))
    assert str(root) in where and "file list" in where
    assert dataset_digest(load_dataset("imagefolder", root=root, image_size=8))[1] == first  # scanned again: same
    repaint(root / "class1" / "3.png", seed=9)
    assert dataset_digest(load_dataset("imagefolder", root=root, image_size=8))[1] != first
    # In memory (digits): the loaded bytes, so one changed pixel is another dataset.
    digits = dataset_digest(load_dataset("digits"))[1]
    assert dataset_digest(load_dataset("digits"))[1] == digits
    real = data_module._digits

    def one_pixel_changed(image_size):
        images, labels = real(image_size)
        images[5, 0, 3, 3] = -images[5, 0, 3, 3] + 0.5
        return images, labels

    monkeypatch.setattr(data_module, "_digits", one_pixel_changed)
    assert dataset_digest(load_dataset("digits"))[1] != digits


def test_training_is_not_resumed_over_images_changed_in_place(tmp_path):
    config = write_model_yaml(tmp_path / "rgb.yaml", in_chans=3)
    root = write_imagefolder(tmp_path / "data")
    run = dict(TRAIN, dataset="imagefolder", data_root=str(root), image_size=8, n_steps=2, batch_size=2,
               save_every_n_steps=1, log_every_n_steps=1)  # fmt: skip
    run_train(**train_kwargs(config, tmp_path / "run", **run))  # finished: checkpoint.pt at step 2
    assert run_train(**train_kwargs(config, tmp_path / "run", **run))["resumed_from"] == 2  # same images: resumed
    repaint(root / "class0" / "2.png", seed=9)  # one image changed, the same four files
    with pytest.raises(DuodiffError, match=rf"dataset images \(--dataset imagefolder at {root}, file list.*--restart"):
        run_train(**train_kwargs(config, tmp_path / "run", **run))
    assert run_train(**train_kwargs(config, tmp_path / "run", **run, restart=True))["resumed_from"] is None
    run_train(**train_kwargs(config, tmp_path / "fresh", **run))
    new, fresh = (torch.load(tmp_path / name / "model.pt", weights_only=False)["state_dict"] for name in ("run", "fresh"))
    assert all(torch.equal(new[key], fresh[key]) for key in fresh)


def test_encode_chunks_of_other_images_are_refused_or_with_restart_discarded(tmp_path, monkeypatch):
    from conftest import TINY_AUTOENCODER
    from diffusers import AutoencoderKL

    from duodiff.core import latent

    torch.manual_seed(0)
    AutoencoderKL(**{**TINY_AUTOENCODER, "in_channels": 3, "out_channels": 3}).save_pretrained(tmp_path / "ae")
    root = write_imagefolder(tmp_path / "data", n=3)
    flags = {"dataset": "imagefolder", "data_root": str(root), "image_size": 8, "autoencoder": str(tmp_path / "ae"),
             "scale_factor": 0.5, "batch_size": 4, "chunk_size": 1}  # fmt: skip
    real = latent._encode_chunk

    def dies_after_one(*args):
        if (tmp_path / "latents.npz.chunks" / "000000000.npz").exists():
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(latent, "_encode_chunk", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        latent.run_encode(**cli_args("encode", **flags, output=tmp_path / "latents.npz"), progress=False)
    monkeypatch.undo()
    chunk = (tmp_path / "latents.npz.chunks" / "000000000.npz").read_bytes()
    repaint(root / "class0" / "0.png", seed=9)  # the first chunk's image, the same three files
    # The command line: one line naming the images and --restart, exit 2; the chunks are kept.
    cli = subprocess.run([sys.executable, "-m", "duodiff.cli", "encode", "--output", str(tmp_path / "latents.npz"),
                          *(f"--{k.replace('_', '-')}={v}" for k, v in flags.items())],
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert cli.returncode == 2, cli.stderr
    assert cli.stderr.strip().splitlines() == [cli.stderr.strip()]
    assert f"dataset images (--dataset imagefolder at {root}" in cli.stderr and "--restart" in cli.stderr
    assert (tmp_path / "latents.npz.chunks" / "000000000.npz").read_bytes() == chunk
    # --restart: every chunk encoded anew, the result that of a clean run on the new images.
    latent.run_encode(**cli_args("encode", **flags, output=tmp_path / "latents.npz", restart=True), progress=False)
    latent.run_encode(**cli_args("encode", **flags, output=tmp_path / "clean.npz"), progress=False)
    restarted, clean = (np.load(tmp_path / name)["latents"] for name in ("latents.npz", "clean.npz"))
    np.testing.assert_array_equal(restarted, clean)
    assert not (tmp_path / "latents.npz.chunks").exists()
