"""A sampling job killed mid-set (SIGKILL, as on node loss) is finished by a rerun: the same images
as an uninterrupted run, none duplicated, none from another seed."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image

from duodiff.models import build_model
from duodiff.models.checkpoints import save_model

CONFIG = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=3, num_heads=2)
DIFFUSION = dict(num_timesteps=100, beta_start=1e-4, beta_end=0.02, parametrization="predict_noise")


def command(checkpoint, out):
    return [
        sys.executable, "-m", "duodiff.cli", "sample", "--checkpoint-path", str(checkpoint), "--method", "full",
        "--sampler", "ddpm", "--n-samples", "12", "--batch-size", "2", "--seed", "3", "--output-folder", str(out),
        "--no-progress",
    ]  # fmt: skip


def pixels(folder):
    files = sorted((folder / "images").iterdir())
    return [f.name for f in files], np.stack([np.array(Image.open(f)) for f in files])


def test_killed_sampling_job_rerun_completes_the_set_without_duplicates(tmp_path):
    torch.manual_seed(0)
    model = build_model("uvit", CONFIG, DIFFUSION["num_timesteps"])
    checkpoint = tmp_path / "model.pt"
    save_model(
        checkpoint, kind="uvit", model_config=CONFIG, diffusion=DIFFUSION, classifier_type=None,
        state_dict=model.state_dict(), ema_state_dict=None, step=0, train_args={},
    )  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    subprocess.run(command(checkpoint, tmp_path / "whole"), check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    job = subprocess.Popen(command(checkpoint, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(killed.glob("parts/batch_*.pt"))) < 2:
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.wait()
    finished = sorted(p.name for p in (killed / "parts").glob("batch_*.pt"))
    assert 2 <= len(finished) < 6, f"the kill should land mid-set; finished parts: {finished}"
    assert not (killed / "stats.json").exists()
    # What a kill inside an atomic write leaves (it lands there only sometimes): a stray temporary.
    (killed / "images" / ".tmp-000011.png-killed").write_bytes(b"\x89PNG half")

    subprocess.run(command(checkpoint, killed), check=True, env=env, capture_output=True)
    names, resumed = pixels(killed)
    whole_names, whole = pixels(tmp_path / "whole")
    assert names == whole_names == [f"{i:06d}.png" for i in range(12)]
    assert np.array_equal(resumed, whole)
    assert not list(killed.rglob(".tmp-*"))
    assert torch.load(killed / "exit_layers.pt").shape == (100, 12)
