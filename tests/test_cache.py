"""DeepCache-style caching on U-ViT (`duodiff sample --method cache`): the cached forward, its
policy, what it runs and what that costs. Tiny random models; expectations computed independently
(the plain forward, forward hooks counting block calls, a hand count of the linear layers)."""

import pytest
import torch
from _defaults import cli_args
from conftest import TINY

from duodiff.core.errors import DuodiffError
from duodiff.core.io import read_json
from duodiff.metrics import flops
from duodiff.models import build_model
from duodiff.models.checkpoints import save_model
from duodiff.models.uvit import UViT, UViTConfig
from duodiff.sample.policies import CacheDenoiser, ModelDenoiser, make_denoiser
from duodiff.sample.sample_set import run_sample

torch.set_num_threads(1)

DIFFUSION = dict(num_timesteps=100, beta_start=1e-4, beta_end=0.02, parametrization="predict_noise")
# depth 7: 3 in-blocks, the mid block, 3 out-blocks, so keep can be 1, 2 or 3
CONFIG = {**TINY, "depth": 7}


def model_and_inputs(seed=0, n=3, num_classes=0):
    torch.manual_seed(seed)
    model = UViT(UViTConfig(**CONFIG, num_classes=num_classes)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, CONFIG["in_chans"], 8, 8, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g) if num_classes else None
    return model, x, t, y


def block_calls(model):
    """Forward hooks on every block -> a list of the execution-order index of each call."""
    calls = []
    for i in range(model.depth):
        model.block(i).register_forward_hook(lambda module, args, output, i=i: calls.append(i))
    return calls


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_a_full_step_is_bitwise_the_forward_pass(keep):
    model, x, t, y = model_and_inputs()
    with torch.no_grad():
        output, _ = model.forward_cached(x, t, y, keep)
        assert torch.equal(output, model(x, t, y))


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_a_cached_step_with_unchanged_inputs_equals_recomputation(keep):
    model, x, t, y = model_and_inputs(num_classes=4)
    with torch.no_grad():
        full, cache = model.forward_cached(x, t, y, keep)
        cached, same = model.forward_cached(x, t, y, keep, cache)
    assert same is cache
    assert torch.equal(cached, full)
    # and with other inputs the cached step is not simply the old output
    with torch.no_grad():
        other = model.forward_cached(x + 1, t, y, keep, cache)[0]
    assert not torch.allclose(other, full)


def sampling_run(policy, steps, n=2, sampler="ddim"):
    from duodiff.core.diffusion import GaussianDiffusion

    diffusion = GaussianDiffusion(**DIFFUSION)
    noise = torch.randn(n, CONFIG["in_chans"], 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        return diffusion.sample(policy, noise, sampler, steps, generator=torch.Generator().manual_seed(6))


@pytest.mark.parametrize("sampler", ["ddim", "dpm_solver"])
def test_interval_one_is_bitwise_the_full_model(sampler):
    model = model_and_inputs()[0]
    full = sampling_run(ModelDenoiser(model), 6, sampler=sampler)
    policy = CacheDenoiser(model, interval=1, keep=1)
    assert torch.equal(sampling_run(policy, 6, sampler=sampler), full)
    assert torch.equal(policy.executed_depth(6, 2), torch.full((6, 2), 7))


@pytest.mark.parametrize("interval, keep", [(3, 1), (2, 2), (4, 3)])
def test_skipped_blocks_are_not_executed_and_the_depth_counts_what_ran(interval, keep):
    model = model_and_inputs()[0]
    calls = block_calls(model)
    steps = 7
    policy = CacheDenoiser(model, interval, keep)
    sampling_run(policy, steps)
    full_steps = [s for s in range(steps) if s % interval == 0]
    cached_steps = steps - len(full_steps)
    outer = list(range(keep)) + list(range(7 - keep, 7))
    # hand count: the outer blocks run at every step, the inner ones only at full steps
    for i in range(7):
        assert calls.count(i) == (steps if i in outer else len(full_steps)), (i, calls)
    expected = torch.tensor([7 if s % interval == 0 else 2 * keep for s in range(steps)])
    assert torch.equal(policy.executed_depth(steps, 2), expected[:, None].expand(steps, 2))
    assert len(calls) == 7 * len(full_steps) + 2 * keep * cached_steps


def test_the_cache_is_what_the_last_full_step_left():
    """The cached steps after a full step reuse its deep state: a model whose inner blocks are
    changed after that full step gives the same cached outputs."""
    model, x, t, y = model_and_inputs()
    with torch.no_grad():
        _, cache = model.forward_cached(x, t, y, 1)
        before = model.forward_cached(x * 0.5, t, y, 1, cache)[0]
        model.mid_block.mlp.fc2.weight.add_(1.0)  # an inner block: not run on cached steps
        assert torch.equal(model.forward_cached(x * 0.5, t, y, 1, cache)[0], before)
        model.in_blocks[0].mlp.fc2.weight.add_(1.0)  # an outer block: run on cached steps
        assert not torch.equal(model.forward_cached(x * 0.5, t, y, 1, cache)[0], before)


def block_linear_flops(L, D, hidden, skip):
    """Hand count: 2 FLOPs per multiply-add of qkv, proj, fc1, fc2 (and an out-block's skip_linear)."""
    return 2 * L * (D * 3 * D + D * D + 2 * D * hidden + (2 * D * D if skip else 0))


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_flops_of_a_cached_step_count_what_ran(keep):
    model = model_and_inputs()[0]
    costs = flops.piece_costs(model)
    cached = flops.cached_step_cost(model, keep)
    full = flops.network_cost(costs)
    skipped = range(keep, 7 - keep)
    # the pieces' own per-call FlopCounterMode counts of the blocks that did not run
    assert cached["total"] == full["total"] - sum(costs["blocks"][i]["total"] for i in skipped)
    # a hand count of their linear layers (3 in, mid, 3 out; out-blocks have skip_linear)
    L, D = 1 + (8 // 2) ** 2, CONFIG["embed_dim"]
    hand = sum(block_linear_flops(L, D, int(D * 4.0), skip=i > 3) for i in skipped)
    assert cached["linear_conv"] == full["linear_conv"] - hand
    # and counted on the meta device (what `duodiff flops` does) as on real weights
    with torch.device("meta"):
        meta = UViT(UViTConfig(**CONFIG)).eval()
    assert flops.cached_step_cost(meta, keep) == cached


# ---- `duodiff sample --method cache` and `duodiff flops` ---------------------------------------


SMALL = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=5, num_heads=2, normalize_timesteps=True)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_models")
    paths = {}
    # cond: 3 classes and the null class (label_dropout > 0), for classifier-free guidance
    for name, config, train_args in (("full", SMALL, {}), ("cond", {**SMALL, "num_classes": 4}, {"label_dropout": 0.1})):
        torch.manual_seed(0)
        model = build_model("uvit", config, DIFFUSION["num_timesteps"])
        paths[name] = root / f"{name}.pt"
        save_model(paths[name], kind="uvit", model_config=config, diffusion=DIFFUSION, state_dict=model.state_dict(),
                   ema_state_dict=None, step=3, train_args=train_args)  # fmt: skip
    return paths


def sample(ckpts, out, method="cache", model="full", **kwargs):
    args = cli_args(
        "sample", checkpoint_path=ckpts[model], method=method, output_folder=out, sampler="ddim", steps=5,
        n_samples=6, batch_size=4, seed=0, progress=False,
    )  # fmt: skip
    if method == "cache":
        args.update(cache_interval=2, cache_keep=1)
    args.update(kwargs)
    return run_sample(**args)


def pngs(folder):
    return [path.read_bytes() for path in sorted((folder / "images").iterdir())]


@pytest.mark.parametrize("model, guidance_scale", [("full", 0.0), ("cond", 0.4)])
def test_a_cache_set_with_interval_one_is_the_full_set(ckpts, tmp_path, model, guidance_scale):
    sample(ckpts, tmp_path / "full", method="full", model=model, guidance_scale=guidance_scale)
    stats = sample(ckpts, tmp_path / "cache", model=model, cache_interval=1, cache_keep=2, guidance_scale=guidance_scale)
    assert pngs(tmp_path / "cache") == pngs(tmp_path / "full")
    assert stats["layer_ratio"] == 1.0


def test_a_cache_set_records_blocks_run_and_its_flops(ckpts, tmp_path):
    out = tmp_path / "cache"
    stats = sample(ckpts, out, cache_interval=2, cache_keep=1)
    assert (stats["method"], stats["cache_interval"], stats["cache_keep"]) == ("cache", 2, 1)
    layers = torch.load(out / "exit_layers.pt")
    # steps 0, 2, 4 full (5 blocks), 1 and 3 cached (2 blocks), every sample alike
    assert torch.equal(layers, torch.tensor([5, 2, 5, 2, 5])[:, None].expand(5, 6))
    assert stats["layer_ratio"] == pytest.approx(19 / 25)
    result = flops.run_flops(samples=out, output=tmp_path / "flops.json")
    full, cached = result["gflops_full_network"], result["gflops_cached_step"]
    assert cached < full
    assert result["gflops_per_image"] == pytest.approx(3 * full + 2 * cached)
    assert read_json(tmp_path / "flops.json")["layer_ratio"] == pytest.approx(19 / 25)
    # blocks run that the set's cache_keep cannot give are refused
    torch.save(torch.full((5, 6), 4), out / "exit_layers.pt")
    with pytest.raises(DuodiffError, match="should be 5 .full steps. or 2 .cached steps"):
        flops.run_flops(samples=out, output=tmp_path / "flops.json")


def timed_policy(folder, monkeypatch):
    """The policy `duodiff time` rebuilds from a set's stats.json and runs once."""
    from duodiff.timing import time_sets

    built = []
    monkeypatch.setattr(time_sets, "make_denoiser", lambda *a, **k: built.append(make_denoiser(*a, **k)) or built[-1])
    runners = time_sets.build_runners({"set": (folder, time_sets.read_stats(folder))}, 2, 0, torch.device("cpu"))
    runners["set"]()
    (policy,) = built
    return policy


def test_the_timing_stage_rebuilds_the_cache_policy_from_stats(ckpts, tmp_path, monkeypatch):
    sample(ckpts, tmp_path / "cache", cache_interval=3, cache_keep=2)
    policy = timed_policy(tmp_path / "cache", monkeypatch)
    assert isinstance(policy, CacheDenoiser) and (policy.interval, policy.keep) == (3, 2)
    assert torch.equal(policy.executed_depth(5, 2), torch.tensor([5, 4, 4, 5, 4])[:, None].expand(5, 2))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(cache_interval=None), "--method cache needs --cache-interval (a positive integer)"),
        (dict(cache_keep=None), "--method cache needs --cache-keep"),
        (dict(cache_interval=0), "--cache-interval must be a positive integer; got 0"),
        (dict(cache_keep=3), "--cache-keep must be in [1, 2] for "),
        (dict(method="full", cache_interval=2, cache_keep=None), "--cache-interval applies to --method cache (and duodiff's full-model phase) only"),
        (dict(threshold=0.5), "--threshold applies to --method early_exit"),
    ],
)
def test_bad_cache_arguments_fail_before_any_work(ckpts, tmp_path, kwargs, message):
    out = tmp_path / "out"
    with pytest.raises(DuodiffError) as error:
        sample(ckpts, out, **kwargs)
    assert message in str(error.value)
    assert not out.exists()


def test_the_tables_make_one_cache_family_per_keep_from_the_set_names():
    import pandas as pd

    from duodiff.report.tables.collect import method_label
    from duodiff.report.tables.operating_points import method_families, search_family_ids

    frame = pd.DataFrame({"set": ["full", "cache_N4_k1", "cache_N2_k1"], "method": ["full", "cache", "cache"],
                          "classifier_type": None, "shallow_depth": None})
    ((method, family, sets),) = [f for f in method_families(frame) if f[0] == "cache"]
    assert (method, family, list(sets["set"])) == ("cache", "k = 1", ["cache_N2_k1", "cache_N4_k1"])
    assert search_family_ids("cache", sets) == ["cache-k1"]  # common.smk's search family id
    assert method_label(sets.iloc[0]) == "Caching (k = 1)"


# ---- DuoDiff with caching: the full model's phase cached (a composed set) ------------------------


@pytest.fixture(scope="module")
def duodiff_ckpts(ckpts, tmp_path_factory):
    """The cache tests' full model (depth 5), a 1-block shallow twin and an early-exit model."""
    root = tmp_path_factory.mktemp("duodiff_cache_models")
    paths = dict(ckpts)
    for name, kind, config in (("shallow", "uvit", {**SMALL, "depth": 1}), ("ee", "early_exit", SMALL)):
        torch.manual_seed(1)
        classifier_type = "attention_probe" if kind == "early_exit" else None
        model = build_model(kind, config, DIFFUSION["num_timesteps"], classifier_type)
        paths[name] = root / f"{name}.pt"
        save_model(paths[name], kind=kind, model_config=config, diffusion=DIFFUSION, state_dict=model.state_dict(),
                   ema_state_dict=None, step=3, train_args={}, classifier_type=classifier_type)  # fmt: skip
    return paths


def duodiff_sample(paths, out, late="full", **kwargs):
    return sample(paths, out, method="duodiff", model="shallow", checkpoint_path_late=paths[late], t_switch=2, **kwargs)


def test_duodiff_with_caching_at_interval_one_is_plain_duodiff(duodiff_ckpts, tmp_path):
    plain = duodiff_sample(duodiff_ckpts, tmp_path / "duodiff")
    cached = duodiff_sample(duodiff_ckpts, tmp_path / "cached", cache_interval=1, cache_keep=2)
    assert pngs(tmp_path / "cached") == pngs(tmp_path / "duodiff")
    assert cached["layer_ratio"] == plain["layer_ratio"]


def test_duodiff_with_caching_runs_the_shallow_model_then_caches_the_full_phase_from_its_own_first_step(
        duodiff_ckpts, tmp_path):
    out = tmp_path / "cached"
    stats = duodiff_sample(duodiff_ckpts, out, cache_interval=2, cache_keep=1)
    assert (stats["method"], stats["t_switch"], stats["cache_interval"], stats["cache_keep"]) == ("duodiff", 2, 2, 1)
    assert stats["setting"] == "t_switch=2, N=2, steps=5"
    # steps 0-1 the 1-block shallow model; the full phase's steps 2, 4 full (5 blocks: its first step
    # is a full one, the shallow model left no cache), 3 cached (its outer pair, 2 blocks)
    layers = torch.load(out / "exit_layers.pt")
    assert torch.equal(layers, torch.tensor([1, 1, 5, 2, 5])[:, None].expand(5, 6))
    assert stats["layer_ratio"] == pytest.approx(14 / 25)
    # FLOPs: the shallow network twice, the full network twice, one cached step of the full network,
    # each priced as its own set prices it (a shallow set, a cache set of the full model)
    result = flops.run_flops(samples=out, output=tmp_path / "flops.json")
    shallow = flops.run_flops(samples=duodiff_sample_alone(duodiff_ckpts, tmp_path), output=tmp_path / "s.json")
    cache_set = sample(duodiff_ckpts, tmp_path / "cache", cache_interval=2, cache_keep=1)
    assert cache_set["method"] == "cache"
    cache_costs = flops.run_flops(samples=tmp_path / "cache", output=tmp_path / "c.json")
    expected = 2 * shallow["gflops_per_forward"] + 2 * cache_costs["gflops_full_network"] + cache_costs["gflops_cached_step"]
    assert result["gflops_per_image"] == pytest.approx(expected)
    assert result["gflops_cached_step"] == cache_costs["gflops_cached_step"]


def test_duodiff_with_caching_skips_the_full_models_inner_blocks_on_its_cached_steps():
    from duodiff.sample.policies import DuoDiffDenoiser

    full = model_and_inputs()[0]
    torch.manual_seed(3)
    shallow = UViT(UViTConfig(**{**CONFIG, "depth": 1})).eval()
    calls = block_calls(full)
    policy = DuoDiffDenoiser(shallow, full, t_switch=2, steps=7, cache=(3, 1))
    out = sampling_run(policy, 7)
    # full-phase steps 2..6 are its own 0..4: 0 and 3 full (7 blocks), 1, 2 and 4 cached (blocks 0 and 6)
    for i in range(7):
        assert calls.count(i) == (5 if i in (0, 6) else 2), (i, calls)
    assert torch.equal(policy.executed_depth(7, 2), torch.tensor([1, 1, 7, 2, 2, 7, 2])[:, None].expand(7, 2))
    # and the samples are not plain DuoDiff's: the cached steps changed them
    assert not torch.equal(out, sampling_run(DuoDiffDenoiser(shallow, full, t_switch=2, steps=7), 7))


def duodiff_sample_alone(paths, tmp_path):
    """The shallow model alone, as a set (its per-forward cost is the shallow network's)."""
    out = tmp_path / "shallow"
    sample(paths, out, method="shallow", model="shallow")
    return out


def test_the_timing_stage_rebuilds_duodiff_with_caching(duodiff_ckpts, tmp_path, monkeypatch):
    from duodiff.sample.policies import PhasedPolicy

    duodiff_sample(duodiff_ckpts, tmp_path / "set", cache_interval=2, cache_keep=1)
    policy = timed_policy(tmp_path / "set", monkeypatch)
    assert isinstance(policy, PhasedPolicy) and isinstance(policy.late, CacheDenoiser)
    assert (policy.switch, policy.late.interval, policy.late.keep) == (2, 2, 1)


@pytest.mark.parametrize(
    "late, kwargs, message",
    [
        ("full", dict(cache_interval=2), "--method duodiff with caching needs --cache-keep"),
        ("ee", dict(cache_interval=2, cache_keep=1, threshold=0.5),
         "does not combine with --threshold (early exit in that phase); got --threshold 0.5"),
        ("ee", dict(cache_interval=2, cache_keep=1), "which needs a plain uvit --checkpoint-path-late"),
        ("full", dict(cache_interval=2, cache_keep=3), "--cache-keep must be in [1, 2] for "),
    ],
)
def test_bad_duodiff_caching_arguments_fail_before_any_work(duodiff_ckpts, tmp_path, late, kwargs, message):
    out = tmp_path / "out"
    with pytest.raises(DuodiffError) as error:
        duodiff_sample(duodiff_ckpts, out, late=late, **kwargs)
    assert message in str(error.value)
    assert not out.exists()
