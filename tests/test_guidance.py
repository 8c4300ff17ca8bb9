"""Classifier-free guidance: scale 0 is the conditional model, another scale is U-ViT's formula
out_c + s (out_c - out_u) computed from separate model calls; it works with DuoDiff (both branches
switch at the same step) and early exit (each branch by its own rule, both counted)."""

import torch

from duodiff.diffusion import DuoDiffDenoiser, EarlyExitDenoiser, GaussianDiffusion, ModelDenoiser
from duodiff.guidance import GuidedDenoiser, guided_labels
from duodiff.models import build_model

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
