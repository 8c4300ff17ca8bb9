"""benchmarks/device_check.py in its --tiny CPU mode: the same code paths as the GPU check (convert,
`duodiff sample` with every method in bf16 and fp32, decoding, flops, reference + score, the
sampling benchmark), on shrunken models. The expectations are written here from the configs'
own files, not from the script's tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# config -> (sampler the check must have run: the config's, ddpm as ddim; full model converted?)
EXPECTED = {
    "cifar10": ("ddim", False), "celeba64": ("ddim", False), "imagenet64": ("ddim", False),
    "imagenet256": ("dpm_solver_fast", True),
    "cifar10_uvit_small": ("euler_maruyama", True), "celeba64_uvit_small": ("euler_maruyama", True),
    "imagenet64_uvit_mid": ("dpm_solver_fast", True), "imagenet64_uvit_large": ("dpm_solver_fast", True),
    "imagenet256_uvit_large": ("dpm_solver_fast", True), "imagenet256_uvit_huge": ("dpm_solver_fast", True),
}  # fmt: skip
METHODS, PRECISIONS = ("full", "early_exit", "duodiff", "cache"), ("bf16", "fp32")


@pytest.fixture(scope="module")
def tiny_check(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_check")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "device_check.py"), "--tiny", "--device", "cpu",
         "--output", str(out / "rows.json"), "--workdir", str(out / "work")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return result, json.loads((out / "rows.json").read_text()) if (out / "rows.json").is_file() else None


def test_tiny_check_runs_every_config_method_and_precision_ok(tiny_check):
    result, rows = tiny_check
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert rows is not None and all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    sampled = {(r["config"], r["method"], r["precision"]): r for r in rows if r["method"] in METHODS}
    assert set(sampled) == {(c, m, p) for c in EXPECTED for m in METHODS for p in PRECISIONS}
    assert len(sampled) == len([r for r in rows if r["method"] in METHODS])  # one row each
    for (config, method, precision), row in sampled.items():
        sampler, _ = EXPECTED[config]
        assert row["steps"] == f"2 {sampler}", (config, method, row["steps"])
        assert row["images/s"] > 0 and row["s/step"] > 0 and row["params"] > 0
        assert row["GFLOP/img"] > 0
    for config in EXPECTED:  # DuoDiff's shallow first half and caching's cheap steps cost less than the full model
        full = sampled[(config, "full", "fp32")]["GFLOP/img"]
        assert sampled[(config, "duodiff", "fp32")]["GFLOP/img"] < full
        assert sampled[(config, "cache", "fp32")]["GFLOP/img"] < full
    # The released checkpoints' and the latent study's full models go through convert; the pixel
    # studies' model files normalize t, which convert refuses: those are saved as training saves them.
    made = {r["config"]: r["method"] for r in rows if r["method"] in ("convert", "save (as trained)")}
    assert made == {c: "convert" if converted else "save (as trained)" for c, (_, converted) in EXPECTED.items()}
    assert {r["config"] for r in rows if r["method"] == "flops"} == set(EXPECTED)
    assert [r["method"] for r in rows if r["method"].startswith("score")] == ["score (1 sets)"]  # --tiny: the first config
    assert [r["config"] for r in rows if r["method"] == "benchmarks/bench_sampling.py"] == ["bench_sampling"]
    table = result.stdout[result.stdout.index("## Device check"):]
    assert table.count("\n| ") == len(rows) + 1  # the header, then one line per row


def test_the_latent_configs_decode_their_samples_to_images(tiny_check):
    """A latent config's sets hold decoded 256x256 RGB images (8x the 32x32 latents), pixel configs'
    their own size."""
    from PIL import Image

    result, rows = tiny_check
    assert rows is not None, result.stderr[-3000:]
    work = Path(result.args[result.args.index("--workdir") + 1])
    sizes = {"cifar10": 32, "celeba64": 64, "imagenet64": 64, "imagenet256": 256, "imagenet256_uvit_huge": 256}
    for config, size in sizes.items():
        for method in METHODS:
            image = next((work / config / "samples" / f"{method}_fp32" / "images").glob("*.png"))
            assert Image.open(image).size == (size, size) and Image.open(image).mode == "RGB", (config, method)
