"""Classifier-free guidance: scale 0 is the conditional model, another scale is U-ViT's formula
out_c + s (out_c - out_u) computed from separate model calls; it works with DuoDiff (both branches
switch at the same step) and early exit (each branch by its own rule, both counted)."""

import numpy as np
import pytest
import torch
from _defaults import cli_args
from PIL import Image

from duodiff.core.diffusion import GaussianDiffusion
from duodiff.core.dpm_solver import dpm_solver_sample
from duodiff.core.errors import DuodiffError
from duodiff.core.guidance import GuidedDenoiser, guided_labels
from duodiff.core.images import to_uint8
from duodiff.metrics import flops
from duodiff.models import build_model
from duodiff.models.checkpoints import save_model
from duodiff.sample import sample_set
from duodiff.sample.policies import DuoDiffDenoiser, EarlyExitDenoiser, ModelDenoiser

NULL = 10  # 10 classes + the null class
TINY = dict(img_size=8, patch_size=4, in_chans=1, embed_dim=32, depth=3, num_heads=2, num_classes=NULL + 1)


def model(depth=3, seed=0):
    torch.manual_seed(seed)
    return build_model("uvit", {**TINY, "depth": depth}).eval()


def inputs(batch=4):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1, 8, 8, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, NULL, (batch,), generator=g)
    return x, t, y


@torch.no_grad()
def test_scale_zero_is_the_conditional_model():
    net = model()
    x, t, y = inputs()
    guided = GuidedDenoiser(ModelDenoiser(net, guided_labels(y, NULL)), scale=0.0)
    torch.testing.assert_close(guided(x, t, 0), net(x, t, y), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_formula_at_another_scale():
    net = model()
    x, t, y = inputs()
    s = 1.5
    want = (1 + s) * net(x, t, y) - s * net(x, t, torch.full_like(y, NULL))
    guided = GuidedDenoiser(ModelDenoiser(net, guided_labels(y, NULL)), scale=s)
    torch.testing.assert_close(guided(x, t, 0), want, atol=1e-5, rtol=1e-5)
    assert guided.executed_depth(2, 4).shape == (2, 8)


@torch.no_grad()
def test_duodiff_switches_both_branches_at_the_same_step():
    shallow, full = model(depth=1, seed=1), model(depth=3, seed=2)
    x, t, y = inputs()
    null = torch.full_like(y, NULL)
    guided = GuidedDenoiser(DuoDiffDenoiser(shallow, full, 2, guided_labels(y, NULL)), scale=0.4)
    for step, net in ((0, shallow), (1, shallow), (2, full)):
        want = 1.4 * net(x, t, y) - 0.4 * net(x, t, null)
        torch.testing.assert_close(guided(x, t, step), want, atol=1e-5, rtol=1e-5)
    depth = guided.executed_depth(4, 4)
    assert depth[:2].eq(1).all() and depth[2:].eq(3).all() and depth.shape == (4, 8)


@torch.no_grad()
def test_early_exit_each_branch_by_its_own_rule():
    torch.manual_seed(3)
    ee = build_model("early_exit", {**TINY, "probe_hidden": 8}, classifier_type="mlp_probe_per_layer").eval()
    x, t, y = inputs()
    null = torch.full_like(y, NULL)
    threshold = 0.5
    guided = GuidedDenoiser(EarlyExitDenoiser(ee, threshold, guided_labels(y, NULL)), scale=2.0)
    out = guided(x, t, 0)
    cond, exit_c = ee.forward_early_exit(x, t, threshold, y)
    uncond, exit_u = ee.forward_early_exit(x, t, threshold, null)
    torch.testing.assert_close(out, 3.0 * cond - 2.0 * uncond, atol=1e-5, rtol=1e-5)
    assert guided.exit_layers.tolist() == [exit_c.tolist() + exit_u.tolist()]


@torch.no_grad()
def test_guided_sampling_runs_every_step_with_both_branches():
    net = model()
    calls = []

    class Recording(ModelDenoiser):
        def __call__(self, x, t, step_index):
            calls.append((x.shape[0], step_index))
            return super().__call__(x, t, step_index)

    diffusion = GaussianDiffusion(1000, 1e-4, 0.02, "predict_noise")
    x, _, y = inputs(batch=3)
    out = diffusion.sample(GuidedDenoiser(Recording(net, guided_labels(y, NULL)), 0.4), x, sampler="ddim", steps=5)
    assert out.shape == x.shape and calls == [(6, i) for i in range(5)]


@torch.no_grad()
def test_guided_dpm_solver_follows_the_guided_noise_prediction():
    """DPM-Solver with guidance: the trajectory of the combined prediction (1 + s) out_c - s out_u,
    written here from two plain model calls per step."""
    net = model()
    x, _, y = inputs(batch=3)
    null = torch.full_like(y, NULL)
    diffusion = GaussianDiffusion(1000, 1e-4, 0.02, "predict_noise")
    ts = diffusion.timesteps("dpm_solver", 6)

    def by_hand(x, t, i):
        return 1.4 * net(x, t, y) - 0.4 * net(x, t, null)

    want = dpm_solver_sample(diffusion, by_hand, x, ts, order=2)
    got = diffusion.sample(GuidedDenoiser(ModelDenoiser(net, guided_labels(y, NULL)), 0.4), x, "dpm_solver", 6)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# ---- end to end: `duodiff sample --guidance-scale` on tiny class-conditional models -------------

CLASSES = 3  # real classes; the models below have CLASSES + 1 class tokens, the last the null class
COND = dict(img_size=8, patch_size=4, in_chans=1, embed_dim=16, depth=3, num_heads=2, normalize_timesteps=True,
            probe_hidden=8, num_classes=CLASSES + 1)  # fmt: skip
DIFFUSION = dict(num_timesteps=100, beta_start=1e-4, beta_end=0.02, parametrization="predict_noise")
STEPS, N, BATCH, SCALE = 5, 6, 4, 1.5


def save_tiny(path, kind, config, train_args, classifier_type=None, seed=0):
    torch.manual_seed(seed)
    net = build_model(kind, config, DIFFUSION["num_timesteps"], classifier_type).eval()
    with torch.no_grad():  # labels that matter: out_c and out_u far apart, so the formula shows in the images
        for name, weight in net.named_parameters():
            if name.endswith("label_emb.weight"):
                weight.normal_(0, 3.0)
    save_model(path, kind=kind, model_config=config, diffusion=DIFFUSION, classifier_type=classifier_type,
               state_dict=net.state_dict(), ema_state_dict=None, step=1, train_args=train_args)  # fmt: skip
    return net


@pytest.fixture(scope="session")
def guided_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("guided")
    dropout = {"label_dropout": 0.15}
    nets = {
        "full": save_tiny(root / "full.pt", "uvit", COND, dropout),
        "shallow": save_tiny(root / "shallow.pt", "uvit", {**COND, "depth": 1}, dropout, seed=1),
        "ee": save_tiny(root / "ee.pt", "early_exit", COND, dropout, "mlp_probe_per_layer", seed=2),
        "no_null": save_tiny(root / "no_null.pt", "uvit", {**COND, "num_classes": CLASSES}, {}),
        "uncond": save_tiny(root / "uncond.pt", "uvit", {**COND, "num_classes": 0}, {}),
    }
    return {name: root / f"{name}.pt" for name in nets}, nets


def guided_sample(paths, out, method, scale=SCALE, **changes):
    args = cli_args(
        "sample", checkpoint_path=paths["ee" if method == "early_exit" else "shallow" if method == "duodiff" else "full"],
        method=method, output_folder=out, sampler="ddim", steps=STEPS, n_samples=N, batch_size=BATCH, seed=3,
        progress=False, guidance_scale=scale,
    )  # fmt: skip
    if method == "duodiff":
        args.update(checkpoint_path_late=paths["full"], t_switch=2)
    if method == "early_exit":
        args.update(threshold=0.3)
    return sample_set.run_sample(**{**args, **changes})


def pixels(folder):
    return np.stack([np.array(Image.open(f)) for f in sorted((folder / "images").iterdir())]).astype(int)


@pytest.fixture
def float_samples(monkeypatch):
    """The set's samples before they become PNGs (sample_set.to_uint8's inputs), batch by batch."""
    seen = []

    def recording(x):
        seen.append(x.detach().clone())
        return to_uint8(x)

    monkeypatch.setattr(sample_set, "to_uint8", recording)
    return seen


def by_hand(eps_of, seed=3, scale=SCALE):
    """The set's images from U-ViT's formula written out, batch by batch, with the set's noise and labels
    (drawn as run_sample documents: noise, then labels from the real classes, from batch b's seed)."""
    diffusion = GaussianDiffusion(**DIFFUSION)
    samples = []
    for b, start in enumerate(range(0, N, BATCH)):
        count = min(BATCH, N - start)
        g = torch.Generator().manual_seed(sample_set.batch_seed(seed, b))
        noise = torch.randn((count, 1, 8, 8), generator=g)
        y = torch.randint(CLASSES, (count,), generator=g)
        null = torch.full_like(y, CLASSES)

        def guided(x, t, step, y=y, null=null):
            return (1 + scale) * eps_of(step, x, t, y) - scale * eps_of(step, x, t, null)

        with torch.no_grad():
            samples.append(diffusion.sample(guided, noise, "ddim", STEPS, eta=0.0, generator=g))
    return torch.cat(samples)


@pytest.mark.parametrize("method", ["full", "shallow", "duodiff"])
def test_guided_sets_are_the_formula_and_count_both_branches(guided_models, tmp_path, float_samples, method):
    paths, nets = guided_models
    stats = guided_sample(paths, tmp_path / method, method, **({"checkpoint_path": paths["shallow"]} if method == "shallow" else {}))
    net = {"full": nets["full"], "shallow": nets["shallow"]}.get(method)
    if method == "duodiff":
        def eps_of(step, x, t, y):
            return (nets["shallow"] if step < 2 else nets["full"])(x, t, y)
    else:
        def eps_of(step, x, t, y):
            return net(x, t, y)
    # One batch of 2B against two calls of B: the same samples up to float rounding (about 1e-7),
    # which half the scale would not give (random tiny networks barely heed the label: about 1e-4).
    got = torch.cat(float_samples)
    torch.testing.assert_close(got, by_hand(eps_of), atol=2e-6, rtol=0)
    assert (got - by_hand(eps_of, scale=0.5 * SCALE)).abs().max() > 5e-5
    assert np.array_equal(pixels(tmp_path / method), to_uint8(got).squeeze(1).numpy())
    exit_layers = torch.load(tmp_path / method / "exit_layers.pt")
    depths = {"full": [3] * STEPS, "shallow": [1] * STEPS, "duodiff": [1, 1, 3, 3, 3]}[method]
    assert exit_layers.tolist() == [[d] * (2 * N) for d in depths]  # (steps, 2n): both branches
    assert (stats["guidance_scale"], stats["branches"], stats["n_samples"]) == (SCALE, 2, N)
    assert stats["layer_ratio"] == pytest.approx(sum(depths) / STEPS / (1 if method == "shallow" else 3))


def test_guided_early_exit_each_branch_exits_by_its_own_rule(guided_models, tmp_path):
    paths, nets = guided_models
    ee = nets["ee"]
    stats = guided_sample(paths, tmp_path / "ee", "early_exit")
    exit_layers = torch.load(tmp_path / "ee" / "exit_layers.pt")
    assert exit_layers.shape == (STEPS, 2 * N) and stats["branches"] == 2
    # Replay batch 0 by hand, each branch alone through the per-sample exit rule.
    g = torch.Generator().manual_seed(sample_set.batch_seed(3, 0))
    x = torch.randn((BATCH, 1, 8, 8), generator=g)
    y = torch.randint(CLASSES, (BATCH,), generator=g)
    diffusion = GaussianDiffusion(**DIFFUSION)
    exits = []

    def guided(x, t, step):
        cond, exit_c = ee.forward_early_exit(x, t, 0.3, y)
        uncond, exit_u = ee.forward_early_exit(x, t, 0.3, torch.full_like(y, CLASSES))
        exits.append((exit_c, exit_u))
        return (1 + SCALE) * cond - SCALE * uncond

    with torch.no_grad():
        diffusion.sample(guided, x, "ddim", STEPS, eta=0.0, generator=g)
    # Columns 0..N-1: the conditional branches of the set's samples; N..2N-1: their unconditional twins.
    assert exit_layers[:, :BATCH].tolist() == [c.tolist() for c, _ in exits]
    assert exit_layers[:, N : N + BATCH].tolist() == [u.tolist() for _, u in exits]
    assert stats["layer_ratio"] == pytest.approx(exit_layers.double().mean().item() / 3)
    # GFLOPs per image: both branches' evaluations, each at its own exit.
    out = flops.run_flops(**cli_args("flops", samples=tmp_path / "ee", output=tmp_path / "ee.json"))
    lut = [entry["total"] for entry in flops.exit_lut(flops.model_costs("early_exit", COND, 100, "mlp_probe_per_layer"))]
    per_image = sum(lut[k] for k in exit_layers.flatten().tolist()) / N
    assert out["gflops_per_image"] == pytest.approx(per_image / 1e9, rel=1e-12)
    assert (out["n_samples"], out["branches"], out["guidance_scale"]) == (N, 2, SCALE)


def test_sample_labels_never_take_the_null_class(guided_models, tmp_path, monkeypatch):
    paths, _ = guided_models
    seen = []
    make = sample_set.make_denoiser

    def recording(method, models, threshold, t_switch, y, *rest):
        seen.append(y.clone())
        return make(method, models, threshold, t_switch, y, *rest)

    monkeypatch.setattr(sample_set, "make_denoiser", recording)
    for name, scale in (("full", 0.0), ("full", SCALE), ("no_null", 0.0)):
        seen.clear()
        guided_sample(paths, tmp_path / f"{name}{scale}", "full", scale, checkpoint_path=paths[name], n_samples=60,
                      batch_size=30, steps=1)  # fmt: skip
        labels = torch.cat(seen)
        # With a null class (label CLASSES) the labels are the real classes only, guided or not;
        # a model without one draws from all its num_classes = CLASSES labels, as before.
        assert labels.min() == 0 and labels.max() == CLASSES - 1 and len(labels.unique()) == CLASSES


def test_guidance_is_refused_for_models_without_a_null_class(guided_models, tmp_path):
    paths, _ = guided_models
    for name, num_classes in (("no_null", CLASSES), ("uncond", 0)):
        with pytest.raises(DuodiffError, match=rf"--guidance-scale {SCALE} needs .*--label-dropout > 0.*num_classes {num_classes} and label_dropout 0"):
            guided_sample(paths, tmp_path / name, "full", checkpoint_path=paths[name])
        assert not (tmp_path / name).exists()
    with pytest.raises(DuodiffError, match="--guidance-scale must be a finite number"):
        guided_sample(paths, tmp_path / "nan", "full", float("nan"))
