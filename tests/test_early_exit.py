"""Early-exit U-ViT: probes, gradients, per-sample timesteps and the compacted early exit."""

import pytest
import torch
from conftest import TINY_DIGITS, TINY_EARLY_EXIT, T, select_exit, tiny_batch, train_kwargs, write_model_yaml

from duodiff.core.errors import DuodiffError
from duodiff.models import CLASSIFIER_TYPES, build_model
from duodiff.models.early_exit import EarlyExitUViT
from duodiff.models.uvit import UViT, UViTConfig
from duodiff.train.checks import check_train_args

torch.set_num_threads(1)


def make(classifier_type, num_classes=0, seed=0):
    torch.manual_seed(seed)
    return build_model("early_exit", {**TINY_EARLY_EXIT, "num_classes": num_classes}, T, classifier_type).double().eval()


def randomize_probes(model, std=0.5):
    """Probes fresh from init give u close to 0.5 everywhere; large random weights spread u so
    samples leave at different exits."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.probes.parameters():
            param.copy_(torch.randn(param.shape, generator=g, dtype=param.dtype) * std)


def thresholds_between(u, quantiles=(0.1, 0.3, 0.5, 0.7, 0.9)):
    """Thresholds half-way between neighbouring observed uncertainties (no sample on the edge)."""
    values = u.flatten().sort().values
    picks = [int(q * (len(values) - 1)) for q in quantiles]
    return [(values[k] + values[k + 1]).item() / 2 for k in picks]


def hand_pool(tokens):
    mean = tokens.mean(-1, keepdim=True)
    var = ((tokens - mean) ** 2).mean(-1, keepdim=True)
    return ((tokens - mean) / torch.sqrt(var + 1e-5)).mean(1)


@pytest.mark.parametrize("classifier_type", CLASSIFIER_TYPES)
@pytest.mark.parametrize("num_classes", [0, 3])
def test_forward_shapes_and_last_exit_is_backbone(classifier_type, num_classes):
    model = make(classifier_type, num_classes)
    x, t, y = tiny_batch(num_classes=num_classes)
    outputs, u = model(x, t, y)
    assert len(outputs) == model.depth + 1 == 6
    assert all(o.shape == x.shape for o in outputs)
    assert u.shape == (6, 5) and (u >= 0).all() and (u <= 1).all()
    torch.testing.assert_close(outputs[-1], model.backbone(x, t, y))
    tokens = model.backbone.embed(x, t, y)
    torch.testing.assert_close(outputs[0], model.exit_heads[0](tokens))


@pytest.mark.parametrize("classifier_type", CLASSIFIER_TYPES)
@pytest.mark.parametrize("freeze", [False, True])
def test_backward_reaches_heads_and_probes(classifier_type, freeze):
    model = make(classifier_type).train()
    if freeze:
        model.freeze_backbone()
    x, t, _ = tiny_batch()
    outputs, u = model(x, t)
    (sum(o.square().mean() for o in outputs) + u.sum()).backward()
    for name, param in model.named_parameters():
        if name.startswith("backbone."):
            assert (param.grad is None) == freeze, name
            assert param.requires_grad != freeze
        else:
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_per_timestep_probes_use_each_samples_own_timestep():
    for classifier_type in ["mlp_probe_per_timestep", "mlp_probe_per_layer_per_timestep"]:
        model = make(classifier_type)
        x, _, _ = tiny_batch(n=2)
        t = torch.tensor([4, 37])
        _, u = model(x, t)
        for b in range(2):
            torch.testing.assert_close(u[b : b + 1], model(x[b : b + 1], t[b : b + 1])[1])
        # Written out: sigmoid(pooled tokens . w[bank, t] + b[bank, t]) for exit 2.
        tokens = model.backbone.embed(x, t)
        skips = []
        for i in range(2):
            tokens = model.backbone.run_block(i, tokens, skips)
        bank = 0 if classifier_type == "mlp_probe_per_timestep" else 2
        w, bias = model.probes.weight[bank], model.probes.bias[bank]
        expected = torch.sigmoid((hand_pool(tokens) * w[t]).sum(-1) + bias[t])
        torch.testing.assert_close(u[:, 2], expected)


def test_per_timestep_bank_with_hidden_layer():
    torch.manual_seed(0)
    model = EarlyExitUViT(UViT(UViTConfig(**TINY_EARLY_EXIT), num_timesteps=T), "mlp_probe_per_timestep", bank_hidden=3).double()
    x, _, _ = tiny_batch(n=2)
    t = torch.tensor([9, 21])
    tokens = model.backbone.embed(x, t)
    bank = model.probes
    h = hand_pool(tokens)
    expected = []
    for b in range(2):
        hidden = torch.nn.functional.gelu(h[b] @ bank.weight1[0, t[b]] + bank.bias1[0, t[b]])
        expected.append(torch.sigmoid(hidden @ bank.weight2[0, t[b]] + bank.bias2[0, t[b]]))
    torch.testing.assert_close(model.probe(0, tokens, t), torch.stack(expected))


def test_mlp_and_attention_probes_written_out():
    x, t, _ = tiny_batch(n=3)
    model = make("mlp_probe_per_layer")
    tokens = model.backbone.embed(x, t)
    p = model.probes[0]
    expected = torch.sigmoid(p.fc2(torch.nn.functional.gelu(p.fc1(hand_pool(tokens))))).squeeze(-1)
    torch.testing.assert_close(model.probe(0, tokens, t), expected)

    model = make("attention_probe")
    tokens = model.backbone.embed(x, t)
    p = model.probes[0]
    heads, hidden = 4, 16
    kv = p.kv(p.norm(tokens))
    keys, values = kv[..., :hidden], kv[..., hidden:]
    pooled = []
    for head in range(heads):
        part = slice(head * hidden // heads, (head + 1) * hidden // heads)
        q = p.query[0, head, 0]
        weights = torch.softmax(keys[..., part] @ q / (hidden // heads) ** 0.5, dim=-1)  # (B, N)
        pooled.append((weights[..., None] * values[..., part]).sum(1))
    pooled = torch.cat(pooled, dim=-1)
    expected = torch.sigmoid(p.fc2(torch.nn.functional.gelu(p.fc1(pooled)))).squeeze(-1)
    torch.testing.assert_close(model.probe(0, tokens, t), expected)


def test_select_exit_reference_rule():
    outputs = [torch.full((3, 1, 2, 2), float(k)) for k in range(4)]
    u = torch.tensor([[0.9, 0.2, 0.1], [0.9, 0.8, 0.7], [0.05, 0.9, 0.0]])
    output, exit_layer = select_exit(outputs, u, 0.2)
    assert exit_layer.tolist() == [1, 3, 0]
    assert output[:, 0, 0, 0].tolist() == [1.0, 3.0, 0.0]
    assert select_exit(outputs, u, 1.0)[1].tolist() == [0, 0, 0]
    assert select_exit(outputs, u, 0.0)[1].tolist() == [3, 3, 2]


@pytest.mark.parametrize("classifier_type", CLASSIFIER_TYPES)
@pytest.mark.parametrize("num_classes", [0, 3])
def test_compacted_early_exit_equals_reference(classifier_type, num_classes):
    model = make(classifier_type, num_classes)
    randomize_probes(model)
    x, t, y = tiny_batch(n=12, num_classes=num_classes)
    with torch.no_grad():
        outputs, u = model(x, t, y)
        mixed, exits_seen = False, set()
        for threshold in [0.0, *thresholds_between(u), 1.0]:
            expected, expected_exit = select_exit(outputs, u, threshold)
            output, exit_layer = model.forward_early_exit(x, t, threshold, y)
            assert exit_layer.dtype == torch.long
            assert exit_layer.tolist() == expected_exit.tolist(), threshold
            torch.testing.assert_close(output, expected)
            mixed |= len(set(exit_layer.tolist())) >= 2
            exits_seen |= set(exit_layer.tolist())
        # The set-up must send the samples of one batch to different exits, several of them.
        assert mixed and len(exits_seen) >= 3, exits_seen
        output, exit_layer = model.forward_early_exit(x, t, 0.0, y)
        assert (exit_layer == model.depth).all()
        torch.testing.assert_close(output, model.backbone(x, t, y))
        output, exit_layer = model.forward_early_exit(x, t, 1.0, y)
        assert (exit_layer == 0).all()
        torch.testing.assert_close(output, model.exit_heads[0](model.backbone.embed(x, t, y)))


def count_calls(model):
    """Batch sizes seen by every block (execution order) and every exit head."""
    seen = {"block": [[] for _ in range(model.depth)], "head": [[] for _ in range(model.depth + 1)]}
    for i in range(model.depth):
        model.backbone.block(i).register_forward_hook(lambda m, a, o, i=i: seen["block"][i].append(o.shape[0]))
        model.exit_heads[i].register_forward_hook(lambda m, a, o, i=i: seen["head"][i].append(o.shape[0]))
    model.backbone.final_layer.register_forward_hook(lambda m, a, o: seen["head"][-1].append(o.shape[0]))
    return seen


def test_compaction_skips_the_work_of_exited_samples():
    # Linear per-(exit, timestep) probes with zero weights: u depends only on (exit, t), so each
    # sample's exit is set by its timestep: sample b leaves at exit targets[b].
    model = make("mlp_probe_per_layer_per_timestep")
    seen = count_calls(model)
    t = torch.tensor([3, 10, 20, 30, 40, 41, 42])
    targets = torch.tensor([0, 2, 5, 1, 2, 4, 5])
    with torch.no_grad():
        model.probes.weight.zero_()
        for b in range(len(t)):
            for i in range(model.depth):
                model.probes.bias[i, t[b]] = 6.0 if i < targets[b] else -6.0
    x = tiny_batch(n=len(t))[0]
    with torch.no_grad():
        output, exit_layer = model.forward_early_exit(x, t, 0.5)
    assert exit_layer.tolist() == targets.tolist()
    for i in range(model.depth):
        # Block i runs once, on exactly the samples that have not exited at 0..i.
        assert seen["block"][i] == [int((targets > i).sum())], i
    for i in range(model.depth + 1):
        n_exit = int((targets == i).sum())
        assert seen["head"][i] == ([n_exit] if n_exit else []), i
    with torch.no_grad():
        outputs, _ = model(x, t)
    torch.testing.assert_close(output, torch.stack([outputs[k][b] for b, k in enumerate(targets.tolist())]))

    # All samples exit at k: blocks >= k never run; the loop stops there.
    for k in [0, 3]:
        model = make("mlp_probe_per_layer_per_timestep")
        seen = count_calls(model)
        with torch.no_grad():
            model.probes.weight.zero_()
            model.probes.bias.fill_(6.0)
            model.probes.bias[k] = -6.0
            # The rule is u <= threshold: a threshold equal to u exits.
            threshold = torch.sigmoid(torch.tensor(-6.0, dtype=torch.float64)).item()
            _, exit_layer = model.forward_early_exit(x, t, threshold)
        assert (exit_layer == k).all()
        assert [len(calls) for calls in seen["block"]] == [1] * k + [0] * (model.depth - k)
        assert [len(calls) for calls in seen["head"]] == [int(i == k) for i in range(model.depth + 1)]


def test_backbone_loads_into_early_exit_model_and_alias():
    torch.manual_seed(5)
    full = UViT(UViTConfig(**TINY_EARLY_EXIT), num_timesteps=T)
    model = build_model("deediff_uvit", TINY_EARLY_EXIT, T, "attention_probe")
    assert isinstance(model, EarlyExitUViT)
    model.backbone.load_state_dict(full.state_dict())
    x, t, _ = tiny_batch(n=2)
    with torch.no_grad():
        torch.testing.assert_close(model(x.float(), t)[0][-1], full(x.float(), t))
    restored = build_model("early_exit", TINY_EARLY_EXIT, T, "attention_probe")
    restored.load_state_dict(model.state_dict())


def test_bad_settings_are_refused_at_the_edge(tmp_path):
    # The model trusts its callers: `duodiff sample` checks the threshold (tests/test_bad_inputs.py),
    # `duodiff train` the classifier type (ibid.) and, here, probe_hidden against the probe's heads.
    config = write_model_yaml(tmp_path / "m.yaml", TINY_DIGITS, probe_hidden=10)
    args = train_kwargs(config, tmp_path / "run", model="early_exit", classifier_type="attention_probe")
    with pytest.raises(DuodiffError, match="m.yaml: probe_hidden \\(10\\) must be divisible by the attention probe's heads \\(4\\)"):
        check_train_args(args, 1)
    # The seed's single full-width head has no such constraint.
    seed = write_model_yaml(tmp_path / "seed.yaml", TINY_DIGITS, probe_hidden=10, probe_design="seed")
    check_train_args({**args, "config_path": seed}, 1)
