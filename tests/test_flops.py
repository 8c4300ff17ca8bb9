"""FLOP counting against closed-form counts, the exit LUT, and per-sample-set averaging."""

import json
from pathlib import Path

import pytest
import torch
from _defaults import cli_args

from duodiff.core.errors import DuodiffError
from duodiff.metrics import flops
from duodiff.models import build_model, load_model_config
from duodiff.models.checkpoints import save_model

# A small class-conditional U-ViT with a time-embedding MLP, so every kind of layer is counted.
IMG, P, C, D, DEPTH, HEADS, RATIO, CLASSES, HIDDEN = 8, 2, 3, 32, 5, 4, 2.0, 3, 16
CONFIG = dict(
    img_size=IMG, patch_size=P, in_chans=C, embed_dim=D, depth=DEPTH, num_heads=HEADS, mlp_ratio=RATIO,
    qkv_bias=False, mlp_time_embed=True, num_classes=CLASSES, conv=True, normalize_timesteps=True,
    probe_hidden=HIDDEN,
)  # fmt: skip
T = 10

# Closed forms, 2 FLOPs per multiply-add, batch 1.
L = (IMG // P) ** 2  # patches
N = L + 2  # + time token + class token
MLP_HIDDEN = int(D * RATIO)
PATCH_CONV = 2 * (C * P * P) * D * L
TIME_MLP = 2 * D * 4 * D + 2 * 4 * D * D  # Linear(D, 4D), Linear(4D, D) on one token
BLOCK_LINEAR = 2 * N * D * 3 * D + 2 * N * D * D + 2 * N * D * MLP_HIDDEN * 2  # qkv, proj, fc1 + fc2
BLOCK_ATTENTION = 2 * N * N * D + 2 * N * N * D  # QK^T and AV summed over heads
SKIP_LINEAR = 2 * N * 2 * D * D
DECODER = 2 * N * D * P * P * C  # applied to every token before the extras are dropped
FINAL_CONV = 2 * (C * 9) * C * IMG * IMG
MLP_PROBE = 2 * D * HIDDEN + 2 * HIDDEN * 1  # on the pooled tokens (pooling itself: no matmul)
N_OUT = DEPTH // 2

EMBED = PATCH_CONV + TIME_MLP
HEAD = DECODER + FINAL_CONV
FULL_LINEAR_CONV = EMBED + DEPTH * BLOCK_LINEAR + N_OUT * SKIP_LINEAR + HEAD
FULL_TOTAL = FULL_LINEAR_CONV + DEPTH * BLOCK_ATTENTION


def block_linear(i):
    return BLOCK_LINEAR + (SKIP_LINEAR if i > DEPTH // 2 else 0)


@pytest.fixture(scope="session")
def uvit_costs():
    return flops.model_costs("uvit", CONFIG, T)


@pytest.fixture(scope="session")
def ee_costs():
    return flops.model_costs("early_exit", CONFIG, T, "mlp_probe_per_layer")


def test_uvit_pieces_match_closed_form(uvit_costs):
    assert uvit_costs["embed"] == {"total": EMBED, "linear_conv": EMBED}
    for i, cost in enumerate(uvit_costs["blocks"]):
        assert cost["linear_conv"] == block_linear(i), i
        assert cost["total"] == block_linear(i) + BLOCK_ATTENTION, i
    assert uvit_costs["head"] == {"total": HEAD, "linear_conv": HEAD}
    assert flops.network_cost(uvit_costs) == {"total": FULL_TOTAL, "linear_conv": FULL_LINEAR_CONV}


def test_whole_forward_on_cpu_counts_the_same(uvit_costs):
    """The meta-device piecewise count equals FlopCounterMode around a real forward pass."""
    torch.manual_seed(0)
    model = build_model("uvit", CONFIG, T).eval()
    x, t, y = torch.randn(1, C, IMG, IMG), torch.tensor([3]), torch.tensor([1])
    _, cost = flops.count(lambda: model(x, t, y))
    assert cost == {"total": FULL_TOTAL, "linear_conv": FULL_LINEAR_CONV}


def test_attention_is_counted_on_cpu():
    """PyTorch's fused CPU attention kernel has no FLOP formula; counting must not lose QK^T, AV."""
    q = k = v = torch.randn(1, HEADS, N, D // HEADS)
    _, cost = flops.count(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    assert cost == {"total": BLOCK_ATTENTION, "linear_conv": 0}


def test_exit_lut_closed_form(ee_costs):
    lut = flops.exit_lut(ee_costs)
    assert len(lut) == DEPTH + 1
    for k, entry in enumerate(lut):
        probes = min(k, DEPTH - 1) + 1
        expected_lc = EMBED + sum(block_linear(i) for i in range(k)) + probes * MLP_PROBE + HEAD
        assert entry["linear_conv"] == expected_lc, k
        assert entry["total"] == expected_lc + k * BLOCK_ATTENTION, k
    totals = [e["total"] for e in lut]
    assert all(a < b for a, b in zip(totals, totals[1:]))
    # Exit depth: the whole backbone plus every probe.
    assert lut[DEPTH]["total"] == FULL_TOTAL + DEPTH * MLP_PROBE


@pytest.mark.parametrize("classifier_type", ["attention_probe", "mlp_probe_per_timestep", "mlp_probe_per_layer_per_timestep"])
def test_lut_increasing_and_consistent_with_forward(classifier_type):
    costs = flops.model_costs("early_exit", CONFIG, T, classifier_type)
    lut = [e["total"] for e in flops.exit_lut(costs)]
    assert all(a < b for a, b in zip(lut, lut[1:]))
    backbone = flops.network_cost(costs)
    probes = sum(p["total"] for p in costs["probes"])
    assert lut[DEPTH] == backbone["total"] + probes
    # The model's own forward runs every exit head and probe once: FlopCounterMode around it.
    model = build_model("early_exit", CONFIG, T, classifier_type).eval()
    _, whole = flops.count(lambda: model(torch.randn(1, C, IMG, IMG), torch.tensor([7]), torch.tensor([2])))
    heads = sum(h["total"] for h in costs["exit_heads"][:DEPTH])
    assert whole["total"] == backbone["total"] + probes + heads


def test_early_exit_set_average_by_hand(ee_costs):
    lut = [e["total"] for e in flops.exit_lut(ee_costs)]
    exit_layers = torch.tensor([[0, 5, 2], [5, 1, 3]])  # (steps=2, n=3)
    per_eval, depth = flops.set_costs("early_exit", exit_layers, ee_costs)
    out = flops.summarize(per_eval, exit_layers, depth)
    by_hand = (lut[0] + lut[5] + lut[2] + lut[5] + lut[1] + lut[3]) / 6
    assert out["gflops_per_forward"] == pytest.approx(by_hand / 1e9, rel=1e-12)
    assert out["gflops_per_image"] == pytest.approx(2 * by_hand / 1e9, rel=1e-12)
    assert out["layer_ratio"] == pytest.approx((0 + 5 + 2 + 5 + 1 + 3) / 6 / DEPTH)


def test_duodiff_set_average_by_hand():
    shallow = flops.model_costs("uvit", {**CONFIG, "depth": 3}, T)
    full = flops.model_costs("uvit", CONFIG, T)
    steps, t_switch = 5, 2
    exit_layers = torch.tensor([[3, 3]] * t_switch + [[DEPTH, DEPTH]] * (steps - t_switch))
    per_eval, depth = flops.set_costs("duodiff", exit_layers, shallow, full, t_switch)
    out = flops.summarize(per_eval, exit_layers, depth)
    s, f = flops.network_cost(shallow)["total"], FULL_TOTAL
    assert out["gflops_per_forward"] == pytest.approx((2 * s + 3 * f) / 5 / 1e9, rel=1e-12)
    assert out["gflops_per_image"] == pytest.approx((2 * s + 3 * f) / 1e9, rel=1e-12)
    assert out["layer_ratio"] == pytest.approx((2 * 3 + 3 * DEPTH) / 5 / DEPTH)
    with pytest.raises(DuodiffError, match="t_switch"):
        flops.set_costs("duodiff", exit_layers, shallow, full, 3)  # exit_layers say 2


def test_cifar10_uvit_s2_matches_the_papers_and_a_hand_count():
    """The shipped U-ViT-S/2 CIFAR-10 config: 32x32x3, patch 2, D 512, 13 blocks, mlp_ratio 4,
    unconditional, no time MLP, final 3x3 conv."""
    cfg = load_model_config(Path(__file__).resolve().parents[1] / "config" / "models" / "cifar10.yaml")
    assert (cfg["num_classes"], cfg["mlp_time_embed"], cfg["conv"], cfg["depth"]) == (0, False, True, 13)
    cost = flops.network_cost(flops.model_costs("uvit", cfg, 1000))
    # The DeeDiff / DuoDiff cost tables quote 22.6-22.75 GFLOPs (linear and conv layers) for
    # U-ViT-S/2 on CIFAR-10; 22.75 includes their MLP probes.
    assert 22.6e9 <= cost["linear_conv"] <= 22.7e9, cost

    # By hand, 2 FLOPs per multiply-add. 256 patches + 1 time token (the sinusoidal embedding
    # is no matmul without the time MLP; no class token).
    d, p, c, img, depth = 512, 2, 3, 32, 13
    patches = (img // p) ** 2
    n = patches + 1
    patch_conv = 2 * (c * p * p) * d * patches
    block = 2 * n * d * 3 * d + 2 * n * d * d + 2 * n * d * 4 * d * 2  # qkv (no bias), proj, fc1 + fc2
    skip = 2 * n * 2 * d * d  # the 6 out-blocks' Linear(2D, D)
    decoder = 2 * n * d * p * p * c  # every token, before the time token is dropped
    final_conv = 2 * (c * 9) * c * img * img
    by_hand = patch_conv + depth * block + (depth // 2) * skip + decoder + final_conv
    assert by_hand == 22_643_128_320
    assert cost["linear_conv"] == by_hand
    assert cost["total"] - cost["linear_conv"] == depth * 4 * n * n * d  # QK^T and AV, 2 N^2 D each


def write_set(folder, stats, exit_layers):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "stats.json").write_text(json.dumps(stats))
    torch.save(exit_layers, folder / "exit_layers.pt")


def save_tiny(path, kind, config, classifier_type=None):
    model = build_model(kind, config, T, classifier_type)
    save_model(
        path, kind=kind, classifier_type=classifier_type, model_config=config,
        diffusion={"num_timesteps": T, "beta_start": 1e-4, "beta_end": 0.02, "parametrization": "predict_noise"},
        state_dict=model.state_dict(), ema_state_dict=None, step=0, train_args={},
    )  # fmt: skip


def test_run_flops_early_exit_and_duodiff(tmp_path, ee_costs):
    save_tiny(tmp_path / "ee.pt", "early_exit", CONFIG, "mlp_probe_per_layer")
    exit_layers = torch.tensor([[1, 5], [4, 0], [5, 5]])
    write_set(
        tmp_path / "ee", {"method": "early_exit", "checkpoint": str(tmp_path / "ee.pt"), "depth": DEPTH}, exit_layers
    )
    out = flops.run_flops(**cli_args("flops", samples=tmp_path / "ee", output=tmp_path / "ee.json"))
    stored = json.loads((tmp_path / "ee.json").read_text())
    assert stored == json.loads(json.dumps(out))
    for key in ("gflops_per_forward", "gflops_per_forward_linear_conv", "gflops_per_image", "layer_ratio", "lut_gflops", "theoretical"):
        assert key in stored
    lut = [e["total"] / 1e9 for e in flops.exit_lut(ee_costs)]
    assert stored["lut_gflops"] == pytest.approx(lut)
    assert stored["gflops_per_forward"] == pytest.approx((lut[1] + lut[5] + lut[4] + lut[0] + 2 * lut[5]) / 6)
    assert stored["layer_ratio"] == pytest.approx(20 / 6 / DEPTH)

    save_tiny(tmp_path / "shallow.pt", "uvit", {**CONFIG, "depth": 3})
    save_tiny(tmp_path / "full.pt", "uvit", CONFIG)
    stats = {"method": "duodiff", "checkpoint": str(tmp_path / "shallow.pt"),
             "checkpoint_late": str(tmp_path / "full.pt"), "t_switch": 1, "depth": DEPTH, "shallow_depth": 3}  # fmt: skip
    write_set(tmp_path / "duo", stats, torch.tensor([[3, 3, 3], [DEPTH] * 3]))
    out = flops.run_flops(**cli_args("flops", samples=tmp_path / "duo", output=tmp_path / "duo.json"))
    shallow = flops.network_cost(flops.model_costs("uvit", {**CONFIG, "depth": 3}, T))
    assert out["gflops_per_forward"] == pytest.approx((shallow["total"] + FULL_TOTAL) / 2 / 1e9)
    assert out["gflops_per_forward_linear_conv"] == pytest.approx((shallow["linear_conv"] + FULL_LINEAR_CONV) / 2 / 1e9)
    assert out["lut_gflops"] is None


def test_one_call_counts_several_sets_each_as_alone(tmp_path, ee_costs):
    # The workflow's one flops job: every set gets its own file with its own hand-computed cost.
    save_tiny(tmp_path / "ee.pt", "early_exit", CONFIG, "mlp_probe_per_layer")
    save_tiny(tmp_path / "full.pt", "uvit", CONFIG)
    write_set(tmp_path / "ee", {"method": "early_exit", "checkpoint": str(tmp_path / "ee.pt"), "depth": DEPTH},
              torch.tensor([[1, 5], [4, 0], [5, 5]]))
    write_set(tmp_path / "full", {"method": "full", "checkpoint": str(tmp_path / "full.pt"), "depth": DEPTH},
              torch.full((2, 3), DEPTH))
    results = flops.run_flops_sets(samples=[tmp_path / "ee", tmp_path / "full"],
                                   output=[tmp_path / "ee.json", tmp_path / "full.json"])
    lut = [e["total"] / 1e9 for e in flops.exit_lut(ee_costs)]
    ee, full = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("ee", "full"))
    assert [r["method"] for r in results] == ["early_exit", "full"]
    assert ee["gflops_per_forward"] == pytest.approx((lut[1] + lut[5] + lut[4] + lut[0] + 2 * lut[5]) / 6)
    assert full["gflops_per_forward"] == pytest.approx(FULL_TOTAL / 1e9) and full["layer_ratio"] == 1.0


def test_several_sets_are_all_checked_before_any_is_counted(tmp_path):
    save_tiny(tmp_path / "full.pt", "uvit", CONFIG)
    write_set(tmp_path / "good", {"method": "full", "checkpoint": str(tmp_path / "full.pt")}, torch.full((2, 2), DEPTH))
    with pytest.raises(DuodiffError, match=r"^--samples names 2 set\(s\) but --output 1 file\(s\); give one FILE.json per set"):
        flops.run_flops_sets(samples=[tmp_path / "good", tmp_path / "good"], output=[tmp_path / "a.json"])
    with pytest.raises(DuodiffError, match=r"--output names .*a\.json more than once"):
        flops.run_flops_sets(samples=[tmp_path / "good", tmp_path / "good"], output=[tmp_path / "a.json"] * 2)
    with pytest.raises(DuodiffError, match=r"--samples .*nowhere: no stats.json there"):
        flops.run_flops_sets(samples=[tmp_path / "good", tmp_path / "nowhere"], output=[tmp_path / "a.json", tmp_path / "b.json"])
    assert not (tmp_path / "a.json").exists()  # the good set was not counted either


def test_run_flops_bad_input(tmp_path):
    with pytest.raises(DuodiffError, match="stats.json"):
        flops.run_flops(**cli_args("flops", samples=tmp_path / "nowhere", output=tmp_path / "out.json"))
    write_set(tmp_path / "s", {"method": "sideways", "checkpoint": "x.pt"}, torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(DuodiffError, match="method must be one of"):
        flops.run_flops(**cli_args("flops", samples=tmp_path / "s", output=tmp_path / "out.json"))
    write_set(tmp_path / "m", {"method": "full", "checkpoint": str(tmp_path / "missing.pt")}, torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(DuodiffError, match="does not exist"):
        flops.run_flops(**cli_args("flops", samples=tmp_path / "m", output=tmp_path / "out.json"))
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("t_switch", [3, -1, None, 1.5, True])
def test_run_flops_refuses_a_duodiff_t_switch_outside_the_sets_steps(tmp_path, t_switch):
    # Checked once where stats.json is read: exit_layers.pt has 2 steps, so t_switch is in [0, 2].
    save_tiny(tmp_path / "shallow.pt", "uvit", {**CONFIG, "depth": 3})
    save_tiny(tmp_path / "full.pt", "uvit", CONFIG)
    stats = {"method": "duodiff", "checkpoint": str(tmp_path / "shallow.pt"),
             "checkpoint_late": str(tmp_path / "full.pt"), "t_switch": t_switch}  # fmt: skip
    write_set(tmp_path / "duo", stats, torch.tensor([[3, 3], [DEPTH, DEPTH]]))
    with pytest.raises(DuodiffError, match=rf"t_switch must be an integer in \[0, 2\] .*; got {t_switch!r}"):
        flops.run_flops(**cli_args("flops", samples=tmp_path / "duo", output=tmp_path / "out.json"))
    assert not (tmp_path / "out.json").exists()


def test_cli_registers_flops():
    import argparse

    parser = argparse.ArgumentParser()
    flops.add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["flops", "--samples", "S", "--output", "O.json"])
    assert (args.samples, args.output) == (["S"], ["O.json"]) and callable(args.func)
    args = parser.parse_args(["flops", "--samples", "S", "T", "--output", "O.json", "P.json"])
    assert (args.samples, args.output) == (["S", "T"], ["O.json", "P.json"])


# ---- classifier-free guidance: two network evaluations per sample and step -----------------------

# The depth-3 shallow model by hand: 3 blocks, one of them an out-block with its skip Linear(2D, D).
SHALLOW_TOTAL = EMBED + 3 * (BLOCK_LINEAR + BLOCK_ATTENTION) + 1 * SKIP_LINEAR + HEAD


def guided_set(folder, stats, exit_layers, n):
    write_set(folder, {**stats, "guidance_scale": 0.4, "branches": 2, "n_samples": n}, exit_layers)


def test_guided_full_set_is_twice_the_unguided_by_hand(tmp_path):
    save_tiny(tmp_path / "full.pt", "uvit", CONFIG)
    stats, steps, n = {"method": "full", "checkpoint": str(tmp_path / "full.pt")}, 4, 3
    write_set(tmp_path / "plain", {**stats, "n_samples": n}, torch.full((steps, n), DEPTH))
    guided_set(tmp_path / "guided", stats, torch.full((steps, 2 * n), DEPTH), n)
    plain = flops.run_flops(**cli_args("flops", samples=tmp_path / "plain", output=tmp_path / "plain.json"))
    guided = flops.run_flops(**cli_args("flops", samples=tmp_path / "guided", output=tmp_path / "guided.json"))
    assert plain["gflops_per_image"] == pytest.approx(steps * FULL_TOTAL / 1e9, rel=1e-12)
    assert guided["gflops_per_image"] == pytest.approx(2 * steps * FULL_TOTAL / 1e9, rel=1e-12)
    assert guided["gflops_per_image_linear_conv"] == pytest.approx(2 * steps * FULL_LINEAR_CONV / 1e9, rel=1e-12)
    # Per network evaluation and relative to the full model guided alike: unchanged.
    assert guided["gflops_per_forward"] == pytest.approx(FULL_TOTAL / 1e9, rel=1e-12) and guided["layer_ratio"] == 1.0
    assert (guided["n_samples"], guided["branches"], guided["guidance_scale"]) == (n, 2, 0.4)
    assert (plain["branches"], plain["guidance_scale"]) == (1, 0.0)


def test_guided_duodiff_set_by_hand(tmp_path):
    save_tiny(tmp_path / "shallow.pt", "uvit", {**CONFIG, "depth": 3})
    save_tiny(tmp_path / "full.pt", "uvit", CONFIG)
    steps, t_switch, n = 5, 2, 2
    stats = {"method": "duodiff", "checkpoint": str(tmp_path / "shallow.pt"),
             "checkpoint_late": str(tmp_path / "full.pt"), "t_switch": t_switch}  # fmt: skip
    exit_layers = torch.tensor([[3] * 2 * n] * t_switch + [[DEPTH] * 2 * n] * (steps - t_switch))
    guided_set(tmp_path / "duo", stats, exit_layers, n)
    out = flops.run_flops(**cli_args("flops", samples=tmp_path / "duo", output=tmp_path / "duo.json"))
    # Both branches of a sample: t_switch steps of the shallow model, then the full one.
    assert out["gflops_per_image"] == pytest.approx(2 * (t_switch * SHALLOW_TOTAL + (steps - t_switch) * FULL_TOTAL) / 1e9, rel=1e-12)
    assert out["gflops_per_forward"] == pytest.approx((2 * SHALLOW_TOTAL + 3 * FULL_TOTAL) / 5 / 1e9, rel=1e-12)
    assert out["layer_ratio"] == pytest.approx((2 * 3 + 3 * DEPTH) / 5 / DEPTH)


def test_guided_early_exit_set_counts_each_branch_at_its_own_exit(tmp_path, ee_costs):
    save_tiny(tmp_path / "ee.pt", "early_exit", CONFIG, "mlp_probe_per_layer")
    # n = 2 samples: columns 0, 1 their conditional branches, 2, 3 their unconditional ones.
    exit_layers = torch.tensor([[5, 1, 2, 0], [3, 5, 4, 4]])
    guided_set(tmp_path / "ee", {"method": "early_exit", "checkpoint": str(tmp_path / "ee.pt")}, exit_layers, 2)
    out = flops.run_flops(**cli_args("flops", samples=tmp_path / "ee", output=tmp_path / "ee.json"))
    lut = [e["total"] for e in flops.exit_lut(ee_costs)]
    sample_0 = lut[5] + lut[3] + lut[2] + lut[4]  # conditional exits 5, 3; unconditional 2, 4
    sample_1 = lut[1] + lut[5] + lut[0] + lut[4]
    assert out["gflops_per_image"] == pytest.approx((sample_0 + sample_1) / 2 / 1e9, rel=1e-12)
    assert out["layer_ratio"] == pytest.approx((5 + 1 + 2 + 0 + 3 + 5 + 4 + 4) / 8 / DEPTH)


def test_guided_set_with_the_wrong_number_of_columns_is_refused(tmp_path):
    save_tiny(tmp_path / "full.pt", "uvit", CONFIG)
    guided_set(tmp_path / "bad", {"method": "full", "checkpoint": str(tmp_path / "full.pt")}, torch.full((2, 3), DEPTH), 3)
    with pytest.raises(DuodiffError, match=r"3 columns do not hold branches 2 \(stats.json\) x n_samples 3"):
        flops.run_flops(**cli_args("flops", samples=tmp_path / "bad", output=tmp_path / "out.json"))
