"""U-ViT: parameter counts, shapes, the decomposed forward, layer details and config checks."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import TINY, train_kwargs

from duodiff.core.errors import DuodiffError
from duodiff.models import CLASSIFIER_TYPES, build_model, load_model_config
from duodiff.models.uvit import UViT, UViTConfig, timestep_embedding, unpatchify
from duodiff.train.checks import check_train_args

torch.set_num_threads(1)
CONFIG_DIR = Path(__file__).resolve().parents[1] / "config" / "models"

CIFAR10 = dict(
    img_size=32, patch_size=2, in_chans=3, embed_dim=512, depth=13, num_heads=8,
    mlp_time_embed=False, qkv_bias=False, conv=True, num_classes=0,
)  # fmt: skip


def hand_count(img_size, patch_size, in_chans, embed_dim, depth, num_classes=0, mlp_ratio=4, qkv_bias=False,
               mlp_time_embed=False, conv=True, **_):  # fmt: skip
    """U-ViT parameter count written out from the architecture, independent of the module code."""
    d, p, c = embed_dim, patch_size, in_chans
    tokens = (img_size // p) ** 2 + 1 + (num_classes > 0)
    hidden = int(d * mlp_ratio)
    block = (
        2 * (2 * d)  # two LayerNorms
        + d * 3 * d + (3 * d if qkv_bias else 0)  # qkv
        + d * d + d  # attention output projection
        + d * hidden + hidden + hidden * d + d  # MLP
    )
    total = depth * block + (depth // 2) * (2 * d * d + d)  # blocks + long-skip linears
    total += c * d * p * p + d  # patch embedding conv
    total += tokens * d  # position embedding
    total += num_classes * d
    total += (d * 4 * d + 4 * d + 4 * d * d + d) if mlp_time_embed else 0
    total += 2 * d + d * p * p * c + p * p * c  # final norm + decoder
    total += (c * c * 9 + c) if conv else 0
    return total


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_pinned_and_by_formula():
    full = build_model("uvit", CIFAR10)
    shallow = build_model("uvit", {**CIFAR10, "depth": 3})
    assert n_params(full) == 44_255_328 == hand_count(**CIFAR10)
    assert n_params(shallow) == 10_122_848 == hand_count(**{**CIFAR10, "depth": 3})
    for config in [
        {**TINY, "num_classes": 7, "mlp_time_embed": True, "qkv_bias": True, "conv": False},
        {**TINY, "mlp_ratio": 2.0},
    ]:
        assert n_params(UViT(UViTConfig(**config))) == hand_count(**config)


@pytest.mark.parametrize("num_classes", [0, 10])
def test_shapes_and_decomposition(num_classes):
    torch.manual_seed(0)
    model = UViT(UViTConfig(**TINY, num_classes=num_classes)).eval()
    x = torch.randn(3, 2, 8, 8)
    t = torch.tensor([0, 500, 999])
    y = torch.tensor([1, 9, 4]) if num_classes else None
    out = model(x, t, y)
    assert out.shape == x.shape
    assert model.num_extras == 1 + (num_classes > 0)
    tokens = model.embed(x, t, y)
    assert tokens.shape == (3, model.num_extras + 16, 32)
    skips = []
    for i in range(model.depth):
        tokens = model.run_block(i, tokens, skips)
        assert len(skips) == min(i + 1, model.depth // 2) - max(0, i - model.depth // 2)
    assert skips == []
    torch.testing.assert_close(model.head(tokens), out, rtol=0, atol=0)


def test_reference_forward_written_out():
    """The forward pass spelled out as in the reference UViT.forward (in/mid/out blocks, skips)."""
    torch.manual_seed(1)
    model = UViT(UViTConfig(**TINY, num_classes=5, mlp_time_embed=True)).eval()
    x, t, y = torch.randn(2, 2, 8, 8), torch.tensor([10, 700]), torch.tensor([3, 0])
    h = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
    time_token = model.time_embed(timestep_embedding(t, 32)).unsqueeze(1)
    h = torch.cat([model.label_emb(y).unsqueeze(1), time_token, h], dim=1) + model.pos_embed
    skips = []
    for blk in model.in_blocks:
        h = blk(h)
        skips.append(h)
    h = model.mid_block(h)
    for blk in model.out_blocks:
        h = blk(h, skips.pop())
    h = model.decoder_pred(model.norm(h))[:, 2:]
    expected = model.final_layer(unpatchify(h, 2))
    torch.testing.assert_close(model(x, t, y), expected)


def test_timestep_embedding_closed_form():
    t = torch.tensor([0.0, 3.0, 250.0])
    emb = timestep_embedding(t, 6)
    freqs = [10000 ** (-k / 3) for k in range(3)]
    expected = [[math.cos(s * f) for f in freqs] + [math.sin(s * f) for f in freqs] for s in t.tolist()]
    torch.testing.assert_close(emb, torch.tensor(expected))
    assert timestep_embedding(t, 7).shape == (3, 7) and (timestep_embedding(t, 7)[:, -1] == 0).all()


def test_normalize_timesteps_divides_by_T():
    torch.manual_seed(2)
    raw = UViT(UViTConfig(**TINY), num_timesteps=1000)
    normalized = UViT(UViTConfig(**TINY, normalize_timesteps=True), num_timesteps=1000)
    normalized.load_state_dict(raw.state_dict())
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([7, 900])
    torch.testing.assert_close(normalized.embed(x, t), raw.embed(x, t.float() / 1000))
    assert not torch.allclose(normalized.embed(x, t), raw.embed(x, t))


def test_unpatchify_layout():
    """Token (row i, col j) holds its p x p x C patch ordered (p1, p2, C), as einops in the reference."""
    B, C, p, h, w = 2, 3, 2, 3, 3
    x = torch.randn(B, h * w, p * p * C)
    img = unpatchify(x, C)
    assert img.shape == (B, C, h * p, w * p)
    for i in range(h):
        for j in range(w):
            for p1 in range(p):
                for p2 in range(p):
                    for c in range(C):
                        assert img[1, c, i * p + p1, j * p + p2] == x[1, i * w + j, (p1 * p + p2) * C + c]


def test_attention_matches_torch_multihead_attention():
    torch.manual_seed(3)
    model = UViT(UViTConfig(**TINY, qkv_bias=True))
    attn = model.in_blocks[0].attn
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(attn.qkv.weight)
        mha.in_proj_bias.copy_(attn.qkv.bias)
        mha.out_proj.weight.copy_(attn.proj.weight)
        mha.out_proj.bias.copy_(attn.proj.bias)
    x = torch.randn(2, 17, 32)
    torch.testing.assert_close(attn(x), mha(x, x, x, need_weights=False)[0], rtol=1e-5, atol=1e-5)


def test_initialisation_as_reference():
    torch.manual_seed(4)
    model = UViT(UViTConfig(**{**TINY, "embed_dim": 64}))
    linear = model.out_blocks[0].mlp.fc1
    assert linear.bias.abs().max() == 0
    assert abs(linear.weight.std().item() - 0.02) < 0.002
    assert (model.norm.weight == 1).all() and (model.norm.bias == 0).all()
    assert abs(model.pos_embed.std().item() - 0.02) < 0.004


def test_class_token_precedes_time_token():
    model = UViT(UViTConfig(**TINY, num_classes=3))
    x, t, y = torch.randn(2, 2, 8, 8), torch.tensor([1, 2]), torch.tensor([2, 0])
    tokens = model.embed(x, t, y)
    torch.testing.assert_close(tokens[:, 0], model.label_emb.weight[y] + model.pos_embed[0, 0])
    torch.testing.assert_close(tokens[:, 1], timestep_embedding(t, 32) + model.pos_embed[0, 1])
    with pytest.raises(DuodiffError, match="num_classes=3"):
        model(x, t)
    with pytest.raises(DuodiffError, match="num_classes=0"):
        UViT(UViTConfig(**TINY))(x, t, y)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"depth": 4}, "depth must be odd"),
        ({"img_size": 10, "patch_size": 4}, "img_size \\(10\\) must be divisible by patch_size \\(4\\)"),
        ({"embed_dim": 30}, "embed_dim \\(30\\) must be divisible by num_heads \\(4\\)"),
        ({"num_heads": 0}, "num_heads must be a positive integer"),
        ({"in_chans": 1.5}, "in_chans must be a positive integer"),
        ({"num_classes": -1}, "num_classes must be a non-negative integer"),
        ({"conv": "yes"}, "conv must be true or false"),
        ({"mlp_ratio": 0}, "mlp_ratio must be a positive number"),
        ({"dropout": 0.1}, "unknown key\\(s\\) dropout; allowed keys: img_size"),
    ],
)
def test_config_validation(change, message):
    with pytest.raises(DuodiffError, match=message):
        build_model("uvit", {**TINY, **change})


@pytest.mark.parametrize(
    "change, message",
    [
        ({"depth": 4}, "depth must be odd"),
        ({"depth": True}, "depth must be a positive integer; got True"),
        ({"probe_hidden": 0}, "probe_hidden must be a positive integer; got 0"),
        ({"probe_design": "paper"}, "probe_design must be one of duodiff, seed; got 'paper'"),
        ({"mlp_ratio": True}, "mlp_ratio must be a positive number; got True"),
    ],
)
def test_config_checks_itself_once_made(change, message):
    """UViTConfig refuses a bad value when made, directly or from a mapping naming its source."""
    with pytest.raises(DuodiffError, match=f"^{message}"):
        UViTConfig(**{**TINY, **change})
    with pytest.raises(DuodiffError, match=f"^models/x.yaml: {message}"):
        UViTConfig.from_dict({**TINY, **change}, source="models/x.yaml")


def test_config_is_frozen_and_fills_defaults():
    import dataclasses

    config = UViTConfig.from_dict(TINY)
    assert config.to_dict() == {
        **TINY, "mlp_ratio": 4.0, "qkv_bias": False, "mlp_time_embed": False, "num_classes": 0, "conv": True,
        "normalize_timesteps": False, "probe_hidden": 128, "probe_design": "duodiff",
    }  # fmt: skip
    assert UViTConfig.from_dict(config.to_dict()) == config
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.depth = 7
    with pytest.raises(DuodiffError, match="^m.pt: expected a mapping of settings, got list"):
        UViTConfig.from_dict([TINY], source="m.pt")
    # A mapping (a YAML, or the dict stored in model.pt) and the config build the same model.
    torch.manual_seed(0)
    from_mapping = build_model("uvit", TINY)
    torch.manual_seed(0)
    from_config = build_model("uvit", config)
    assert from_mapping.config == from_config.config == config
    for (name, a), (_, b) in zip(from_mapping.state_dict().items(), from_config.state_dict().items()):
        assert torch.equal(a, b), name


def test_missing_key_and_bad_kind(tmp_path):
    config = dict(TINY)
    del config["depth"]
    with pytest.raises(DuodiffError, match="missing required key\\(s\\) depth"):
        build_model("uvit", config)
    # The model kind and the classifier type are checked once, by `duodiff train`'s check pass
    # (the edge); build_model trusts them.
    with pytest.raises(DuodiffError, match="--model must be one of uvit, early_exit, deediff_uvit; got 'dit'"):
        check_train_args(train_kwargs("unread.yaml", tmp_path / "run", model="dit"), 1)
    with pytest.raises(DuodiffError, match="--classifier-type must be one of attention_probe"):
        check_train_args(train_kwargs("unread.yaml", tmp_path / "run", model="early_exit", classifier_type="linear"), 1)


def test_shipped_model_configs(tmp_path):
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    for expected in ["cifar10", "cifar10_d3", "celeba64", "celeba64_d3", "celeba64_d5", "celeba64_d7",
                     "imagenet64", "imagenet64_d3", "digits", "digits_d3"]:  # fmt: skip
        assert expected in names
    configs = {name: load_model_config(CONFIG_DIR / f"{name}.yaml") for name in names}
    for name, config in configs.items():
        if "_d" in name:
            base = configs[name.split("_d")[0]]
            assert {k: v for k, v in config.items() if k != "depth"} == {k: v for k, v in base.items() if k != "depth"}
            assert config["depth"] == int(name.split("_d")[1]) < base["depth"]
    cifar = configs["cifar10"]
    assert {k: cifar[k] for k in CIFAR10} == CIFAR10
    assert (configs["imagenet64"]["num_classes"], configs["imagenet64"]["depth"]) == (1000, 17)
    assert configs["digits"]["img_size"] == 8 and configs["digits"]["in_chans"] == 1
    model = build_model("uvit", configs["digits"])
    assert model(torch.randn(2, 1, 8, 8), torch.tensor([0, 999])).shape == (2, 1, 8, 8)

    bad = tmp_path / "bad.yaml"
    bad.write_text("img_size: 8\npatch_size: 2\nin_chans: 1\nembed_dim: 32\ndepth: 3\nnum_heads: 4\nheads: 2\n")
    with pytest.raises(DuodiffError, match="bad.yaml: unknown key\\(s\\) heads; allowed keys"):
        load_model_config(bad)


def test_classifier_types_in_step_with_early_exit_module():
    from duodiff.models import early_exit

    assert tuple(early_exit.CLASSIFIER_TYPES) == tuple(CLASSIFIER_TYPES)
