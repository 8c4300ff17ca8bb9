"""Composed sampling policies (issue 21, point 3): the set-name forms, the phased policy against
the two networks run by hand step by step, and its exits, layer ratio and FLOPs against a hand
count on tiny random models; `duodiff sample` with an early-exit late model, and its refusals."""

from __future__ import annotations

import itertools

import pytest
import torch
from _defaults import cli_args
from conftest import TINY_EARLY_EXIT, select_exit

from duodiff.core.diffusion import GaussianDiffusion
from duodiff.core.errors import DuodiffError
from duodiff.core.study import (
    COMPOSED_FORMS,
    SET_NAME_PATTERNS,
    composed_family_label,
    parse_set_form,
    parse_set_name,
    set_name,
    setting_label,
    stats_method,
)
from duodiff.metrics import flops
from duodiff.models import build_model
from duodiff.models.checkpoints import save_model
from duodiff.sample.policies import (
    DuoDiffDenoiser,
    EarlyExitDenoiser,
    ModelDenoiser,
    PhasedPolicy,
)

T, STEPS, T_SWITCH, B = 20, 6, 2, 5
FULL = {**TINY_EARLY_EXIT, "in_chans": 1}  # 5 blocks
SHALLOW = {**FULL, "depth": 1}
DIFFUSION = {"num_timesteps": T, "beta_start": 1e-4, "beta_end": 0.02, "parametrization": "predict_noise"}


# ---- set names -----------------------------------------------------------------------------------

COMPOSED = [
    ("ee_attention_probe_thr0.2_steps30", "early_exit_steps", "early_exit",
     {"classifier_type": "attention_probe", "threshold": "0.2", "steps": "30"}),
    ("duodiff_d3_ts15_steps30", "duodiff_steps", "duodiff", {"depth": "3", "t_switch": "15", "steps": "30"}),
    ("duodiff_d3_ts20_ee_mlp_probe_per_layer_thr1e-05", "duodiff_early_exit", "duodiff",
     {"depth": "3", "t_switch": "20", "classifier_type": "mlp_probe_per_layer", "threshold": "1e-05"}),
    ("duodiff_d1_ts0_ee_attention_probe_thr1.0_steps5", "duodiff_early_exit_steps", "duodiff",
     {"depth": "1", "t_switch": "0", "classifier_type": "attention_probe", "threshold": "1.0", "steps": "5"}),
]  # fmt: skip


@pytest.mark.parametrize("name, form, recorded, fields", COMPOSED)
def test_composed_names_parse_into_their_form_and_build_back(name, form, recorded, fields):
    assert parse_set_form(name) == (form, fields)
    assert parse_set_name(name) == ("composed", fields)
    assert stats_method(name) == recorded
    assert set_name("composed", **fields) == name


def test_every_name_of_every_form_parses_one_way_only():
    values = {"steps": [1, 30], "depth": [1, 13], "t_switch": [0, 20], "threshold": [1e-05, 0.15, 1, 0.1 + 0.2],
              "classifier_type": ["attention_probe", "mlp_probe_per_layer_per_timestep"],
              "cache_interval": [1, 12], "cache_keep": [1, 3], "router_threshold": [1e-05, 0.9, 1]}  # fmt: skip
    names = set()
    for form, pattern in SET_NAME_PATTERNS.items():
        keys = list(pattern.groupindex)
        for combination in itertools.product(*(values[key] for key in keys)):
            fields = dict(zip(keys, combination))
            method = "composed" if form in COMPOSED_FORMS else form
            name = set_name(method, **fields)
            matching = [other for other, p in SET_NAME_PATTERNS.items() if p.fullmatch(name)]
            assert matching == [form], name
            assert name not in names
            names.add(name)
            assert set_name(method, **parse_set_name(name)[1]) == name


def test_a_composed_set_of_no_form_is_refused():
    with pytest.raises(DuodiffError, match="no composed set has exactly the fields"):
        set_name("composed", steps=30)
    with pytest.raises(DuodiffError, match="has none of the forms"):
        parse_set_name("ee_attention_probe_thr0.2_steps")


@pytest.mark.parametrize(
    "name, style, label",
    [
        ("ee_attention_probe_thr0.2_steps30", "table", "τ = 0.2, 30 steps"),
        ("duodiff_d3_ts15_steps30", "table", "t_switch = 15, 30 steps"),
        ("duodiff_d3_ts20_ee_attention_probe_thr0.15", "table", "t_switch = 20, τ = 0.15"),
        ("duodiff_d3_ts20_ee_attention_probe_thr0.15_steps30", "stats", "t_switch=20, threshold=0.15, steps=30"),
        ("duodiff_d3_ts20_ee_attention_probe_thr0.15", "plot", "tₛ=20, τ=0.15"),
    ],
)  # fmt: skip
def test_composed_setting_labels_name_what_the_set_combines(name, style, label):
    _, fields = parse_set_form(name)
    row = {"method": "composed", "set": name, "steps": 40, "t_switch": None, "threshold": None}
    row.update({k: float(v) if k == "threshold" else int(v) for k, v in fields.items() if k in ("steps", "t_switch", "threshold")})
    assert setting_label(row, style=style) == label


def test_composed_family_labels_leave_the_knob_out():
    assert composed_family_label({"classifier_type": "attention_probe", "steps": 30}, "threshold") == \
        "attention_probe at 30 steps"
    assert composed_family_label({"depth": 3, "steps": 30}, "t_switch") == "DuoDiff d3 at 30 steps"
    assert composed_family_label({"depth": 3, "t_switch": 20, "classifier_type": "attention_probe"}, "threshold") == \
        "DuoDiff d3, t_switch 20 + attention_probe"
    assert composed_family_label({"depth": 3, "t_switch": 20, "classifier_type": "attention_probe", "threshold": 0.2},
                                 "steps") == "DuoDiff d3, t_switch 20 + attention_probe τ 0.2"
    assert composed_family_label({"depth": 1, "t_switch": 2, "classifier_type": "attention_probe", "threshold": 0.5,
                                  "steps": 4}, None) == "DuoDiff d1, t_switch 2 + attention_probe τ 0.5 at 4 steps"


# ---- the phased policy against the networks run by hand ------------------------------------------------


@pytest.fixture(scope="module")
def networks():
    torch.manual_seed(0)
    shallow = build_model("uvit", SHALLOW, T).eval()
    ee = build_model("early_exit", FULL, T, "attention_probe").eval()
    return shallow, ee


def hand_trajectory(shallow, ee, noise, threshold):
    """DuoDiff with early exit written plainly: the shallow network for the first T_SWITCH steps,
    then every exit of the early-exit model and the exit rule (conftest.select_exit). -> (samples,
    the inputs x_t of every step, exits (STEPS, B))."""
    inputs, exits = [], []

    def by_hand(x, t, step_index):
        inputs.append(x.clone())
        if step_index < T_SWITCH:
            exits.append(torch.full((x.shape[0],), shallow.depth))
            return shallow(x, t)
        output, exit_layer = select_exit(*ee(x, t), threshold)
        exits.append(exit_layer)
        return output

    with torch.no_grad():
        samples = GaussianDiffusion(num_timesteps=T).sample(by_hand, noise, "ddim", STEPS)
    return samples, inputs, torch.stack(exits)


def a_threshold_with_mixed_exits(ee, noise):
    """The median uncertainty of the first exit at the late phase's first step: some samples leave
    there, some go on, whatever the random weights."""
    t = torch.full((noise.shape[0],), GaussianDiffusion(num_timesteps=T).timesteps("ddim", STEPS)[T_SWITCH])
    with torch.no_grad():
        return float(ee(noise, t)[1][:, 0].median())


def test_phased_policy_equals_the_two_networks_run_by_hand(networks):
    shallow, ee = networks
    noise = torch.randn(B, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    threshold = a_threshold_with_mixed_exits(ee, noise)
    expected, _, exits = hand_trajectory(shallow, ee, noise, threshold)
    policy = DuoDiffDenoiser(shallow, ee, T_SWITCH, threshold=threshold)
    with torch.no_grad():
        samples = GaussianDiffusion(num_timesteps=T).sample(policy, noise, "ddim", STEPS)
    torch.testing.assert_close(samples, expected, rtol=1e-5, atol=1e-5)
    depth = policy.executed_depth(STEPS, B)
    assert depth.dtype == torch.long and tuple(depth.shape) == (STEPS, B)
    assert torch.equal(depth, exits)
    assert (depth[:T_SWITCH] == 1).all() and len(depth[T_SWITCH:].unique()) > 1  # samples leave at different exits


def test_the_late_phase_sees_its_own_step_count_and_never_runs_at_t_switch_equal_steps(networks):
    shallow, ee = networks
    late = EarlyExitDenoiser(ee, 0.5)
    policy = PhasedPolicy(ModelDenoiser(shallow), late, STEPS)
    with torch.no_grad():
        GaussianDiffusion(num_timesteps=T).sample(policy, torch.randn(B, 1, 8, 8), "ddim", STEPS)
    assert torch.equal(policy.executed_depth(STEPS, B), torch.full((STEPS, B), shallow.depth))


def test_composed_flops_and_layer_ratio_against_a_hand_count(networks):
    """FLOPs counted on every network call each sample really made (batch 1, FlopCounterMode),
    against duodiff flops' count from exit_layers and the look-up table."""
    shallow, ee = networks
    noise = torch.randn(B, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    threshold = a_threshold_with_mixed_exits(ee, noise)
    _, inputs, exits = hand_trajectory(shallow, ee, noise, threshold)
    ts = GaussianDiffusion(num_timesteps=T).timesteps("ddim", STEPS)
    per_image = torch.zeros(B, dtype=torch.float64)
    for step, (x, t) in enumerate(zip(inputs, ts)):
        for i in range(B):
            one, tt = x[i : i + 1], torch.tensor([t])
            if step < T_SWITCH:
                _, cost = flops.count(lambda one=one, tt=tt: shallow(one, tt))
            else:
                (_, exit_layer), cost = flops.count(lambda one=one, tt=tt: ee.forward_early_exit(one, tt, threshold))
                assert int(exit_layer) == int(exits[step, i])
            per_image[i] += cost["total"]
    shallow_costs, ee_costs = flops.piece_costs(shallow), flops.piece_costs(ee)
    per_eval, depth = flops.set_costs("duodiff", exits, shallow_costs, ee_costs, T_SWITCH)
    out = flops.summarize(per_eval, exits, depth)
    assert depth == ee.depth
    assert out["gflops_per_image"] == pytest.approx(float(per_image.mean()) / 1e9, rel=1e-12)
    assert out["gflops_per_forward"] == pytest.approx(float(per_image.mean()) / STEPS / 1e9, rel=1e-12)
    assert out["layer_ratio"] == pytest.approx(float(exits.double().mean()) / ee.depth)
    # An early-exit row in the shallow phase is refused: the shallow network has no exits.
    bad = exits.clone()
    bad[0, 0] = 0
    with pytest.raises(DuodiffError, match="t_switch"):
        flops.set_costs("duodiff", bad, shallow_costs, ee_costs, T_SWITCH)


# ---- duodiff sample / flops with an early-exit late model ------------------------------------------------


@pytest.fixture(scope="module")
def model_files(tmp_path_factory, networks):
    root = tmp_path_factory.mktemp("composed")
    shallow, ee = networks
    files = {"shallow": root / "shallow.pt", "ee": root / "ee.pt", "full": root / "full.pt"}
    for path, kind, model, config, classifier in ((files["shallow"], "uvit", shallow, SHALLOW, None),
                                                  (files["ee"], "early_exit", ee, FULL, "attention_probe"),
                                                  (files["full"], "uvit", ee.backbone, FULL, None)):
        save_model(path, kind=kind, model_config=config, diffusion=DIFFUSION, classifier_type=classifier,
                   state_dict=model.state_dict(), ema_state_dict=None, step=1, train_args={})  # fmt: skip
    return files


def run_composed(files, out, **changes):
    from duodiff.sample.sample_set import run_sample

    args = cli_args("sample", checkpoint_path=files["shallow"], checkpoint_path_late=files["ee"], method="duodiff",
                    t_switch=T_SWITCH, threshold=0.5, output_folder=out, sampler="ddim", steps=STEPS, n_samples=3,
                    batch_size=2, seed=0, progress=False, device="cpu")  # fmt: skip
    return run_sample(**{**args, **changes})


def test_duodiff_sample_with_an_early_exit_late_model_records_and_counts_the_composed_set(model_files, tmp_path):
    stats = run_composed(model_files, tmp_path / "set", steps=4)
    assert (stats["method"], stats["t_switch"], stats["threshold"], stats["steps"]) == ("duodiff", T_SWITCH, 0.5, 4)
    assert stats["classifier_type"] == "attention_probe" and stats["checkpoint_late"] == str(model_files["ee"])
    assert stats["setting"] == "t_switch=2, threshold=0.5, steps=4"
    layers = torch.load(tmp_path / "set" / "exit_layers.pt")
    assert tuple(layers.shape) == (4, 3) and (layers[:T_SWITCH] == 1).all()
    assert stats["layer_ratio"] == pytest.approx(float(layers.double().mean()) / 5)
    result = flops.run_flops(samples=tmp_path / "set", output=tmp_path / "gflops.json")
    lut = flops.exit_lut(flops.model_costs("early_exit", FULL, T, "attention_probe"))
    shallow_cost = flops.network_cost(flops.model_costs("uvit", SHALLOW, T))["total"]
    by_hand = [T_SWITCH * shallow_cost + sum(lut[int(k)]["total"] for k in layers[T_SWITCH:, i]) for i in range(3)]
    assert result["gflops_per_image"] == pytest.approx(sum(by_hand) / 3 / 1e9, rel=1e-12)
    assert result["lut_gflops"] == pytest.approx([entry["total"] / 1e9 for entry in lut])


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"threshold": None}, "is an early_exit model: DuoDiff with early exit in the late phase needs --threshold"),
        ({"checkpoint_path_late": "full"}, "--threshold applies to an early_exit --checkpoint-path-late; "),
        ({"threshold": 1.5}, r"--threshold must be in \[0, 1\]; got 1.5"),
        ({"method": "full", "checkpoint_path_late": None, "t_switch": None},
         "--threshold applies to --method early_exit"),
    ],
)  # fmt: skip
def test_duodiff_late_model_and_threshold_go_together(model_files, tmp_path, changes, message):
    if changes.get("checkpoint_path_late") == "full":
        changes = {**changes, "checkpoint_path_late": model_files["full"]}
    with pytest.raises(DuodiffError, match=message):
        run_composed(model_files, tmp_path / "bad", **changes)
    assert not (tmp_path / "bad" / "stats.json").exists()


def test_composed_families_are_the_config_entries_lines_a_shared_set_in_both():
    import pandas as pd

    from duodiff.report.tables.operating_points import composed_families

    names = ["ee_attention_probe_thr0.1_steps20", "ee_attention_probe_thr0.12_steps20", "ee_attention_probe_thr0.15_steps20",
             "ee_attention_probe_thr0.1_steps16", "ee_attention_probe_thr0.1_steps24",
             "duodiff_d3_ts20_ee_attention_probe_thr0.3", "duodiff_d3_ts20_ee_attention_probe_thr0.2",
             "duodiff_d3_ts15_steps30"]  # fmt: skip
    frame = pd.DataFrame({"set": ["full", *names], "method": ["full"] + ["composed"] * len(names)})
    found = {label: (knob, list(sets["set"])) for label, knob, sets in composed_families(frame)}
    assert found == {
        "attention_probe at 20 steps": ("threshold", names[:3]),
        "attention_probe τ 0.1": ("steps", [names[3], names[0], names[4]]),
        "DuoDiff d3, t_switch 20 + attention_probe": ("threshold", [names[6], names[5]]),
        "DuoDiff d3, t_switch 15 at 30 steps": ("t_switch", [names[7]]),
    }


def test_a_composed_sets_method_names_what_it_combines():
    from duodiff.report.tables.collect import method_label

    def label(name):
        return method_label({"method": "composed", "set": name, "depth": 7})

    assert label("ee_attention_probe_thr0.12_steps20") == "early exit, attention_probe, fewer steps"
    assert label("duodiff_d3_ts20_steps30") == "DuoDiff (3 + 7 blocks), fewer steps"
    assert label("duodiff_d3_ts20_ee_mlp_probe_per_layer_thr0.2") == "DuoDiff (3 + 7 blocks) + early exit, mlp_probe_per_layer"
