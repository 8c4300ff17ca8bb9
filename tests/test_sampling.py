"""`duodiff sample` end to end with tiny random-weight models (8x8 grayscale, a few blocks)."""

import math

import numpy as np
import pytest
import torch
from _defaults import cli_args
from PIL import Image

from duodiff.core.errors import DuodiffError
from duodiff.core.flags import OneLineErrorParser
from duodiff.core.images import save_png, to_uint8
from duodiff.core.io import read_json
from duodiff.models import build_model
from duodiff.models.checkpoints import save_model
from duodiff.sample import sample_set
from duodiff.sample.sample_set import run_sample

torch.set_num_threads(1)

CONFIG = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=3, num_heads=2, normalize_timesteps=True)
DIFFUSION = dict(num_timesteps=100, beta_start=1e-4, beta_end=0.02, parametrization="predict_noise")
STEPS = 6


def save(path, kind, config, diffusion=DIFFUSION, classifier_type=None, model=None, ema=None, seed=0):
    torch.manual_seed(seed)
    model = model or build_model(kind, config, diffusion["num_timesteps"], classifier_type)
    save_model(
        path, kind=kind, model_config=config, diffusion=diffusion, classifier_type=classifier_type,
        state_dict=model.state_dict(), ema_state_dict=ema, step=7, train_args={},
    )  # fmt: skip
    return model


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    paths = {name: root / f"{name}.pt" for name in ("full", "shallow", "ee", "ee_backbone", "rgb", "t50", "cond", "ema")}
    save(paths["full"], "uvit", CONFIG)
    save(paths["shallow"], "uvit", {**CONFIG, "depth": 1}, seed=1)
    ee = save(paths["ee"], "early_exit", CONFIG, classifier_type="mlp_probe_per_layer", seed=2)
    # The early-exit model's own backbone as a plain U-ViT: exit `depth` must reproduce it.
    save(paths["ee_backbone"], "uvit", CONFIG, model=ee.backbone)
    save(paths["rgb"], "uvit", {**CONFIG, "in_chans": 3})
    save(paths["t50"], "uvit", CONFIG, diffusion={**DIFFUSION, "num_timesteps": 50})
    save(paths["cond"], "uvit", {**CONFIG, "num_classes": 3})
    other = build_model("uvit", CONFIG, 100)
    save(paths["ema"], "uvit", CONFIG, ema=other.state_dict())
    return paths


def sample(ckpt, out, method="full", **kwargs):
    args = cli_args(
        "sample",
        checkpoint_path=ckpt[{"full": "full", "shallow": "shallow", "early_exit": "ee", "duodiff": "shallow"}.get(method, "full")],
        method=method, output_folder=out, sampler="ddim", steps=STEPS, n_samples=10, batch_size=4, seed=0,
        progress=False,
    )  # fmt: skip
    if method == "duodiff":
        args.update(checkpoint_path_late=ckpt["full"], t_switch=2)
    if method == "early_exit":
        args.update(threshold=0.5)
    args.update(kwargs)
    return run_sample(**args)


def images(folder):
    files = sorted((folder / "images").iterdir())
    return [f.name for f in files], np.stack([np.array(Image.open(f)) for f in files])


def test_png_mapping_matches_torchvision_save_image(tmp_path):
    from torchvision.utils import save_image

    x = torch.tensor([-1.5, -1.0, -0.999, -0.5, 0.0, 0.001, 0.5, 0.99, 1.0, 1.7] + [0.25] * 6).view(1, 4, 4)
    save_image((x + 1) / 2, tmp_path / "ref.png")
    save_png(to_uint8(x), tmp_path / "ours.png")
    ref = np.array(Image.open(tmp_path / "ref.png").convert("L"))
    ours = Image.open(tmp_path / "ours.png")
    assert ours.mode == "L" and np.array_equal(np.array(ours), ref)
    assert np.array(ours)[0].tolist() == [0, 0, 0, 64]  # -0.999 -> 0.1275 + 0.5 -> 0; -0.5 -> 64.25 -> 64


@pytest.mark.parametrize("method", ["full", "shallow", "early_exit", "duodiff"])
def test_each_method_writes_a_complete_set(ckpt, tmp_path, method):
    out = tmp_path / method
    stats = sample(ckpt, out, method)
    names, pixels = images(out)
    assert names == [f"{i:06d}.png" for i in range(10)]
    assert pixels.shape == (10, 8, 8) and pixels.dtype == np.uint8
    assert sorted(p.name for p in (out / "parts").iterdir()) == ["batch_00000.pt", "batch_00001.pt", "batch_00002.pt"]
    assert Image.open(out / "grid.png").size == (8 * 34 + 2, 2 * 34 + 2)  # 8x8 enlarged to 32, padding 2
    exit_layers = torch.load(out / "exit_layers.pt")
    assert exit_layers.shape == (STEPS, 10) and exit_layers.dtype == torch.long
    assert stats["method"] == method and stats["n_samples"] == 10 and stats["steps"] == STEPS
    timed = stats["wall_time_s"] if stats["timing_clock"] == "wall" else stats["cpu_time_s"]
    assert stats["images_per_s"] == pytest.approx(10 / timed)
    assert stats["mean_exit_layer_per_step"] == pytest.approx(exit_layers.float().mean(1).tolist())
    full_depth = {"shallow": 1}.get(method, 3)
    expected = {
        "full": ("-", 3, None, [3] * STEPS),
        "shallow": ("-", 1, 1, [1] * STEPS),
        "duodiff": ("t_switch=2", 3, 1, [1, 1, 3, 3, 3, 3]),
        "early_exit": ("threshold=0.5", 3, None, None),
    }[method]
    assert (stats["setting"], stats["depth"], stats["shallow_depth"]) == expected[:3]
    if expected[3] is not None:
        assert stats["mean_exit_layer_per_step"] == expected[3]
        assert stats["layer_ratio"] == pytest.approx(sum(expected[3]) / STEPS / full_depth)
    else:
        assert stats["classifier_type"] == "mlp_probe_per_layer"
        assert ((exit_layers >= 0) & (exit_layers <= 3)).all()
    assert (out / "stats.json").is_file()


@pytest.mark.parametrize("threads, clock", [(1, "cpu"), (2, "wall")])
def test_throughput_clock_follows_the_thread_count(ckpt, tmp_path, threads, clock):
    # The pipeline's sampling jobs run with one thread, side by side: their throughput is taken
    # from the process's CPU time, which another job on the other core cannot inflate.
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        stats = sample(ckpt, tmp_path / "set")
    finally:
        torch.set_num_threads(before)
    parts = [torch.load(p, weights_only=False) for p in sorted((tmp_path / "set" / "parts").iterdir())]
    assert [part["timing_clock"] for part in parts] == [clock] * 3
    key = {"cpu": "cpu_time_s", "wall": "wall_time_s"}[clock]
    assert stats["timing_clock"] == clock
    assert stats["images_per_s"] == pytest.approx(10 / sum(part[key] for part in parts))
    assert stats["wall_time_s"] == pytest.approx(sum(part["wall_time_s"] for part in parts))


@pytest.mark.parametrize("sampler", ["ddim", "dpm_solver"])
def test_duodiff_edge_cases_reproduce_single_model_sets(ckpt, tmp_path, sampler):
    sample(ckpt, tmp_path / "full", sampler=sampler)
    sample(ckpt, tmp_path / "shallow", "shallow", sampler=sampler)
    full, shallow = images(tmp_path / "full")[1], images(tmp_path / "shallow")[1]
    sample(ckpt, tmp_path / "ts0", "duodiff", t_switch=0, sampler=sampler)
    sample(ckpt, tmp_path / "tsall", "duodiff", t_switch=STEPS, sampler=sampler)
    sample(ckpt, tmp_path / "ts3", "duodiff", t_switch=3, sampler=sampler)
    assert np.array_equal(images(tmp_path / "ts0")[1], full)
    assert np.array_equal(images(tmp_path / "tsall")[1], shallow)
    mixed = images(tmp_path / "ts3")[1]
    assert not np.array_equal(mixed, full) and not np.array_equal(mixed, shallow)


@pytest.mark.parametrize("sampler", ["ddim", "dpm_solver"])
def test_early_exit_thresholds_bound_the_exits(ckpt, tmp_path, sampler):
    # Uncertainties lie in [0, 1]: threshold 1 exits everything at exit 0 (no block runs);
    # threshold 0 (random probes never output exactly 0) runs the whole backbone, which must give
    # the backbone's own samples.
    stats = sample(ckpt, tmp_path / "t1", "early_exit", threshold=1.0, sampler=sampler)
    assert torch.load(tmp_path / "t1" / "exit_layers.pt").eq(0).all() and stats["layer_ratio"] == 0.0
    stats = sample(ckpt, tmp_path / "t0", "early_exit", threshold=0.0, sampler=sampler)
    assert torch.load(tmp_path / "t0" / "exit_layers.pt").eq(3).all() and stats["layer_ratio"] == 1.0
    assert torch.load(tmp_path / "t0" / "exit_layers.pt").shape[0] == STEPS
    sample(ckpt, tmp_path / "backbone", "full", checkpoint_path=ckpt["ee_backbone"], sampler=sampler)
    assert np.array_equal(images(tmp_path / "t0")[1], images(tmp_path / "backbone")[1])


def test_same_seed_same_images_other_seed_other_images(ckpt, tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        sample(ckpt, tmp_path / name, "full", sampler="ddim", eta=1.0, seed=seed)
    a, b, c = (images(tmp_path / name)[1] for name in "abc")
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # Batch b uses seed * 1000003 + b: batch 1 of seed 3 starts from this x_T.
    g = torch.Generator().manual_seed(3 * 1000003 + 1)
    assert sample_set.batch_seed(3, 1) == 3 * 1000003 + 1
    assert torch.equal(torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3000010)))


def test_batch_size_does_not_change_the_first_batch(ckpt, tmp_path):
    # Batches are independent: with batch size 4, samples 0-3 are batch 0 whatever n_samples is.
    sample(ckpt, tmp_path / "n10", n_samples=10)
    sample(ckpt, tmp_path / "n4", n_samples=4)
    assert np.array_equal(images(tmp_path / "n10")[1][:4], images(tmp_path / "n4")[1])


def test_resume_finishes_only_missing_batches(ckpt, tmp_path):
    out = tmp_path / "set"
    sample(ckpt, out, "duodiff", sampler="ddpm", steps=None)
    names, before = images(out)
    part0 = torch.load(out / "parts" / "batch_00000.pt", weights_only=False)
    # A killed job: batch 1 lost an image, batch 2 never wrote its part file.
    (out / "images" / "000005.png").unlink()
    (out / "parts" / "batch_00002.pt").unlink()
    (out / "stats.json").unlink()
    stats = sample(ckpt, out, "duodiff", sampler="ddpm", steps=None)
    names_after, after = images(out)
    assert names_after == names and np.array_equal(after, before)
    assert len(list((out / "parts").iterdir())) == 3 and not list(out.rglob(".tmp-*"))
    # Batch 0 was not redone: its part file (and measured time) is the original one.
    assert torch.load(out / "parts" / "batch_00000.pt", weights_only=False)["wall_time_s"] == part0["wall_time_s"]
    assert stats["steps"] == 100 and torch.load(out / "exit_layers.pt").shape == (100, 10)
    # A finished set rerun is a no-op apart from the summary files.
    assert sample(ckpt, out, "duodiff", sampler="ddpm", steps=None)["wall_time_s"] == stats["wall_time_s"]


def test_resume_with_other_settings_is_refused(ckpt, tmp_path):
    out = tmp_path / "set"
    sample(ckpt, out, n_samples=4)
    with pytest.raises(DuodiffError, match=r"other inputs or settings \(--seed 0 -> 1\); rerun with --restart"):
        sample(ckpt, out, n_samples=4, seed=1)
    with pytest.raises(DuodiffError, match=r"other inputs or settings \(--n-samples 4 -> 8\)"):
        sample(ckpt, out, n_samples=8)


@pytest.mark.parametrize("method", ["full", "early_exit", "duodiff"])
def test_bf16_runs_the_networks_in_bfloat16_and_stays_close_to_fp32(ckpt, tmp_path, monkeypatch, method):
    # What the networks' linear layers produce: bfloat16 under --precision bf16, float32 otherwise.
    linear_forward = torch.nn.Linear.forward
    seen = {}
    results = {}
    for precision in ("fp32", "bf16"):
        seen[precision] = dtypes = set()

        def recording_forward(self, x, dtypes=dtypes):
            out = linear_forward(self, x)
            dtypes.add(out.dtype)
            return out

        monkeypatch.setattr(torch.nn.Linear, "forward", recording_forward)
        stats = sample(ckpt, tmp_path / precision, method, precision=precision)
        results[precision] = (stats, images(tmp_path / precision)[1].astype(int))
    assert seen == {"fp32": {torch.float32}, "bf16": {torch.bfloat16}}
    (fp32_stats, fp32_images), (bf16_stats, bf16_images) = results["fp32"], results["bf16"]
    assert (fp32_stats["precision"], bf16_stats["precision"]) == ("fp32", "bf16")
    # bf16 keeps 8 significant bits (relative rounding 2^-9) in the networks only; the sampler's
    # updates stay float32, so after 6 DDIM steps the 8-bit images differ by at most a grey level
    # or two (observed: max 1, mean 0.01).
    diff = np.abs(bf16_images - fp32_images)
    assert diff.max() <= 2 and diff.mean() < 0.1, (diff.mean(), diff.max())


def test_sets_sampled_before_fingerprints_are_refused_and_restart_resamples_them(ckpt, tmp_path):
    out = tmp_path / "set"
    sample(ckpt, out, n_samples=8)
    # A part written by a previous version: settings with the model's path and step, no fingerprint
    # of its bytes, so nothing says the images are this model's.
    path = out / "parts" / "batch_00001.pt"
    part = torch.load(path, weights_only=False)
    del part["fingerprint"]
    torch.save(part, path)
    (out / "parts" / "batch_00000.pt").unlink()
    with pytest.raises(DuodiffError, match=r"no fingerprint .*--restart"):
        sample(ckpt, out, n_samples=8)
    assert sample(ckpt, out, n_samples=8, restart=True)["precision"] == "fp32"
    with pytest.raises(DuodiffError, match=r"--precision 'fp32' -> 'bf16'"):
        sample(ckpt, out, n_samples=8, precision="bf16")


def test_conditional_model_and_ema_choice(ckpt, tmp_path):
    stats = sample(ckpt, tmp_path / "cond", checkpoint_path=ckpt["cond"], n_samples=5)
    assert stats["num_classes"] == 3 and len(images(tmp_path / "cond")[0]) == 5
    sample(ckpt, tmp_path / "ema", checkpoint_path=ckpt["ema"], n_samples=4)
    sample(ckpt, tmp_path / "raw", checkpoint_path=ckpt["ema"], n_samples=4, use_ema=False)
    sample(ckpt, tmp_path / "full", n_samples=4)
    # The stored raw weights are the `full` model's; the EMA weights are another model's.
    assert np.array_equal(images(tmp_path / "raw")[1], images(tmp_path / "full")[1])
    assert not np.array_equal(images(tmp_path / "ema")[1], images(tmp_path / "raw")[1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="fast"), "--method must be one of full, shallow, early_exit, duodiff, cache, l2c; got 'fast'"),
        (dict(sampler="euler"), "--sampler must be one of ddpm, ddim, dpm_solver, dpm_solver_fast, euler_maruyama; got 'euler'"),
        (dict(n_samples=0), "--n-samples must be a positive integer; got 0"),
        (dict(batch_size=-2), "--batch-size must be a positive integer; got -2"),
        (dict(steps=0), "--steps must be a positive integer; got 0"),
        (dict(steps=101), "--steps must be an integer in [1, 100] for the ddim sampler; got 101"),
        (dict(sampler="ddpm", steps=10), "--steps must be 100 (num_timesteps) for the ddpm sampler, got 10"),
        (dict(sampler="ddpm", steps=None, eta=0.5), "--eta applies to the ddim sampler only; got --eta 0.5"),
        (dict(device="tpu"), "--device must be"),
        (dict(threshold=0.2), "--threshold applies to --method early_exit (and duodiff with an early-exit "
                              "--checkpoint-path-late) only; got --threshold 0.2 with --method full"),
        (dict(t_switch=3), "--t-switch applies to --method duodiff only"),
        (dict(checkpoint_path="ee"), "--method full needs a uvit model; "),
        (dict(method="early_exit", checkpoint_path="full"), "--method early_exit needs an early_exit model"),
        (dict(method="early_exit", threshold=None), "--method early_exit needs --threshold"),
        (dict(method="early_exit", threshold=1.5), "--threshold must be in [0, 1]; got 1.5"),
        (dict(method="duodiff", checkpoint_path_late=None), "--method duodiff needs --checkpoint-path-late"),
        (dict(method="duodiff", t_switch=None), "--method duodiff needs --t-switch"),
        (dict(method="duodiff", t_switch=STEPS + 1), f"--t-switch must be in [0, {STEPS}] (the number of sampling steps); got {STEPS + 1}"),
        (dict(method="duodiff", checkpoint_path_late="rgb"), "in_chans is 1 in "),
        (dict(method="duodiff", checkpoint_path_late="t50"), "same diffusion settings"),
        # an early-exit late model is DuoDiff with early exit (tests/test_composed.py): it needs the threshold
        (dict(method="duodiff", checkpoint_path_late="ee"), "is an early_exit model: DuoDiff with early exit in the "
                                                            "late phase needs --threshold"),
        (dict(method="duodiff", checkpoint_path="full", checkpoint_path_late="shallow"),
         "(3 blocks) must be shallower than --checkpoint-path-late"),
        (dict(method="duodiff", checkpoint_path="full"), "--checkpoint-path and --checkpoint-path-late are the same file"),
        (dict(allow_deeper_shallow=True), "--allow-deeper-shallow applies to --method duodiff only"),
        (dict(checkpoint_path="missing"), "no such file"),
        (dict(precision="fp8"), "--precision must be one of fp32, tf32, bf16, fp16; got 'fp8'"),
        (dict(precision="tf32"), "--precision tf32 needs --device cuda; on cpu choose fp32 or bf16"),
        (dict(precision="fp16"), "--precision fp16 needs --device cuda"),
    ],
)
def test_bad_arguments_fail_before_any_work(ckpt, tmp_path, kwargs, message):
    for key in ("checkpoint_path", "checkpoint_path_late"):
        if isinstance(kwargs.get(key), str):
            kwargs[key] = ckpt.get(kwargs[key], tmp_path / "missing.pt")
    out = tmp_path / "out"
    with pytest.raises(DuodiffError) as error:
        sample(ckpt, out, **{"method": "full", **kwargs})
    assert message in str(error.value)
    assert not out.exists()


def test_cli_accepts_the_seed_spellings(ckpt, tmp_path):
    parser = OneLineErrorParser(prog="duodiff")
    sample_set.add_cli(parser.add_subparsers(dest="command", parser_class=OneLineErrorParser))
    out = tmp_path / "cli"
    args = parser.parse_args(
        ["sample", "--checkpoint_path", str(ckpt["shallow"]), "--checkpoint-path-late", str(ckpt["full"]),
         "--method", "duodiff", "--t_switch", "1", "--sampler", "ddim", "--steps", "3", "--n_samples", "3",
         "--batch-size", "2", "--seed", "5", "--output_folder", str(out), "--no-ema", "--no-progress"]
    )  # fmt: skip
    args.func(args)
    stats = read_json(out / "stats.json")
    assert (stats["t_switch"], stats["seed"], stats["use_ema"], stats["n_samples"]) == (1, 5, False, 3)
    assert math.isclose(stats["layer_ratio"], (1 * 1 + 2 * 3) / 3 / 3)


@pytest.mark.parametrize("n, channels, size", [(2, 1, 8), (7, 1, 8), (8, 3, 32), (9, 1, 8), (64, 1, 8), (13, 3, 40)])
def test_image_grid_lays_images_out_as_torchvision_make_grid(n, channels, size):
    # The reference is torchvision's make_grid on the enlarged images (nearest neighbour to >= 32 px).
    from torchvision.utils import make_grid

    from duodiff.core.images import image_grid

    images = torch.randint(0, 256, (n, channels, size, size), generator=torch.Generator().manual_seed(n), dtype=torch.uint8)
    factor = math.ceil(32 / size)
    enlarged = images.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)
    expected = make_grid(enlarged, nrow=8, padding=2, pad_value=255)
    assert torch.equal(image_grid(images), expected)


def test_a_one_image_grid_is_padded_and_rgb_like_any_other():
    # (make_grid returns a lone image as it is, without padding; a grid of one keeps its frame.)
    from duodiff.core.images import image_grid

    grid = image_grid(torch.zeros(1, 1, 8, 8, dtype=torch.uint8))
    assert grid.shape == (3, 36, 36)
    assert (grid[:, 2:34, 2:34] == 0).all() and (grid[:, :2] == 255).all() and (grid[:, 34:] == 255).all()
    assert (grid[:, :, :2] == 255).all() and (grid[:, :, 34:] == 255).all()
