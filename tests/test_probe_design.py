"""`probe_design`: this project's probes (`duodiff`) and the early-stopping-diffusion seed's (`seed`).

Every expectation here is written out independently of the module code: parameter counts by hand,
probe outputs as plain tensor arithmetic, the exit rule through `select_exit` on `forward`.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_EARLY_EXIT, T, save_tiny_model, select_exit, tiny_batch

from duodiff.core.diffusion import GaussianDiffusion
from duodiff.core.errors import DuodiffError
from duodiff.metrics.flops import model_costs
from duodiff.models import CLASSIFIER_TYPES, UViTConfig, build_model, load_model_config
from duodiff.models.checkpoints import load_model
from duodiff.models.early_exit import SeedAttentionProbe, SeedMLPProbe
from duodiff.models.uvit import UViT

torch.set_num_threads(1)
TINY = TINY_EARLY_EXIT
D, HIDDEN, DEPTH = TINY["embed_dim"], TINY["probe_hidden"], TINY["depth"]
N_PATCHES = (8 // 2) ** 2
DESIGNS = ("duodiff", "seed")


def make(classifier_type, design="seed", num_classes=0, seed=0):
    torch.manual_seed(seed)
    config = {**TINY, "num_classes": num_classes, "probe_design": design}
    return build_model("early_exit", config, T, classifier_type).double().eval()


def randomize_probes(model, std):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.probes.parameters():
            param.copy_(torch.randn(param.shape, generator=g, dtype=param.dtype) * std)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def tokens_at_exit(model, i, x, t, y=None):
    tokens = model.backbone.embed(x, t, y)
    skips = []
    for k in range(i):
        tokens = model.backbone.run_block(k, tokens, skips)
    return tokens


# ---- shapes and parameter counts ------------------------------------------------------------------


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("classifier_type", CLASSIFIER_TYPES)
@pytest.mark.parametrize("num_classes", [0, 3])
def test_every_probe_output_shape(design, classifier_type, num_classes):
    model = make(classifier_type, design, num_classes)
    x, t, y = tiny_batch(n=5, num_classes=num_classes)
    outputs, u = model(x, t, y)
    assert len(outputs) == DEPTH + 1 and all(o.shape == x.shape for o in outputs)
    assert u.shape == (5, DEPTH)
    tokens = model.backbone.embed(x, t, y)
    for i in range(DEPTH):
        assert model.probe(i, tokens, t).shape == (5,)
    if (design, classifier_type) != ("seed", "attention_probe"):
        assert ((u >= 0) & (u <= 1)).all()


def test_parameter_counts_by_hand():
    d, h, depth = D, HIDDEN, DEPTH
    seed_mlp = d + 1  # Linear(d, 1)
    seed_attention = d + (d * 2 * d + 2 * d) + (d * d + d) + (d + 1)  # query, kv, Linear(d, d), Linear(d, 1)
    duodiff_mlp = (d * h + h) + (h + 1)  # fc1, fc2 (the pooling LayerNorm has no parameters)
    duodiff_attention = 2 * d + h + (d * 2 * h + 2 * h) + (h * h + h) + (h + 1)  # norm, query, kv, fc1, fc2
    expected = {
        ("seed", "mlp_probe_per_layer"): depth * seed_mlp,
        ("seed", "attention_probe"): depth * seed_attention,
        ("seed", "mlp_probe_per_timestep"): T * (d + 1),
        ("seed", "mlp_probe_per_layer_per_timestep"): depth * T * (d + 1),
        ("duodiff", "mlp_probe_per_layer"): depth * duodiff_mlp,
        ("duodiff", "attention_probe"): depth * duodiff_attention,
        ("duodiff", "mlp_probe_per_timestep"): T * (d + 1),
        ("duodiff", "mlp_probe_per_layer_per_timestep"): depth * T * (d + 1),
    }
    for (design, classifier_type), count in expected.items():
        model = make(classifier_type, design)
        assert n_params(model.probes) == count, (design, classifier_type)
        # The heads and the backbone do not depend on the probe design.
        assert n_params(model) - n_params(model.probes) == n_params(make(classifier_type, "duodiff")) - n_params(
            make(classifier_type, "duodiff").probes
        )
    for probe in make("mlp_probe_per_layer").probes:
        assert n_params(probe) == d + 1
    # The seed's docstring: "With embed_dim = 512, it has 788993 parameters."
    assert n_params(SeedAttentionProbe(512, time_index=0)) == 788_993 == 3 * 512**2 + 5 * 512 + 1


# ---- the seed attention probe -------------------------------------------------------------------


def hand_seed_attention(probe, tokens, time_index):
    """One head of width d: softmax(k . q / sqrt(d)) over the tokens without the time token."""
    keep = [n for n in range(tokens.shape[1]) if n != time_index]
    kept = tokens[:, keep]
    kv = kept @ probe.kv.weight.T + probe.kv.bias
    keys, values = kv[..., :D], kv[..., D:]
    weights = torch.softmax(keys @ probe.query.reshape(D) / D**0.5, dim=1)  # (B, N - 1)
    pooled = (weights[..., None] * values).sum(1)
    hidden = F.silu(pooled @ probe.fc1.weight.T + probe.fc1.bias)
    return (hidden @ probe.fc2.weight.T + probe.fc2.bias).squeeze(-1)


@pytest.mark.parametrize("num_classes", [0, 3])
def test_seed_attention_probe_written_out_and_unbounded(num_classes):
    model = make("attention_probe", "seed", num_classes)
    randomize_probes(model, std=0.3)
    x, t, y = tiny_batch(n=12, num_classes=num_classes)
    _, u = model(x, t, y)
    time_index = num_classes > 0  # [class], time, patches
    for i in (0, 2):
        tokens = tokens_at_exit(model, i, x, t, y)
        torch.testing.assert_close(u[:, i], hand_seed_attention(model.probes[i], tokens, int(time_index)))
    # No sigmoid: the same weights give values below 0 and above 1.
    assert (u < 0).any() and (u > 1).any(), (u.min(), u.max())


@pytest.mark.parametrize("num_classes", [0, 3])
def test_seed_attention_probe_ignores_only_the_time_token(num_classes):
    x, t, y = tiny_batch(n=4, num_classes=num_classes)
    other_t = (t + 17) % T
    for design in DESIGNS:
        model = make("attention_probe", design, num_classes)
        randomize_probes(model, std=0.3)
        # At exit 0 the tokens are the embedding: a new t changes the time token and nothing else.
        before, after = model.backbone.embed(x, t, y), model.backbone.embed(x, other_t, y)
        time_index = num_classes > 0
        changed = (before - after).abs().sum(-1).ne(0).any(0)
        assert changed.nonzero().flatten().tolist() == [int(time_index)]
        u_before, u_after = model.probe(0, before, t), model.probe(0, after, other_t)
        if design == "seed":
            torch.testing.assert_close(u_before, u_after, rtol=0, atol=0)
        else:  # this project's probe has the time token among its keys
            assert not torch.allclose(u_before, u_after)
    # The seed probe does read every other token, the class token included.
    model = make("attention_probe", "seed", num_classes)
    randomize_probes(model, std=0.3)
    tokens = model.backbone.embed(x, t, y)
    for n in range(tokens.shape[1]):
        if n == int(num_classes > 0):
            continue
        nudged = tokens.clone()
        nudged[:, n] += 1.0
        assert not torch.allclose(model.probe(0, nudged, t), model.probe(0, tokens, t)), n


# ---- the seed MLP probes ------------------------------------------------------------------------


@pytest.mark.parametrize("num_classes", [0, 3])
def test_seed_mlp_probe_is_mean_of_per_token_sigmoids(num_classes):
    model = make("mlp_probe_per_layer", "seed", num_classes)
    randomize_probes(model, std=0.5)
    x, t, y = tiny_batch(n=5, num_classes=num_classes)
    _, u = model(x, t, y)
    for i in range(DEPTH):
        tokens = tokens_at_exit(model, i, x, t, y)
        assert tokens.shape[1] == N_PATCHES + 1 + (num_classes > 0)  # every token, extras included
        w, b = model.probes[i].fc.weight[0], model.probes[i].fc.bias[0]
        expected = torch.stack(
            [torch.stack([torch.sigmoid(tok @ w + b) for tok in sample]).mean() for sample in tokens]
        )
        torch.testing.assert_close(u[:, i], expected)
        # Not the sigmoid of the mean token: the mean and the sigmoid do not commute.
        assert not torch.allclose(u[:, i], torch.sigmoid(tokens.mean(1) @ w + b))


@pytest.mark.parametrize("classifier_type", ["mlp_probe_per_timestep", "mlp_probe_per_layer_per_timestep"])
def test_seed_timestep_banks_use_each_samples_own_timestep(classifier_type):
    model = make(classifier_type, "seed")
    randomize_probes(model, std=0.5)
    x, _, _ = tiny_batch(n=3)
    t = torch.tensor([4, 37, 4])
    _, u = model(x, t)
    for i in range(DEPTH):
        tokens = tokens_at_exit(model, i, x, t)
        bank = 0 if classifier_type == "mlp_probe_per_timestep" else i
        for s in range(3):
            w, b = model.probes.weight[bank, t[s]], model.probes.bias[bank, t[s]]
            expected = torch.sigmoid(tokens[s] @ w + b).mean()
            torch.testing.assert_close(u[s, i], expected)
    # One sample alone gives the same u as inside the mixed batch.
    torch.testing.assert_close(u[1:2], model(x[1:2], t[1:2])[1])


def test_seed_probes_keep_pytorch_default_init():
    model = make("attention_probe", "seed")
    for probe in model.probes:
        assert (probe.query == 0).all()
        bound = D**-0.5  # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        assert probe.kv.weight.abs().max() <= bound and probe.kv.weight.std() > bound / 2
    bank = make("mlp_probe_per_layer_per_timestep", "seed").probes
    assert bank.weight.abs().max() <= D**-0.5 and bank.weight.std() > D**-0.5 / 2
    assert bank.bias.abs().max() <= D**-0.5 and bank.bias.abs().max() > 0
    for probe in make("mlp_probe_per_layer", "seed").probes:
        assert isinstance(probe, SeedMLPProbe) and probe.fc.weight.std() > D**-0.5 / 2


# ---- early exit still skips work ----------------------------------------------------------------


def thresholds_between(u):
    """Half-way between neighbouring observed u, those inside [0, 1] (the allowed thresholds)."""
    values = u.flatten().sort().values
    middles = ((values[1:] + values[:-1]) / 2).tolist()
    inside = [m for m in middles if 0 <= m <= 1]
    return inside[:: max(1, len(inside) // 6)]


@pytest.mark.parametrize("classifier_type", CLASSIFIER_TYPES)
@pytest.mark.parametrize("num_classes", [0, 3])
def test_seed_forward_early_exit_equals_select_exit(classifier_type, num_classes):
    model = make(classifier_type, "seed", num_classes)
    randomize_probes(model, std=0.3 if classifier_type == "attention_probe" else 1.0)
    x, t, y = tiny_batch(n=12, num_classes=num_classes)
    with torch.no_grad():
        outputs, u = model(x, t, y)
        exits_seen = set()
        thresholds = [0.0, *thresholds_between(u), 1.0]
        assert len(thresholds) >= 5
        for threshold in thresholds:
            expected, expected_exit = select_exit(outputs, u, threshold)
            output, exit_layer = model.forward_early_exit(x, t, threshold, y)
            assert exit_layer.tolist() == expected_exit.tolist(), threshold
            torch.testing.assert_close(output, expected)
            exits_seen |= set(exit_layer.tolist())
    assert len(exits_seen) >= 3, exits_seen


def test_seed_early_exit_runs_only_the_blocks_it_needs():
    # A seed MLP probe with zero weights gives u = sigmoid(bias) for every sample: exit 2 says stop.
    model = make("mlp_probe_per_layer", "seed")
    runs = [0] * DEPTH
    for i in range(DEPTH):
        model.backbone.block(i).register_forward_hook(lambda m, a, o, i=i: runs.__setitem__(i, runs[i] + 1))
    with torch.no_grad():
        for i, probe in enumerate(model.probes):
            probe.fc.weight.zero_()
            probe.fc.bias.fill_(-6.0 if i == 2 else 6.0)
        x, t, _ = tiny_batch(n=4)
        output, exit_layer = model.forward_early_exit(x, t, 0.5)
    assert exit_layer.tolist() == [2] * 4
    assert runs == [1, 1, 0, 0, 0]


# ---- config, checkpoints, FLOPs -----------------------------------------------------------------


def test_probe_design_config_values(tmp_path):
    assert UViTConfig(**TINY).probe_design == "duodiff"  # the default
    with pytest.raises(DuodiffError, match="probe_design must be one of duodiff, seed; got 'paper'"):
        build_model("early_exit", {**TINY, "probe_design": "paper"}, T, "attention_probe")
    with pytest.raises(DuodiffError, match="probe_design must be one of duodiff, seed; got 'paper'"):
        build_model("uvit", {**TINY, "probe_design": "paper"}, T)
    path = tmp_path / "seed.yaml"
    path.write_text("img_size: 8\npatch_size: 2\nin_chans: 2\nembed_dim: 32\ndepth: 5\nnum_heads: 4\nprobe_design: seed\n")
    model = build_model("early_exit", load_model_config(path), T, "mlp_probe_per_layer")
    assert model.probe_design == "seed" and isinstance(model.probes[0], SeedMLPProbe)
    # A plain U-ViT ignores the key: the same YAML builds the same backbone either way.
    assert isinstance(build_model("uvit", load_model_config(path), T), UViT)
    # probe_hidden does not constrain the seed's single full-width head.
    build_model("early_exit", {**TINY, "probe_hidden": 10, "probe_design": "seed"}, T, "attention_probe")


def save(path, config, classifier_type, model):
    save_tiny_model(path, model, "early_exit", config, GaussianDiffusion(num_timesteps=T).config(), classifier_type)


@pytest.mark.parametrize("classifier_type", CLASSIFIER_TYPES)
def test_checkpoint_keeps_the_probe_design(tmp_path, classifier_type):
    config = {**TINY, "probe_design": "seed"}
    model = make(classifier_type, "seed").float()
    save(tmp_path / "seed.pt", config, classifier_type, model)
    loaded, _, meta = load_model(tmp_path / "seed.pt")
    assert loaded.probe_design == "seed" and meta["model_config"]["probe_design"] == "seed"
    x, t, _ = tiny_batch(n=3)
    torch.testing.assert_close(loaded(x.float(), t)[1], model(x.float(), t)[1])

    # A model file from before the key existed loads as this project's design.
    old = make(classifier_type, "duodiff").float()
    save(tmp_path / "old.pt", dict(TINY), classifier_type, old)
    loaded, _, meta = load_model(tmp_path / "old.pt")
    assert "probe_design" not in meta["model_config"] and loaded.probe_design == "duodiff"
    torch.testing.assert_close(loaded(x.float(), t)[1], old(x.float(), t)[1])
    # Seed weights do not fit the duodiff design (or back): refused, never loaded half.
    if classifier_type in ("attention_probe", "mlp_probe_per_layer"):
        save(tmp_path / "mismatch.pt", dict(TINY), classifier_type, model)
        with pytest.raises(DuodiffError, match="weights do not fit the stored model config"):
            load_model(tmp_path / "mismatch.pt")


def test_backbone_check_ignores_the_probe_design(tmp_path):
    from duodiff.train.checks import read_backbone

    backbone = UViT(UViTConfig(**TINY), num_timesteps=T)
    save_tiny_model(tmp_path / "full.pt", backbone, "uvit", dict(TINY), GaussianDiffusion(num_timesteps=T).config())
    full_config = UViTConfig(**TINY, probe_design="seed")
    weights = read_backbone(tmp_path / "full.pt", full_config, GaussianDiffusion(num_timesteps=T), "seed.yaml")
    assert weights.keys() == backbone.state_dict().keys()


def test_seed_probe_flops_by_hand():
    n_tokens = N_PATCHES + 1
    mlp = model_costs("early_exit", {**TINY, "probe_design": "seed"}, T, "mlp_probe_per_layer")["probes"]
    # Linear(d, 1) on every token: 2 * tokens * d FLOPs.
    assert [p["linear_conv"] for p in mlp] == [2 * n_tokens * D] * DEPTH
    attention = model_costs("early_exit", {**TINY, "probe_design": "seed"}, T, "attention_probe")["probes"]
    keys = n_tokens - 1  # the time token is dropped
    linear = 2 * keys * D * 2 * D + 2 * D * D + 2 * D  # kv on every key token, Linear(d, d), Linear(d, 1)
    assert [p["linear_conv"] for p in attention] == [linear] * DEPTH
    assert [p["total"] for p in attention] == [linear + 2 * 2 * keys * D] * DEPTH  # + q.k and weights.v
