"""`duodiff train`: losses against hand computations, optimizer / schedule / EMA settings, the
early-exit options, input validation, the CLI, and DDP against one process."""

import csv
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import TINY_DIGITS, train_kwargs, write_model_yaml

from duodiff import cli
from duodiff.core.errors import DuodiffError
from duodiff.models.early_exit import early_exit_loss
from duodiff.train.determinism import StepBatchSampler
from duodiff.train.loop import run_train
from duodiff.train.optim import ema_update, warmup_cosine


@pytest.fixture
def config(tiny_yaml):
    return tiny_yaml


def quick(config, log_path, **kwargs):
    """A short digits run with settings that learn fast at this size."""
    settings = dict(
        dataset="digits", n_steps=10, batch_size=16, lr=1e-3, warmup_steps=2, ema_decay=0.99,
        log_every_n_steps=5, save_every_n_steps=5, device="cpu", seed=3,
    )  # fmt: skip
    return run_train(**{**train_kwargs(config, log_path, **settings), **kwargs})


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


# ---- losses ---------------------------------------------------------------------------------------


def test_early_exit_loss_matches_a_hand_computation():
    target = [[0.0, 1.0], [2.0, -1.0]]  # two samples of one 1x2 image
    g = [
        [[0.5, 1.0], [2.0, 0.0]],  # exit 0
        [[0.0, 0.0], [1.0, -1.0]],  # exit 1
        [[0.1, 0.9], [2.0, -1.2]],  # final output (exit depth = 2)
    ]
    u = [[0.3, 0.1], [0.6, 0.2]]  # (B, depth)

    def hand(use_unweighted):
        simple = sum((g[2][b][p] - target[b][p]) ** 2 for b in range(2) for p in range(2)) / 4
        loss_u = loss_ual = unweighted = 0.0
        for i in range(2):
            for b in range(2):
                diffs = [g[i][b][p] - target[b][p] for p in range(2)]
                mse = sum(d * d for d in diffs) / 2
                u_hat = sum(math.tanh(abs(d)) for d in diffs) / 2
                loss_u += (u[b][i] - u_hat) ** 2 / 2
                loss_ual += (1 - u_hat) * mse / 2
                unweighted += mse / 2
        total = simple + loss_u + loss_ual + (unweighted if use_unweighted else 0.0)
        return total, simple, loss_u, loss_ual, unweighted

    outputs = [torch.tensor(x).view(2, 1, 1, 2) for x in g]
    for use_unweighted in (False, True):
        total, parts = early_exit_loss(outputs, torch.tensor(u), torch.tensor(target).view(2, 1, 1, 2), use_unweighted)
        expected = hand(use_unweighted)
        assert total.item() == pytest.approx(expected[0], rel=1e-6)
        got = [parts[k].item() for k in ("loss_simple", "loss_u", "loss_ual", "loss_unweighted")]
        assert got == pytest.approx(list(expected[1:]), rel=1e-6)


def test_early_exit_uncertainty_target_is_detached():
    torch.manual_seed(0)
    outputs = [torch.randn(4, 1, 2, 2, requires_grad=True) for _ in range(3)]
    u = torch.rand(4, 2, requires_grad=True)
    _, parts = early_exit_loss(outputs, u, torch.randn(4, 1, 2, 2))
    parts["loss_u"].backward()
    # L_u trains the probes only: û is a fixed target, so no gradient reaches the exit outputs.
    assert all(o.grad is None for o in outputs)
    assert u.grad is not None and u.grad.abs().sum() > 0


def test_loss_decreases_on_digits(config, tmp_path):
    quick(config, tmp_path / "run", n_steps=80, batch_size=32, lr=2e-3, warmup_steps=5, log_every_n_steps=20, save_every_n_steps=80)
    rows = read_csv(tmp_path / "run" / "loss.csv")
    assert [int(r["step"]) for r in rows] == [20, 40, 60, 80]
    first, last = float(rows[0]["loss"]), float(rows[-1]["loss"])
    # Predicting zero noise scores 1.0 (the noise variance); the model must do clearly better.
    assert last < 0.85 * first and last < 0.8, (first, last)


def test_training_draws_every_timestep_from_0_to_T_minus_1_uniformly(config, tmp_path, monkeypatch):
    # The timesteps the network is trained at, recorded where the training loop calls it.
    from duodiff.models.uvit import UViT

    seen, forward = [], UViT.forward

    def recording(self, x, t, y=None):
        seen.append(t.detach().clone())
        return forward(self, x, t, y)

    monkeypatch.setattr(UViT, "forward", recording)
    T, n_steps, batch_size = 4, 25, 16
    quick(config, tmp_path / "run", num_timesteps=T, n_steps=n_steps, batch_size=batch_size)
    t = torch.cat(seen)
    assert len(t) == n_steps * batch_size and t.dtype == torch.long
    assert int(t.min()) == 0 and int(t.max()) == T - 1  # t = 0 and t = T - 1 are both trained
    # Uniform on {0, ..., T - 1}: 100 expected draws each of 400 (binomial sd 8.7; the run is seeded).
    counts = torch.bincount(t, minlength=T).tolist()
    assert len(counts) == T and all(60 <= c <= 140 for c in counts), counts


# ---- optimizer, schedule, EMA ---------------------------------------------------------------------


def test_warmup_cosine_closed_form():
    f = warmup_cosine(warmup_steps=10, n_steps=110)
    assert f(0) == 0.0 and f(5) == 0.5 and f(10) == 1.0
    assert f(60) == pytest.approx(0.5)  # half-way through the decay
    assert f(35) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert f(110) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(0, 10)(0) == 1.0


def test_adamw_settings_and_lr_schedule_in_a_run(config, tmp_path):
    quick(config, tmp_path / "run", n_steps=12, warmup_steps=4, lr=2e-4, log_every_n_steps=1, save_every_n_steps=12)
    state = load(tmp_path / "run" / "checkpoint.pt")
    group = state["optimizer"]["param_groups"][0]
    # U-ViT's AdamW settings (the defaults).
    assert group["betas"] == (0.99, 0.999) and group["weight_decay"] == 0.03 and group["initial_lr"] == 2e-4
    assert group["lr"] == pytest.approx(0.0, abs=1e-12)  # decayed to 0 after the last step
    rows = read_csv(tmp_path / "run" / "loss.csv")
    # Row for step s (1-based) shows the lr of optimizer step s - 1: warm-up s/4, then cosine over 8 steps.
    expected = [2e-4 * (s / 4 if s < 4 else 0.5 * (1 + math.cos(math.pi * (s - 4) / 8))) for s in range(12)]
    assert [float(r["lr"]) for r in rows] == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_ema_update_closed_form():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in a.parameters()]
    ema_update(a, b, 0.9)
    for p_ema, p0, p in zip(a.parameters(), before, b.parameters()):
        assert torch.allclose(p_ema, 0.9 * p0 + 0.1 * p, atol=1e-7, rtol=0)


def test_ema_after_one_training_step_is_the_closed_form(config, tmp_path):
    from duodiff.models import build_model

    # warmup 0: the first step already uses the full lr, so the weights move.
    quick(config, tmp_path / "run", n_steps=1, warmup_steps=0, ema_decay=0.75)
    one = load(tmp_path / "run" / "model.pt")
    torch.manual_seed(3)  # the run's seed gives the run's initial weights w0
    initial = build_model("uvit", yaml.safe_load(config.read_text())).state_dict()
    changed = 0
    for key, w0 in initial.items():
        w1 = one["state_dict"][key]
        assert torch.allclose(one["ema_state_dict"][key], 0.75 * w0 + 0.25 * w1, atol=1e-6, rtol=0), key
        changed += not torch.equal(w0, w1)
    assert changed > 0 and one["step"] == 1


def test_batches_cover_each_epoch_once_and_ranks_split_the_global_batch():
    full = StepBatchSampler(n_items=10, batch_size=4, seed=1, start_step=0, n_steps=5)
    stream = [i for batch in full for i in batch]  # 20 positions = 2 epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]  # a fresh permutation each epoch
    halves = [list(StepBatchSampler(10, 4, 1, 0, 5, rank=r, world_size=2)) for r in (0, 1)]
    assert [a + b for a, b in zip(*halves)] == list(full)
    resumed = list(StepBatchSampler(10, 4, 1, start_step=3, n_steps=5))
    assert resumed == list(full)[3:]
    # A batch larger than the dataset spans several epochs, each a permutation.
    big = list(StepBatchSampler(n_items=3, batch_size=7, seed=2, start_step=0, n_steps=3))
    stream = [i for batch in big for i in batch]
    assert all(sorted(stream[k : k + 3]) == [0, 1, 2] for k in range(0, 21, 3))


# ---- early exit -----------------------------------------------------------------------------------


def test_frozen_backbone_is_unchanged_and_heads_train(config, tmp_path):
    quick(config, tmp_path / "full", n_steps=4)
    backbone = load(tmp_path / "full" / "model.pt")
    quick(
        config, tmp_path / "ee", model="deediff_uvit", classifier_type="mlp_probe_per_layer",
        load_backbone=tmp_path / "full" / "model.pt", freeze_backbone=True, n_steps=6,
    )  # fmt: skip
    ee = load(tmp_path / "ee" / "model.pt")
    assert ee["kind"] == "early_exit" and ee["classifier_type"] == "mlp_probe_per_layer"
    for key, value in backbone["ema_state_dict"].items():  # the EMA weights are what is loaded
        assert torch.equal(ee["state_dict"]["backbone." + key], value), key
        assert torch.equal(ee["ema_state_dict"]["backbone." + key], value), key
    torch.manual_seed(3)
    from duodiff.models import build_model

    fresh = build_model("early_exit", TINY_DIGITS, classifier_type="mlp_probe_per_layer").state_dict()
    heads = [k for k in fresh if k.startswith(("exit_heads.", "probes."))]
    assert heads and any(not torch.equal(fresh[k], ee["state_dict"][k]) for k in heads)
    rows = read_csv(tmp_path / "ee" / "loss.csv")
    assert {"loss_simple", "loss_u", "loss_ual", "loss_unweighted"} <= set(rows[0])


def test_unfrozen_early_exit_from_scratch_trains_everything(config, tmp_path):
    quick(config, tmp_path / "ee", model="early_exit", classifier_type="attention_probe", n_steps=3, ema_decay=0)
    ee = load(tmp_path / "ee" / "model.pt")
    assert ee["ema_state_dict"] is None
    torch.manual_seed(3)
    from duodiff.models import build_model

    fresh = build_model("early_exit", TINY_DIGITS, classifier_type="attention_probe").state_dict()
    assert not torch.equal(fresh["backbone.patch_embed.proj.weight"], ee["state_dict"]["backbone.patch_embed.proj.weight"])


def test_load_backbone_config_mismatch_is_refused(config, tmp_path):
    quick(config, tmp_path / "full", n_steps=1)
    other = write_model_yaml(tmp_path / "deeper.yaml", depth=5)
    with pytest.raises(DuodiffError, match=r"depth 3 vs 5"):
        quick(other, tmp_path / "ee", model="early_exit", classifier_type="attention_probe", load_backbone=tmp_path / "full" / "model.pt")
    with pytest.raises(DuodiffError, match=r"--parametrization 'predict_noise' vs 'predict_original'"):
        quick(
            config, tmp_path / "ee", model="early_exit", classifier_type="attention_probe",
            load_backbone=tmp_path / "full" / "model.pt", parametrization="predict_original",
        )  # fmt: skip
    assert not (tmp_path / "ee").exists()


# ---- validation and the CLI -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"n_steps": 0}, "--n-steps"),
        ({"batch_size": -4}, "--batch-size"),
        ({"lr": 0.0}, "--lr"),
        ({"ema_decay": 1.0}, "--ema-decay"),
        ({"beta2": 1.5}, "--beta2"),
        ({"model": "resnet"}, "--model"),
        ({"dataset": "mnist"}, "--dataset"),
        ({"device": "tpu"}, "--device"),
        ({"image_size": 16}, "--image-size 16"),
        ({"dataset": "cifar10"}, "in_chans"),
        ({"model": "early_exit"}, "--classifier-type"),
        ({"model": "early_exit", "classifier_type": "linear"}, "--classifier-type"),
        ({"model": "early_exit", "classifier_type": "attention_probe", "freeze_backbone": True}, "--load-backbone"),
        ({"model": "early_exit", "classifier_type": "attention_probe", "load_backbone": "missing.pt"}, "missing.pt"),
        ({"classifier_type": "attention_probe"}, "early_exit only"),
        ({"parametrization": "predict_velocity"}, "parametrization"),
        ({"config_path": "nowhere.yaml"}, "nowhere.yaml"),
    ],
)
def test_bad_input_is_refused_before_any_work(config, tmp_path, overrides, words):
    with pytest.raises(DuodiffError) as error:
        quick(config, tmp_path / "run", **overrides)
    assert words in str(error.value)
    assert not (tmp_path / "run").exists()


def test_cli_bad_flags_exit_2_with_one_line(config, tmp_path, capsys):
    base = ["train", "--config-path", str(config), "--log-path", str(tmp_path / "run")]
    assert cli.main(base + ["--n_steps", "0"]) == 2  # the seed's spelling is accepted
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("duodiff train: error:") and "--n-steps" in err
    with pytest.raises(SystemExit) as exit_:
        cli.main(base + ["--n-steps", "many"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "many" in err
    assert not (tmp_path / "run").exists()


# Two ways to get two ranks: torchrun around `duodiff train` (what users of the seeds type), and
# `duodiff train --nproc-per-node 2` (what the pipeline's training rules run with resources.gpu 2).
LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 "-m", "duodiff.cli", "train"],
    "nproc_flag": [sys.executable, "-m", "duodiff.cli", "train", "--nproc-per-node", "2"],
}  # fmt: skip


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_ddp_two_processes_match_one_process(config, tmp_path, launcher):
    settings = ["--n-steps", "6", "--batch-size", "8", "--lr", "1e-3", "--warmup-steps", "2", "--ema-decay", "0.9",
                "--save-every-n-steps", "6", "--log-every-n-steps", "3", "--seed", "5", "--device", "cpu"]  # fmt: skip
    command = LAUNCHERS[launcher] + ["--config-path", str(config), "--log-path", str(tmp_path / "ddp")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command + settings, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    quick(config, tmp_path / "one", n_steps=6, batch_size=8, lr=1e-3, warmup_steps=2, ema_decay=0.9,
          save_every_n_steps=6, log_every_n_steps=3, seed=5)  # fmt: skip
    ddp, one = load(tmp_path / "ddp" / "model.pt"), load(tmp_path / "one" / "model.pt")
    assert ddp["train_args"]["world_size"] == 2 and one["train_args"]["world_size"] == 1
    for key in one["state_dict"]:
        assert torch.allclose(ddp["state_dict"][key], one["state_dict"][key], atol=1e-5, rtol=1e-4), key
        assert torch.allclose(ddp["ema_state_dict"][key], one["ema_state_dict"][key], atol=1e-5, rtol=1e-4), key
    losses = [float(r["loss"]) for r in read_csv(tmp_path / "ddp" / "loss.csv")]
    assert losses == pytest.approx([float(r["loss"]) for r in read_csv(tmp_path / "one" / "loss.csv")], rel=1e-4)


def test_nproc_flag_checks_before_launching(config, tmp_path, capsys):
    base = ["train", "--config-path", str(config), "--log-path", str(tmp_path / "run"), "--device", "cpu"]
    # Refused in this process, before torchrun would start two ranks that each fail.
    assert cli.main(base + ["--nproc-per-node", "2", "--batch-size", "7"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--batch-size 7 must be divisible by the number of processes (2)" in err
    assert cli.main(base + ["--nproc-per-node", "-1"]) == 2
    assert "--nproc-per-node must be a non-negative integer; got -1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_nproc_flag_must_agree_with_torchrun(config, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # already a torchrun rank
    base = ["train", "--config-path", str(config), "--log-path", str(tmp_path / "run"), "--device", "cpu"]
    assert cli.main(base + ["--nproc-per-node", "4"]) == 2
    assert "--nproc-per-node 4 contradicts the 2 processes torchrun started" in capsys.readouterr().err


def test_uneven_split_across_ranks_is_refused(config, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun --nproc_per_node 2 sets it; checked before joining
    with pytest.raises(DuodiffError, match=r"--batch-size 7 must be divisible by the number of processes \(2\)"):
        quick(config, tmp_path / "run", batch_size=7)


def test_loader_workers_do_not_change_the_result(config, tmp_path):
    quick(config, tmp_path / "w0", n_steps=4, num_workers=0)
    quick(config, tmp_path / "w2", n_steps=4, num_workers=2)
    a, b = load(tmp_path / "w0" / "model.pt"), load(tmp_path / "w2" / "model.pt")
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def test_class_conditional_rgb_imagefolder_with_flips_and_amp(tmp_path):
    from PIL import Image

    for label in ("cats", "dogs"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(3):
            pixels = torch.randint(0, 256, (8, 8, 3), generator=torch.Generator().manual_seed(i), dtype=torch.uint8)
            Image.fromarray(pixels.numpy()).save(tmp_path / "images" / label / f"{i}.png")
    rgb = write_model_yaml(tmp_path / "rgb.yaml", in_chans=3, num_classes=2)
    # Six images: a batch of 4 (at most the dataset's size).
    quick(rgb, tmp_path / "run", dataset="imagefolder", data_root=tmp_path / "images", n_steps=3, use_amp=True, batch_size=4)
    saved = load(tmp_path / "run" / "model.pt")
    assert saved["model_config"]["num_classes"] == 2 and saved["train_args"]["use_amp"] is True
    assert "label_emb.weight" in saved["state_dict"]
    assert all(float(r["loss"]) > 0 for r in read_csv(tmp_path / "run" / "loss.csv"))
    wrong = write_model_yaml(tmp_path / "wrong.yaml", in_chans=3, num_classes=5)
    with pytest.raises(DuodiffError, match="num_classes 5 but --dataset imagefolder has 2 class labels"):
        quick(wrong, tmp_path / "wrong", dataset="imagefolder", data_root=tmp_path / "images")


# ---- label dropout (classifier-free guidance) ------------------------------------------------------


def test_label_dropout_replaces_labels_by_the_null_class_at_its_rate(tmp_path, monkeypatch):
    """Digits' labels 0..9 and the null class 10: the labels the network sees are the batch's own,
    except those the step's Bernoulli(p) draws drop, which become 10; about p of them in all."""
    from duodiff.models.uvit import UViT
    from duodiff.train import loop
    from duodiff.train.determinism import derive_seed

    seen = []  # (labels the loader gave, labels the network got), per step
    drop, forward = loop.drop_labels, UViT.forward
    monkeypatch.setattr(loop, "drop_labels", lambda y, *a: seen.append([y.clone()]) or drop(y, *a))
    monkeypatch.setattr(UViT, "forward", lambda self, x, t, y=None: seen[-1].append(y.clone()) or forward(self, x, t, y))
    p, steps, batch, seed = 0.25, 12, 32, 5
    cond = write_model_yaml(tmp_path / "cond.yaml", num_classes=11)
    quick(cond, tmp_path / "run", n_steps=steps, batch_size=batch, seed=seed, label_dropout=p)
    assert len(seen) == steps
    dropped_total = 0
    for step, (given, got) in enumerate(seen):
        assert given.max() <= 9  # the null class is never a dataset label
        # The step's own draws, by hand from the generator determinism.py documents: (seed, step).
        g = torch.Generator().manual_seed(derive_seed(seed, "label_dropout", step))
        dropped = torch.rand(batch, generator=g) < p
        assert torch.equal(got, torch.where(dropped, 10, given)), step
        dropped_total += int(dropped.sum())
    n = steps * batch  # 384 labels: Binomial(384, 0.25) has mean 96 and sd 8.5
    assert abs(dropped_total - n * p) < 4 * math.sqrt(n * p * (1 - p))
    saved = load(tmp_path / "run" / "model.pt")
    assert saved["train_args"]["label_dropout"] == p and saved["model_config"]["num_classes"] == 11


def test_label_dropout_leaves_the_other_draws_alone(tmp_path, monkeypatch):
    """--label-dropout 0 is the run without it, bit for bit; p > 0 draws from a stream of its own,
    so the batches, timesteps and noise stay those of the run without dropout."""
    from duodiff.train import loop

    draws, step_draws = [], loop.step_draws
    monkeypatch.setattr(loop, "step_draws", lambda *a: draws.append(step_draws(*a)) or draws[-1])
    cond = write_model_yaml(tmp_path / "cond.yaml", num_classes=10)
    quick(cond, tmp_path / "a", n_steps=3)
    quick(cond, tmp_path / "b", n_steps=3, label_dropout=0.0)
    a, b = load(tmp_path / "a" / "model.pt"), load(tmp_path / "b" / "model.pt")
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    quick(write_model_yaml(tmp_path / "null.yaml", num_classes=11), tmp_path / "c", n_steps=3, label_dropout=0.5)
    for without, with_dropout in zip(draws[:3], draws[6:]):
        assert all(torch.equal(u, v) for u, v in zip(without[:2], with_dropout[:2]))  # timesteps, noise


@pytest.mark.parametrize(
    "num_classes, label_dropout, message",
    [
        (0, 0.1, "--label-dropout 0.1 needs a class-conditional model (a null class to drop labels to); {cfg} has num_classes 0"),
        (10, 0.1, "{cfg} has num_classes 10, but --label-dropout 0.1 needs --dataset digits's 10 classes + the null class: num_classes 11"),
        (11, 0.0, "{cfg} has num_classes 11, one more than --dataset digits's 10 classes: a null class for guidance is trained with --label-dropout > 0"),
        (10, 1.0, "--label-dropout must be a number in [0, 1); got 1.0"),
        (10, -0.1, "--label-dropout must be a number in [0, 1); got -0.1"),
    ],
)
def test_label_dropout_needs_the_null_class(tmp_path, num_classes, label_dropout, message):
    cfg = write_model_yaml(tmp_path / "m.yaml", num_classes=num_classes)
    with pytest.raises(DuodiffError) as error:
        quick(cfg, tmp_path / "run", label_dropout=label_dropout)
    assert str(error.value).startswith(message.format(cfg=cfg))
    assert not (tmp_path / "run").exists()


def test_label_dropout_checks_an_imagefolders_classes_once_read(tmp_path):
    from PIL import Image

    for label in ("cats", "dogs"):
        (tmp_path / "images" / label).mkdir(parents=True)
        Image.fromarray(torch.zeros(8, 8, 3, dtype=torch.uint8).numpy()).save(tmp_path / "images" / label / "0.png")
    folder = dict(dataset="imagefolder", data_root=tmp_path / "images", n_steps=2, batch_size=2)
    quick(write_model_yaml(tmp_path / "ok.yaml", in_chans=3, num_classes=3), tmp_path / "ok", label_dropout=0.2, **folder)
    two = write_model_yaml(tmp_path / "two.yaml", in_chans=3, num_classes=2)
    with pytest.raises(DuodiffError, match=r"num_classes 2, but --label-dropout 0.2 needs --dataset imagefolder's 2 classes \+ the null class: num_classes 3"):
        quick(two, tmp_path / "two", label_dropout=0.2, **folder)


def test_early_exit_heads_on_a_guided_backbone_see_dropped_labels(tmp_path, monkeypatch):
    """The exits serve the unconditional branch too: on a backbone with a null class the early-exit
    run drops labels like the backbone's (without dropout its num_classes does not fit digits)."""
    cond = write_model_yaml(tmp_path / "cond.yaml", num_classes=11)
    quick(cond, tmp_path / "full", n_steps=2, label_dropout=0.2)
    early_exit = dict(model="early_exit", classifier_type="mlp_probe_per_layer", load_backbone=tmp_path / "full" / "model.pt",
                      freeze_backbone=True, n_steps=4)  # fmt: skip
    with pytest.raises(DuodiffError, match="one more than --dataset digits's 10 classes"):
        quick(cond, tmp_path / "ee0", **early_exit)
    quick(cond, tmp_path / "ee", label_dropout=0.2, **early_exit)
    assert load(tmp_path / "ee" / "model.pt")["train_args"]["label_dropout"] == 0.2
