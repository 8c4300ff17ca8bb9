"""Checkpoints and resumption: an interrupted run (stopped in-process, SIGTERM, SIGKILL) finishes
with weights bit-identical to an uninterrupted one; bad checkpoints and NaN losses are handled."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import TINY_DIGITS, train_kwargs, write_model_yaml

from duodiff.core.diffusion import GaussianDiffusion
from duodiff.core.errors import DuodiffError
from duodiff.train.loop import TrainingStopped, run_train

SETTINGS = dict(
    dataset="digits", n_steps=60, batch_size=8, lr=1e-3, warmup_steps=5, ema_decay=0.9,
    log_every_n_steps=5, save_every_n_steps=10, seed=7, device="cpu",
)  # fmt: skip
DUODIFF = [sys.executable, "-m", "duodiff.cli"]


def cli_flags(config, log_path, **overrides):
    settings = {**SETTINGS, **overrides}
    flags = ["train", "--config-path", str(config), "--log-path", str(log_path)]
    for key, value in settings.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    return flags


def subprocess_env():
    # The same thread count as this process, so float reductions happen in the same order.
    threads = str(torch.get_num_threads())
    return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def losses(path):
    with open(path) as f:
        return [(r["step"], r["loss"], r["lr"]) for r in csv.DictReader(f)]


def assert_identical(model_a, model_b):
    assert model_a["step"] == model_b["step"]
    for field in ("state_dict", "ema_state_dict"):
        assert model_a[field].keys() == model_b[field].keys()
        for key in model_a[field]:
            assert torch.equal(model_a[field][key], model_b[field][key]), (field, key)


@pytest.fixture(scope="session")
def config(tmp_path_factory):
    return write_model_yaml(tmp_path_factory.mktemp("config") / "tiny.yaml")


@pytest.fixture(scope="session")
def reference(config, tmp_path_factory):
    """The uninterrupted run."""
    log_path = tmp_path_factory.mktemp("reference")
    run_train(**train_kwargs(config, log_path, **SETTINGS))
    return load(log_path / "model.pt"), losses(log_path / "loss.csv")


def stop_at_call(monkeypatch, n, action):
    """Do `action(call_number)` inside the n-th training step (through GaussianDiffusion.q_sample)."""
    original = GaussianDiffusion.q_sample
    calls = {"n": 0}

    def q_sample(self, x0, t, noise):
        calls["n"] += 1
        out = original(self, x0, t, noise)
        return action(out) if calls["n"] >= n else out

    monkeypatch.setattr(GaussianDiffusion, "q_sample", q_sample)


def test_stop_and_resume_in_process_is_bit_identical(config, reference, tmp_path, monkeypatch):
    def sigterm(out):
        signal.raise_signal(signal.SIGTERM)  # as Slurm does at the time limit
        return out

    stop_at_call(monkeypatch, 23, sigterm)
    with pytest.raises(TrainingStopped, match=r"SIGTERM after step 23 of 60.*rerun the same command"):
        run_train(**train_kwargs(config, tmp_path, **SETTINGS))
    monkeypatch.undo()
    assert load(tmp_path / "checkpoint.pt")["step"] == 23
    assert not (tmp_path / "model.pt").exists()
    assert losses(tmp_path / "loss.csv") == reference[1][:4]  # rows 5..20 were logged before the stop

    summary = run_train(**train_kwargs(config, tmp_path, **SETTINGS))
    assert summary["resumed_from"] == 23
    assert_identical(load(tmp_path / "model.pt"), reference[0])
    assert losses(tmp_path / "loss.csv") == reference[1]  # the whole log, not just the resumed part
    # Rerunning a finished run changes nothing.
    assert run_train(**train_kwargs(config, tmp_path, **SETTINGS))["step"] == 60
    assert_identical(load(tmp_path / "model.pt"), reference[0])


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_cli_stopped_by_a_signal_exits_128_plus_its_number(config, tmp_path, monkeypatch, capsys, signum, status):
    from duodiff import cli

    def stop(out):
        signal.raise_signal(signum)
        return out

    stop_at_call(monkeypatch, 3, stop)
    assert cli.main(cli_flags(config, tmp_path, n_steps=10)) == status
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert err == (
        f"duodiff train: error: stopped by {signum.name} after step 3 of 10; checkpoint written to "
        f"{tmp_path / 'checkpoint.pt'}; rerun the same command to resume"
    )
    assert load(tmp_path / "checkpoint.pt")["step"] == 3


def test_sigterm_and_sigkill_cli_runs_resume_to_identical_weights(config, reference, tmp_path):
    # Both victims run at once (each start pays the imports); SIGTERM is Slurm's time limit or
    # preemption, SIGKILL a node failure.
    victims = {}
    for signum in (signal.SIGTERM, signal.SIGKILL):
        log_path = tmp_path / signum.name
        process = subprocess.Popen(
            DUODIFF + cli_flags(config, log_path), env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        victims[signum] = (log_path, process)
    # Each is signalled as soon as its first periodic checkpoint (step 10) appears.
    waiting, start = dict(victims), time.monotonic()
    while waiting:
        for signum, (log_path, process) in list(waiting.items()):
            assert process.poll() is None, process.communicate()[1][-3000:]
            if (log_path / "checkpoint.pt").exists():
                process.send_signal(signum)
                del waiting[signum]
        assert time.monotonic() - start < 300, "no checkpoint appeared"
        time.sleep(0.01)
    for signum, (log_path, process) in victims.items():
        _, stderr = process.communicate(timeout=120)
        assert process.returncode != 0
        if signum == signal.SIGTERM:
            # It finished its step, wrote a checkpoint and said so in one line; 128 + 15, as
            # shells and Slurm report a process stopped by SIGTERM.
            assert process.returncode == 143
            assert "stopped by SIGTERM after step" in stderr and "rerun the same command to resume" in stderr
        step = load(log_path / "checkpoint.pt")["step"]
        assert 10 <= step < 60, signum
        assert not (log_path / "model.pt").exists()

        summary = run_train(**train_kwargs(config, log_path, **SETTINGS))  # the same command again
        assert summary["resumed_from"] == step
        assert_identical(load(log_path / "model.pt"), reference[0])
        assert losses(log_path / "loss.csv") == reference[1]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(config, tmp_path, monkeypatch):
    stop_at_call(monkeypatch, 14, lambda out: torch.full_like(out, float("nan")))
    with pytest.raises(DuodiffError) as error:
        run_train(**train_kwargs(config, tmp_path, **{**SETTINGS, "save_every_n_steps": 5}))
    message = str(error.value)
    assert "loss became nan at step 14" in message and "checkpoint.pt (step 10) is kept" in message
    assert load(tmp_path / "checkpoint.pt")["step"] == 10
    assert not (tmp_path / "model.pt").exists()


def test_checkpoint_with_other_settings_is_refused(config, tmp_path):
    run_train(**train_kwargs(config, tmp_path, **{**SETTINGS, "n_steps": 10}))
    with pytest.raises(DuodiffError, match=r"other inputs or settings \(--lr 0.001 -> 0.002\); rerun with --restart"):
        run_train(**train_kwargs(config, tmp_path, **{**SETTINGS, "n_steps": 10, "lr": 2e-3}))
    deeper = write_model_yaml(tmp_path / "deeper.yaml", TINY_DIGITS, depth=5)
    with pytest.raises(DuodiffError, match=r"--model-config.depth 3 -> 5"):
        run_train(**train_kwargs(deeper, tmp_path, **{**SETTINGS, "n_steps": 10}))
    # Reporting settings may change between a run and its resumption.
    run_train(**train_kwargs(config, tmp_path, **{**SETTINGS, "n_steps": 10, "log_every_n_steps": 2}))


def test_truncated_checkpoint_is_refused_naming_the_file(config, tmp_path):
    run_train(**train_kwargs(config, tmp_path, **{**SETTINGS, "n_steps": 5, "save_every_n_steps": 5}))
    checkpoint = tmp_path / "checkpoint.pt"
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) // 2])
    with pytest.raises(DuodiffError) as error:
        run_train(**train_kwargs(config, tmp_path, **{**SETTINGS, "n_steps": 5, "save_every_n_steps": 5}))
    assert str(checkpoint) in str(error.value) and "truncated" in str(error.value)


def test_stop_and_resume_with_label_dropout_is_bit_identical(tmp_path, monkeypatch):
    """The dropped labels are drawn per (seed, step): a resumed run drops the same ones."""
    cond = write_model_yaml(tmp_path / "cond.yaml", num_classes=11)  # digits' 10 classes + the null class
    settings = {**SETTINGS, "n_steps": 30, "label_dropout": 0.3}
    run_train(**train_kwargs(cond, tmp_path / "whole", **settings))

    def sigterm(out):
        signal.raise_signal(signal.SIGTERM)
        return out

    stop_at_call(monkeypatch, 13, sigterm)
    with pytest.raises(TrainingStopped, match="after step 13 of 30"):
        run_train(**train_kwargs(cond, tmp_path / "resumed", **settings))
    monkeypatch.undo()
    # The checkpoint remembers the dropout: resuming with another is refused (with none, the null
    # class is refused first).
    with pytest.raises(DuodiffError, match=r"--label-dropout 0.3 -> 0.1"):
        run_train(**train_kwargs(cond, tmp_path / "resumed", **{**settings, "label_dropout": 0.1}))
    with pytest.raises(DuodiffError, match="one more than --dataset digits's 10 classes"):
        run_train(**train_kwargs(cond, tmp_path / "resumed", **{**settings, "label_dropout": 0.0}))
    assert run_train(**train_kwargs(cond, tmp_path / "resumed", **settings))["resumed_from"] == 13
    assert_identical(load(tmp_path / "resumed" / "model.pt"), load(tmp_path / "whole" / "model.pt"))
    assert losses(tmp_path / "resumed" / "loss.csv") == losses(tmp_path / "whole" / "loss.csv")


def test_a_checkpoint_with_label_dropout_does_not_resume_without_it():
    # Reached when the class count is known only once the data is read (imagefolder).
    from duodiff.train.checks import check_checkpoint

    current = {"files": {}, "settings": {"seed": 1}}
    with pytest.raises(DuodiffError, match=r"c.pt was made from other inputs or settings \(--label-dropout 0.3 -> 0.0\)"):
        check_checkpoint({"settings": {"seed": 1, "label_dropout": 0.3}}, current, "c.pt", False, None)
    assert check_checkpoint({"settings": {"seed": 1}}, current, "c.pt", False, None)  # older checkpoints: no dropout
