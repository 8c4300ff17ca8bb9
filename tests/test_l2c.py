"""Learning-to-Cache on U-ViT (`duodiff train-router`, `duodiff sample --method l2c`): the routed
forward, its policy, what it runs and costs, and the router's training. Tiny random models;
expectations computed independently (the plain forward, residuals added by hand, forward hooks
counting attention / MLP calls, a hand count of the linear layers)."""

import pytest
import torch
from _defaults import cli_args

from duodiff.core.errors import DuodiffError
from duodiff.core.io import read_json
from duodiff.metrics import flops
from duodiff.models import build_model
from duodiff.models.checkpoints import save_model
from duodiff.models.router import ROUTER_FORMAT, ROUTER_VERSION, cache_steps, load_router, routing_plan
from duodiff.models.uvit import UViT, UViTConfig
from duodiff.sample.policies import RouterDenoiser, make_denoiser
from duodiff.sample.sample_set import run_sample
from duodiff.train.router import router_objective, run_train_router

torch.set_num_threads(1)

DIFFUSION = dict(num_timesteps=100, beta_start=1e-4, beta_end=0.02, parametrization="predict_noise")
CONFIG = dict(img_size=8, patch_size=2, in_chans=2, embed_dim=32, depth=5, num_heads=4)
SMALL = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=5, num_heads=2, normalize_timesteps=True)


def model_and_inputs(seed=0, n=3, num_classes=0):
    torch.manual_seed(seed)
    model = UViT(UViTConfig(**CONFIG, num_classes=num_classes)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, CONFIG["in_chans"], 8, 8, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g) if num_classes else None
    return model, x, t, y


def layer_calls(model):
    """Forward hooks on every block's attention and MLP -> [(block, "attn" | "mlp"), ...] per call."""
    calls = []
    for i in range(model.depth):
        block = model.block(i)
        block.attn.register_forward_hook(lambda m, a, o, i=i: calls.append((i, "attn")))
        block.mlp.register_forward_hook(lambda m, a, o, i=i: calls.append((i, "mlp")))
    return calls


def test_every_gate_open_is_bitwise_the_full_model():
    model, x, t, y = model_and_inputs(num_classes=4)
    with torch.no_grad():
        full = model(x, t, y)
        first, cache = model.forward_routed(x, t, y)
        assert torch.equal(first, full)
        x2, t2 = x * 0.9, t // 2
        routed, _ = model.forward_routed(x2, t2, y, run=[(True, True)] * model.depth, cache=cache)
        assert torch.equal(routed, model(x2, t2, y))


def test_every_gate_closed_adds_the_previous_residuals_by_hand():
    model, x, t, y = model_and_inputs()
    with torch.no_grad():
        _, cache = model.forward_routed(x, t, y)
        x2, t2 = torch.randn_like(x), t // 3
        routed, _ = model.forward_routed(x2, t2, y, run=[(False, False)] * model.depth, cache=cache)
        # by hand: embedding, then each block adds its cached residuals; out-blocks merge the skip first
        h = model.embed(x2, t2, y)
        skips, half = [], model.depth // 2
        for i in range(model.depth):
            block = model.block(i)
            if i > half:
                h = block.skip_linear(torch.cat([h, skips.pop()], dim=-1))
            h = h + cache[i][0]
            h = h + cache[i][1]
            if i < half:
                skips.append(h)
        expected = model.head(h)
    assert torch.equal(routed, expected)
    assert not torch.allclose(routed, model(x2, t2, y))


def test_gated_off_layers_are_not_executed():
    model, x, t, y = model_and_inputs()
    calls = layer_calls(model)
    run = [(True, False), (False, False), (False, True), (True, True), (False, False)]
    with torch.no_grad():
        _, cache = model.forward_routed(x, t, y)
        assert len(calls) == 2 * model.depth
        calls.clear()
        model.forward_routed(x, t, y, run=run, cache=cache)
    assert calls == [(0, "attn"), (2, "mlp"), (3, "attn"), (3, "mlp")]


def write_router(path, logits, steps, depth, sampler="ddim", model_sha256="x"):
    torch.save({"format": ROUTER_FORMAT, "version": ROUTER_VERSION, "logits": logits, "cache_steps": cache_steps(steps),
                "steps": steps, "sampler": sampler, "eta": 0.0, "guidance_scale": 0.0, "depth": depth,
                "model_sha256": model_sha256, "settings": {}}, path)  # fmt: skip


def test_the_policy_runs_what_the_router_and_threshold_say(tmp_path):
    model, x, t, y = model_and_inputs()
    steps = 5  # cache steps 1 and 3
    logits = torch.full((2, model.depth, 2), -3.0)  # gates 0.047: closed at threshold 0.5
    logits[0, 1, 0] = 3.0  # step 1: block 1's attention open
    logits[1, :, :] = 3.0  # step 3: all open
    write_router(tmp_path / "r.pt", logits, steps, model.depth)
    plan = routing_plan(load_router(tmp_path / "r.pt"), 0.5)
    assert plan[0] is None and plan[2] is None and plan[4] is None
    assert plan[1] == tuple((i == 1, False) for i in range(model.depth))
    assert plan[3] == ((True, True),) * model.depth
    calls = layer_calls(model)
    policy = RouterDenoiser(model, plan)
    with torch.no_grad():
        for step in range(steps):
            calls.clear()
            policy(x, t, step)
            assert len(calls) == {1: 1}.get(step, 2 * model.depth)
    # blocks run per step: any of its layers ran
    assert torch.equal(policy.executed_depth(steps, 2), torch.tensor([5, 1, 5, 5, 5])[:, None].expand(5, 2))
    # threshold 0: every gate (sigmoid > 0) open: the full model
    assert all(run is None or all(a and m for a, m in run) for run in routing_plan(load_router(tmp_path / "r.pt"), 0.0))


def test_flops_of_a_routed_step_against_a_hand_count():
    model, _, _, _ = model_and_inputs()
    costs = flops.piece_costs(model)
    depth, half = model.depth, model.depth // 2
    whole = flops.network_cost(costs)
    assert flops.routed_step_cost(model, ((True, True),) * depth) == whole
    # whole blocks on or off: embed + head + blocks run x a block's cost; an off out-block still
    # runs its skip_linear: tokens x (2D x D multiply-adds + D bias adds)... counted as 2 N 2D D
    tokens, dim = 1 + (8 // 2) ** 2, CONFIG["embed_dim"]
    skip_linear = 2 * tokens * (2 * dim) * dim
    run = ((True, True), (False, False), (True, True), (False, False), (False, False))
    got = flops.routed_step_cost(model, run)["linear_conv"]
    expected = (costs["embed"]["linear_conv"] + costs["head"]["linear_conv"] + costs["blocks"][0]["linear_conv"]
                + costs["blocks"][2]["linear_conv"] + 2 * skip_linear)
    assert got == expected
    # an in-block's attention alone: qkv (3D^2) and proj (D^2) per token
    only_attention = ((True, False),) + ((False, False),) * (depth - 1)
    attention = 2 * tokens * 4 * dim * dim
    base = costs["embed"]["linear_conv"] + costs["head"]["linear_conv"] + half * skip_linear
    assert flops.routed_step_cost(model, only_attention)["linear_conv"] == base + attention


def test_router_training_lowers_its_objective():
    model, x, t, y = model_and_inputs()
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(3)
    x_prev, x_now = torch.randn(4, 2, 8, 8, generator=g), torch.randn(4, 2, 8, 8, generator=g)
    t_prev, t_now = torch.full((4,), 600), torch.full((4,), 500)
    with torch.no_grad():
        teacher = model(x_now, t_now)
    logits = torch.nn.Parameter(torch.zeros(model.depth, 2))
    optimizer = torch.optim.Adam([logits], lr=0.1)
    losses = []
    for _ in range(15):
        loss, _, _ = router_objective(model, logits, x_prev, t_prev, x_now, t_now, teacher, l1_weight=0.01)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    # the data term alone at gates 1 is exactly the teacher (no sparsity, nothing reused)
    loss, data, _ = router_objective(model, torch.full((model.depth, 2), 50.0), x_prev, t_prev, x_now, t_now, teacher)
    assert data.item() < 1e-8


def test_several_cache_steps_in_one_pass_are_the_sum_of_their_own_objectives():
    # Router training's pass over R cache steps at once (each sample its own row's gates) against
    # R separate one-row objectives, each computed as for a single cache step.
    model = model_and_inputs()[0]
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(4)
    R, B = 3, 2
    x_prev, x_now = torch.randn(R * B, 2, 8, 8, generator=g), torch.randn(R * B, 2, 8, 8, generator=g)
    t_prev = torch.tensor([700, 700, 500, 500, 300, 300])
    t_now = t_prev - 100
    with torch.no_grad():
        teacher = model(x_now, t_now)
    logits = torch.randn(R + 1, model.depth, 2, generator=g)  # row 2 is not drawn: its gates stay out
    rows = torch.tensor([0, 0, 1, 1, 3, 3])
    loss, data, l1 = router_objective(model, logits, x_prev, t_prev, x_now, t_now, teacher, l1_weight=0.05, rows=rows)
    expected = [router_objective(model, logits[r], x_prev[rows == r], t_prev[rows == r], x_now[rows == r],
                                 t_now[rows == r], teacher[rows == r], l1_weight=0.05) for r in (0, 1, 3)]
    assert torch.allclose(loss, sum(e[0] for e in expected), rtol=1e-5)
    assert torch.allclose(data, sum(e[1] for e in expected), rtol=1e-5)
    assert torch.allclose(l1, sum(e[2] for e in expected), rtol=1e-6)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("l2c_models")
    torch.manual_seed(0)
    model = build_model("uvit", SMALL, DIFFUSION["num_timesteps"])
    path = root / "full.pt"
    save_model(path, kind="uvit", model_config=SMALL, diffusion=DIFFUSION, state_dict=model.state_dict(),
               ema_state_dict=None, step=3, train_args={})  # fmt: skip
    return path


def train(ckpt, folder, **kwargs):
    args = dict(checkpoint_path=ckpt, output_folder=folder, sampler="ddim", steps=5, eta=0.0, guidance_scale=0.0,
                n_trajectories=8, batch_size=4, n_steps=6, router_lr=0.1, l1_weight=0.1, seed=0, use_ema=True,
                device="cpu", log_every_n_steps=2, save_every_n_steps=3, restart=False)  # fmt: skip
    args.update(kwargs)
    return run_train_router(**args)


def test_train_router_writes_a_router_resumes_and_refuses_other_inputs(ckpt, tmp_path):
    folder = tmp_path / "router"
    record = train(ckpt, folder)
    assert record["logits"].shape == (2, 5, 2) and record["cache_steps"] == [1, 3]
    load_router(folder / "router.pt")
    rows = (folder / "loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss,data_loss,l1_loss,open_fraction" and len(rows) == 4
    # an interrupted run (3 steps) resumed to 6 ends where the uninterrupted one did
    train(ckpt, tmp_path / "part", n_steps=3)
    resumed = train(ckpt, tmp_path / "part")
    assert torch.allclose(resumed["logits"], record["logits"], atol=1e-6)
    # L2C's own loop, one cache step per training step, trains too (and is another router)
    one = train(ckpt, tmp_path / "one", cache_steps_per_step=1)
    assert one["logits"].shape == (2, 5, 2) and not torch.allclose(one["logits"], record["logits"])
    with pytest.raises(DuodiffError, match="--l1-weight 0.1 -> 0.2.*--restart"):
        train(ckpt, folder, l1_weight=0.2)
    train(ckpt, folder, l1_weight=0.2, restart=True)


def sample(ckpt, out, **kwargs):
    args = cli_args("sample", checkpoint_path=ckpt, method="l2c", output_folder=out, sampler="ddim", steps=5,
                    n_samples=6, batch_size=4, seed=0, progress=False)  # fmt: skip
    args.update(kwargs)
    return run_sample(**args)


def test_an_l2c_set_records_blocks_run_flops_and_timing_rebuilds_it(ckpt, tmp_path, monkeypatch):
    from duodiff.core.io import file_sha256

    router = tmp_path / "router.pt"
    logits = torch.full((2, 5, 2), -3.0)
    logits[1, 2, 1] = 3.0  # step 3: the mid block's MLP runs
    write_router(router, logits, 5, 5, model_sha256=file_sha256(ckpt))
    sample(ckpt, tmp_path / "open", router=router, router_threshold=0.0)
    full = sample(ckpt, tmp_path / "full", method="full")
    assert [p.read_bytes() for p in sorted((tmp_path / "open/images").iterdir())] == \
        [p.read_bytes() for p in sorted((tmp_path / "full/images").iterdir())]  # fmt: skip
    assert full["layer_ratio"] == 1.0
    out = tmp_path / "l2c"
    stats = sample(ckpt, out, router=router, router_threshold=0.5)
    assert (stats["method"], stats["router_threshold"]) == ("l2c", 0.5)
    layers = torch.load(out / "exit_layers.pt")
    assert torch.equal(layers, torch.tensor([5, 0, 5, 1, 5])[:, None].expand(5, 6))
    result = flops.run_flops(samples=out, output=tmp_path / "flops.json")
    whole = result["gflops_full_network"]
    model = build_model("uvit", SMALL, 100)
    closed = flops.routed_step_cost(model, ((False, False),) * 5)["total"] / flops.GIGA
    mlp = flops.routed_step_cost(model, ((False, False),) * 2 + ((False, True),) + ((False, False),) * 2)["total"] / flops.GIGA
    assert result["gflops_per_image"] == pytest.approx(3 * whole + closed + mlp)
    assert read_json(tmp_path / "flops.json")["layer_ratio"] == pytest.approx(16 / 25)
    # timing rebuilds the same policy from stats.json
    from duodiff.timing import time_sets

    built = []
    monkeypatch.setattr(time_sets, "make_denoiser", lambda *a, **k: built.append(make_denoiser(*a, **k)) or built[-1])
    runners = time_sets.build_runners({"l2c": (out, time_sets.read_stats(out))}, 2, 0, torch.device("cpu"))
    runners["l2c"]()
    (policy,) = built
    assert isinstance(policy, RouterDenoiser)
    assert torch.equal(policy.executed_depth(5, 2), torch.tensor([5, 0, 5, 1, 5])[:, None].expand(5, 2))


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "--method l2c needs --router"),
    (dict(router="r.pt"), "--method l2c needs --router-threshold"),
    (dict(router="r.pt", router_threshold=1.5), "--router-threshold must be in [0, 1]"),
    (dict(method="full", router_threshold=0.5), "--router-threshold applies to --method l2c only"),
])
def test_bad_l2c_arguments_fail_before_any_work(ckpt, tmp_path, kwargs, message):
    out = tmp_path / "out"
    with pytest.raises(DuodiffError) as error:
        sample(ckpt, out, **kwargs)
    assert message in str(error.value)
    assert not out.exists()


def test_a_router_for_another_grid_is_refused(ckpt, tmp_path):
    router = tmp_path / "router.pt"
    write_router(router, torch.zeros(4, 5, 2), 8, 5)
    with pytest.raises(DuodiffError, match="trained for steps 8"):
        sample(ckpt, tmp_path / "out", router=router, router_threshold=0.5)
