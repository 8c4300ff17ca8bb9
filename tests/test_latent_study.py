"""(slow) The latent path end to end: tests/configs/tiny_latent.yaml encodes once, trains on the
latents, samples and decodes every set, and scores it."""

from __future__ import annotations

import csv
import json

import pytest
from test_workflow import TINY_LATENT, add_autoencoders, expected_sets, load, make_workdir, snakemake

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
