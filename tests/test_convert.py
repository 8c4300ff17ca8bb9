"""`duodiff convert`: U-ViT's published checkpoints -> model.pt, and the workflow's convert_full.

The U-ViT state dicts here are built from a table of libs/uvit.py's parameter names and shapes
written out by hand (not from our module), filled with random numbers; the converted model is
compared with libs/uvit.py's forward pass written out in torch.nn.functional on those tensors.
The ᾱ comparison is checked against the schedules computed by hand.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from _defaults import cli_args
from test_workflow import (
    REPO,
    TINY,
    job_counts,
    load,
    make_workdir,
    planned_commands,
    snakemake,
)

from duodiff import cli
from duodiff.core.diffusion import GaussianDiffusion
from duodiff.core.errors import DuodiffError
from duodiff.models import UViTConfig
from duodiff.models.checkpoints import load_model
from duodiff.models.convert import run_convert
from duodiff.train.checks import read_backbone

torch.set_num_threads(1)

UNCONDITIONAL = dict(img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=5, num_heads=4)
CONDITIONAL = dict(UNCONDITIONAL, num_classes=5, mlp_time_embed=True, qkv_bias=True, conv=False, mlp_ratio=2.0)
DEFAULTS = dict(
    num_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", parametrization="predict_noise", dataset=None,
    sde_beta_min=0.1, sde_beta_max=20.0, compare_timesteps=[0, 1, 10, 100, 250, 500, 750, 999], label_dropout=0.0,
    noise_process="discrete", time_input="index", autoencoder=None, scale_factor=0.18215,
)  # fmt: skip


def uvit_shapes(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio=4.0, qkv_bias=False,
                mlp_time_embed=False, num_classes=0, conv=True) -> dict:  # fmt: skip
    """libs/uvit.py's UViT state_dict: name -> shape (its depth is ours - 1: both have depth // 2
    in- and out-blocks)."""
    d, p, c, hidden = embed_dim, patch_size, in_chans, int(embed_dim * mlp_ratio)
    extras = 1 + (num_classes > 0)
    shapes = {
        "pos_embed": (1, extras + (img_size // p) ** 2, d),
        "patch_embed.proj.weight": (d, c, p, p),
        "patch_embed.proj.bias": (d,),
    }
    if mlp_time_embed:  # nn.Sequential(Linear(d, 4d), SiLU(), Linear(4d, d))
        shapes |= {"time_embed.0.weight": (4 * d, d), "time_embed.0.bias": (4 * d,),
                   "time_embed.2.weight": (d, 4 * d), "time_embed.2.bias": (d,)}  # fmt: skip
    if num_classes > 0:
        shapes["label_emb.weight"] = (num_classes, d)

    def block(prefix, skip):
        names = {"norm1.weight": (d,), "norm1.bias": (d,), "attn.qkv.weight": (3 * d, d),
                 "attn.proj.weight": (d, d), "attn.proj.bias": (d,), "norm2.weight": (d,), "norm2.bias": (d,),
                 "mlp.fc1.weight": (hidden, d), "mlp.fc1.bias": (hidden,), "mlp.fc2.weight": (d, hidden),
                 "mlp.fc2.bias": (d,)}  # fmt: skip
        if qkv_bias:
            names["attn.qkv.bias"] = (3 * d,)
        if skip:
            names |= {"skip_linear.weight": (d, 2 * d), "skip_linear.bias": (d,)}
        return {f"{prefix}.{name}": shape for name, shape in names.items()}

    for i in range(depth // 2):
        shapes |= block(f"in_blocks.{i}", skip=False)
    shapes |= block("mid_block", skip=False)
    for i in range(depth // 2):
        shapes |= block(f"out_blocks.{i}", skip=True)
    shapes |= {"norm.weight": (d,), "norm.bias": (d,), "decoder_pred.weight": (p * p * c, d),
               "decoder_pred.bias": (p * p * c,)}  # fmt: skip
    if conv:
        shapes |= {"final_layer.weight": (c, c, 3, 3), "final_layer.bias": (c,)}
    return shapes


def uvit_weights(config: dict, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {name: 0.2 * torch.randn(shape, generator=generator) for name, shape in uvit_shapes(**config).items()}


def uvit_forward(w: dict, config: dict, x, timesteps, y=None):
    """libs/uvit.py's UViT.forward on the weights `w`, in torch.nn.functional."""
    cfg = {**dict(mlp_time_embed=False, num_classes=0, conv=True), **config}
    d, p, c, heads = cfg["embed_dim"], cfg["patch_size"], cfg["in_chans"], cfg["num_heads"]
    h = F.conv2d(x, w["patch_embed.proj.weight"], w["patch_embed.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    freqs = torch.exp(-math.log(10000) * torch.arange(d // 2) / (d // 2))
    time = torch.cat([torch.cos(timesteps[:, None] * freqs), torch.sin(timesteps[:, None] * freqs)], dim=-1)
    if cfg["mlp_time_embed"]:
        time = F.linear(F.silu(F.linear(time, w["time_embed.0.weight"], w["time_embed.0.bias"])),
                        w["time_embed.2.weight"], w["time_embed.2.bias"])  # fmt: skip
    tokens = [time[:, None], h] if y is None else [w["label_emb.weight"][y][:, None], time[:, None], h]
    h = torch.cat(tokens, dim=1) + w["pos_embed"]
    B, L, _ = h.shape

    def block(prefix, h, skip=None):
        if skip is not None:
            h = F.linear(torch.cat([h, skip], dim=-1), w[f"{prefix}.skip_linear.weight"], w[f"{prefix}.skip_linear.bias"])
        a = F.layer_norm(h, (d,), w[f"{prefix}.norm1.weight"], w[f"{prefix}.norm1.bias"])
        qkv = F.linear(a, w[f"{prefix}.attn.qkv.weight"], w.get(f"{prefix}.attn.qkv.bias"))
        q, k, v = qkv.reshape(B, L, 3, heads, d // heads).permute(2, 0, 3, 1, 4)  # 'B L (K H D) -> K B H L D'
        attention = (q @ k.transpose(-2, -1) * (d // heads) ** -0.5).softmax(dim=-1)
        a = (attention @ v).transpose(1, 2).reshape(B, L, d)
        h = h + F.linear(a, w[f"{prefix}.attn.proj.weight"], w[f"{prefix}.attn.proj.bias"])
        m = F.layer_norm(h, (d,), w[f"{prefix}.norm2.weight"], w[f"{prefix}.norm2.bias"])
        m = F.linear(F.gelu(F.linear(m, w[f"{prefix}.mlp.fc1.weight"], w[f"{prefix}.mlp.fc1.bias"])),
                     w[f"{prefix}.mlp.fc2.weight"], w[f"{prefix}.mlp.fc2.bias"])  # fmt: skip
        return h + m

    skips = []
    for i in range(cfg["depth"] // 2):
        h = block(f"in_blocks.{i}", h)
        skips.append(h)
    h = block("mid_block", h)
    for i in range(cfg["depth"] // 2):
        h = block(f"out_blocks.{i}", h, skips.pop())
    h = F.layer_norm(h, (d,), w["norm.weight"], w["norm.bias"])
    h = F.linear(h, w["decoder_pred.weight"], w["decoder_pred.bias"])[:, len(tokens) - 1 :]
    side = cfg["img_size"] // p  # 'B (h w) (p1 p2 C) -> B C (h p1) (w p2)'
    image = h.reshape(B, side, side, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(B, c, side * p, side * p)
    return F.conv2d(image, w["final_layer.weight"], w["final_layer.bias"], padding=1) if cfg["conv"] else image


def model_yaml(tmp_path, config: dict, name="model.yaml", **changes):
    path = tmp_path / name
    path.write_text(yaml.safe_dump({**config, "normalize_timesteps": False, **changes}))
    return path


def convert(checkpoint, config_path, output, **changes):
    return run_convert(checkpoint=checkpoint, config_path=config_path, output=output, **{**DEFAULTS, **changes})


@pytest.mark.parametrize("config", [UNCONDITIONAL, CONDITIONAL], ids=["unconditional", "class-conditional"])
def test_converted_model_gives_the_reference_forward(tmp_path, config):
    weights = uvit_weights(config, seed=0)
    torch.save(weights, tmp_path / "uvit.pth")
    convert(tmp_path / "uvit.pth", model_yaml(tmp_path, config), tmp_path / "out" / "model.pt")
    model, diffusion, meta = load_model(tmp_path / "out" / "model.pt")
    assert meta["kind"] == "uvit" and meta["step"] is None
    assert torch.load(tmp_path / "out" / "model.pt", weights_only=False)["ema_state_dict"] is None  # one copy: the EMA
    assert meta["converted_from"]["weights"] == "plain state dict" and diffusion.num_timesteps == 1000
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 8, 8, generator=generator)
    t = torch.tensor([0, 417, 999])  # U-ViT's t * 999 for t = 0, 417/999, 1
    y = torch.tensor([4, 0, 2]) if config.get("num_classes") else None
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), uvit_forward(weights, config, x, t.float(), y), rtol=1e-4, atol=1e-5)


def test_a_published_null_class_is_recorded_for_guided_sampling(tmp_path):
    """U-ViT's ImageNet 256 checkpoint has num_classes 1001 = 1000 classes + the null class (p_uncond
    0.15): converted with --label-dropout, model.pt records it as training with label dropout does,
    and guided sampling finds the null class (the last label). Here: CIFAR-10's 10 classes + 1."""
    from duodiff.core.guidance import null_label
    from duodiff.sample.sample_set import run_sample

    config = {**CONDITIONAL, "num_classes": 11}
    torch.save(uvit_weights(config, seed=5), tmp_path / "uvit.pth")
    config_path = model_yaml(tmp_path, config)
    convert(tmp_path / "uvit.pth", config_path, tmp_path / "guided.pt", dataset="cifar10", label_dropout=0.15)
    model, _, meta = load_model(tmp_path / "guided.pt")
    assert meta["train_args"] == {"dataset": "cifar10", "label_dropout": 0.15} and null_label(11, meta) == 10
    stats = run_sample(**cli_args("sample", checkpoint_path=tmp_path / "guided.pt", method="full", output_folder=tmp_path / "s",
                                  steps=2, n_samples=2, batch_size=2, progress=False, guidance_scale=0.4))  # fmt: skip
    assert (stats["guidance_scale"], stats["branches"]) == (0.4, 2)
    # Without --label-dropout the extra class token has nobody to mean it: refused, naming the flag.
    with pytest.raises(DuodiffError, match=r"num_classes 11, one more than --dataset cifar10's 10 classes: .*--label-dropout > 0"):
        convert(tmp_path / "uvit.pth", config_path, tmp_path / "plain.pt", dataset="cifar10")
    with pytest.raises(DuodiffError, match=r"--label-dropout 0.15 needs a class-conditional model"):
        convert(tmp_path / "uvit.pth", model_yaml(tmp_path, UNCONDITIONAL, "u.yaml"), tmp_path / "u.pt", label_dropout=0.15)
    assert not (tmp_path / "plain.pt").exists() and not (tmp_path / "u.pt").exists()


def test_the_ema_weights_are_read_from_a_training_dict_and_a_checkpoint_folder(tmp_path):
    ema, raw = uvit_weights(UNCONDITIONAL, seed=2), uvit_weights(UNCONDITIONAL, seed=3)
    config_path = model_yaml(tmp_path, UNCONDITIONAL)
    torch.save({"nnet": raw, "nnet_ema": ema}, tmp_path / "train_state.pth")
    folder = tmp_path / "500000.ckpt"  # U-ViT's TrainState.save: one .pth per attribute
    folder.mkdir()
    for name, value in {"nnet": raw, "nnet_ema": ema, "step": 500000}.items():
        torch.save(value, folder / f"{name}.pth")
    for source, step, where in [(tmp_path / "train_state.pth", None, "'nnet_ema' entry of a dict"),
                                (folder, 500000, "nnet_ema.pth of a checkpoint folder")]:  # fmt: skip
        output = tmp_path / source.stem / "model.pt"
        convert(source, config_path, output)
        _, _, meta = load_model(output)
        assert (meta["step"], meta["converted_from"]["weights"]) == (step, where)
        stored = torch.load(output, weights_only=False)["state_dict"]
        assert stored.keys() == ema.keys() and all(torch.equal(stored[k], ema[k]) for k in ema)


def test_converted_model_is_an_early_exit_backbone(tmp_path):
    weights = uvit_weights(UNCONDITIONAL, seed=4)
    torch.save(weights, tmp_path / "uvit.pth")
    config_path = model_yaml(tmp_path, UNCONDITIONAL)
    convert(tmp_path / "uvit.pth", config_path, tmp_path / "model.pt")
    # What `duodiff train --model early_exit --load-backbone` reads, with the workflow's diffusion.
    config = UViTConfig.from_dict(yaml.safe_load(config_path.read_text()))
    backbone = read_backbone(tmp_path / "model.pt", config, GaussianDiffusion(), config_path)
    assert backbone.keys() == weights.keys() and all(torch.equal(backbone[k], weights[k]) for k in weights)


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda w: w.update({"pos_embed": torch.zeros(1, 16, 32)}), "wrong shapes pos_embed (1, 16, 32) (expected (1, 17, 32))"),
        (lambda w: w.pop("mid_block.mlp.fc2.bias"), "missing mid_block.mlp.fc2.bias (32,)"),
        (lambda w: w.update({"label_emb.weight": torch.zeros(10, 32)}), "unexpected label_emb.weight (10, 32)"),
    ],
    ids=["shape", "missing", "unexpected"],
)  # fmt: skip
def test_weights_that_do_not_fit_are_one_clear_error(tmp_path, change, expected):
    weights = uvit_weights(UNCONDITIONAL, seed=5)
    change(weights)
    torch.save(weights, tmp_path / "uvit.pth")
    config_path = model_yaml(tmp_path, UNCONDITIONAL)
    with pytest.raises(DuodiffError) as error:
        convert(tmp_path / "uvit.pth", config_path, tmp_path / "out" / "model.pt")
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'uvit.pth'}: the weights do not fit the U-ViT of {config_path}")
    assert expected in message
    assert not (tmp_path / "out" / "model.pt").exists()


def test_settings_a_uvit_checkpoint_cannot_honour_are_refused(tmp_path):
    torch.save(uvit_weights(UNCONDITIONAL, seed=6), tmp_path / "uvit.pth")
    config_path = model_yaml(tmp_path, UNCONDITIONAL)
    refused = [
        ({"config_path": model_yaml(tmp_path, UNCONDITIONAL, "n.yaml", normalize_timesteps=True)}, "normalize_timesteps: true"),
        ({"num_timesteps": 100}, "--num-timesteps 100"),
        ({"parametrization": "predict_original"}, "predict the noise"),
        ({"dataset": "digits"}, r"--dataset digits has 1 channel\(s\)"),
    ]  # fmt: skip
    for changes, expected in refused:
        with pytest.raises(DuodiffError, match=expected):
            convert(tmp_path / "uvit.pth", changes.pop("config_path", config_path), tmp_path / "model.pt", **changes)
    (tmp_path / "not_weights.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(DuodiffError, match="not a readable PyTorch file"):
        convert(tmp_path / "not_weights.pth", config_path, tmp_path / "model.pt")
    assert not (tmp_path / "model.pt").exists()


def test_alpha_bar_comparison_against_hand_computed_values(tmp_path):
    torch.save(uvit_weights(UNCONDITIONAL, seed=7), tmp_path / "uvit.pth")
    comparison = convert(tmp_path / "uvit.pth", model_yaml(tmp_path, UNCONDITIONAL), tmp_path / "model.pt",
                         compare_timesteps=[0, 500])  # fmt: skip
    # k = 0: abar_0 = 1 - beta_0 = 0.9999; the VP-SDE at t = 0 has abar 1 (no noise).
    # k = 500: prod_{i<=500} (1 - beta_i), beta_i = 1e-4 + i (0.02 - 1e-4) / 999; the VP-SDE at
    # t = 500/999: exp(-(0.1 t + (20 - 0.1) t^2 / 2)).
    abar_500 = math.prod(1 - (1e-4 + i * (0.02 - 1e-4) / 999) for i in range(501))
    t = 500 / 999
    sde_500 = math.exp(-(0.1 * t + 9.95 * t * t))
    expected = [
        (0.9999, 1.0, (1 - math.sqrt(0.9999)) / math.sqrt(0.9999), 1.0),
        (abar_500, sde_500, abs(math.sqrt(abar_500) - math.sqrt(sde_500)) / math.sqrt(abar_500),
         abs(math.sqrt(1 - abar_500) - math.sqrt(1 - sde_500)) / math.sqrt(1 - abar_500)),
    ]  # fmt: skip
    for row, (ours, theirs, signal, noise) in zip(comparison["timesteps"], expected):
        assert row["alpha_bar"] == pytest.approx(ours, rel=1e-12) and row["alpha_bar_uvit"] == pytest.approx(theirs, rel=1e-12)
        assert row["rel_diff_sqrt_alpha_bar"] == pytest.approx(signal, rel=1e-6)
        assert row["rel_diff_sqrt_one_minus_alpha_bar"] == pytest.approx(noise, rel=1e-6)
    assert comparison["max_rel_diff_sqrt_alpha_bar"] == pytest.approx(max(expected[0][2], expected[1][2]))
    assert comparison["max_rel_diff_sqrt_one_minus_alpha_bar"] == pytest.approx(1.0)
    # Mid-schedule the two agree within a percent (hand numbers: 0.0778 vs 0.0787).
    assert abar_500 == pytest.approx(0.07780, abs=1e-4) and sde_500 == pytest.approx(0.07867, abs=1e-4)
    _, _, meta = load_model(tmp_path / "model.pt")
    assert meta["converted_from"]["time_conditioning"] == comparison


def test_cli_prints_the_comparison_and_refuses_a_bad_file_in_one_line(tmp_path, capsys):
    torch.save(uvit_weights(UNCONDITIONAL, seed=8), tmp_path / "uvit.pth")
    config_path = model_yaml(tmp_path, UNCONDITIONAL)
    args = ["convert", "--checkpoint", str(tmp_path / "uvit.pth"), "--config-path", str(config_path)]
    assert cli.main([*args, "--output", str(tmp_path / "model.pt"), "--compare-timesteps", "0,500"]) == 0
    out = capsys.readouterr().out
    assert "k  500: sqrt(abar) rel. diff 0.00558" in out and "max relative difference: sqrt(abar) 0.00558, sqrt(1-abar) 1" in out
    args[2] = str(tmp_path / "missing.pth")
    assert cli.main([*args, "--output", str(tmp_path / "other.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"duodiff convert: error: {tmp_path / 'missing.pth'}: no such file or folder"


def test_a_dry_run_with_full_checkpoint_converts_instead_of_training(tmp_path):
    workdir = make_workdir(tmp_path / "work")
    tiny = load(TINY)
    model = yaml.safe_load((workdir / tiny["models"]["full"]).read_text())
    shapes = {k: model[k] for k in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio")}
    torch.save(uvit_weights(shapes, seed=9), workdir / "uvit_tiny.pth")
    (workdir / "convert.yaml").write_text(yaml.safe_dump(tiny | {"models": tiny["models"] | {"full_checkpoint": "uvit_tiny.pth"}}))
    result = snakemake(workdir, "--configfile", "convert.yaml", "-n", "-p")
    assert result.returncode == 0, result.stderr
    counts = job_counts(result.stdout)
    assert counts["convert_full"] == 1 and "train_full" not in counts
    assert counts["train_early_exit"] == len(tiny["early_exit"]["classifier_types"]) and counts["sample_full"] == 1
    (command,) = [flags for name, flags in planned_commands(result.stdout) if name == "convert"]
    assert command["--checkpoint"] == "uvit_tiny.pth" and command["--config-path"] == tiny["models"]["full"]
    assert command["--output"] == "results/tiny/models/full/model.pt" and command["--dataset"] == "digits"
    assert (command["--num-timesteps"], command["--parametrization"]) == ("1000", "predict_noise")
    # A model file that normalizes the timesteps cannot hold U-ViT's weights: refused before any job.
    (workdir / "normalized.yaml").write_text(yaml.safe_dump(model | {"normalize_timesteps": True}))
    refused = tiny | {"models": tiny["models"] | {"full": "normalized.yaml", "full_checkpoint": "uvit_tiny.pth"}}
    (workdir / "refused.yaml").write_text(yaml.safe_dump(refused))
    result = snakemake(workdir, "--configfile", "refused.yaml", "-n")
    assert result.returncode != 0 and "normalize_timesteps: true" in result.stdout + result.stderr


def test_imagenet256_plans_convert_full_for_the_latent_checkpoint(tmp_path):
    """config/imagenet256.yaml with models.full_checkpoint: convert_full with the L/2 recipe, the
    autoencoder and its scale, and --dataset imagenet256 (which exited 2 on the channels before)."""
    workdir = make_workdir(tmp_path / "work")
    cfg = load("config/imagenet256.yaml")
    cfg["models"]["full_checkpoint"] = "imagenet256_uvit_large.pth"
    (workdir / "imagenet256_uvit_large.pth").write_bytes(b"")
    (workdir / "ckpt.yaml").write_text(yaml.safe_dump(cfg))
    result = snakemake(workdir, "--configfile", "ckpt.yaml", "-n", "-p")
    assert result.returncode == 0, result.stderr
    counts = job_counts(result.stdout)
    assert counts["convert_full"] == 1 and "train_full" not in counts
    (command,) = [flags for name, flags in planned_commands(result.stdout) if name == "convert"]
    assert (command["--dataset"], command["--noise-process"], command["--time-input"]) == ("imagenet256", "vp_sde", "t_times_999")
    assert (command["--autoencoder"], command["--scale-factor"]) == (cfg["autoencoder"]["path"], "0.18215")
    assert command["--label-dropout"] == "0.15"


# U-ViT's published pixel-space models (its configs/*.py; U-ViT's depth + 1 = our block count).
PUBLISHED = {
    "cifar10_pretrained": dict(img_size=32, patch_size=2, in_chans=3, embed_dim=512, depth=12 + 1, num_heads=8),
    "celeba64_pretrained": dict(img_size=64, patch_size=4, in_chans=3, embed_dim=512, depth=12 + 1, num_heads=8),
    "imagenet64_pretrained": dict(img_size=64, patch_size=4, in_chans=3, embed_dim=768, depth=16 + 1, num_heads=12,
                                  num_classes=1000),
}  # fmt: skip


@pytest.mark.parametrize("name", PUBLISHED)
def test_shipped_pretrained_model_files_fit_the_published_checkpoints(name):
    from duodiff.models import build_model, load_model_config

    config = load_model_config(REPO / "config" / "models" / f"{name}.yaml")
    assert config["normalize_timesteps"] is False
    with torch.device("meta"):  # names and shapes only: no memory for U-ViT-M's weights
        model = build_model("uvit", config)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == uvit_shapes(**PUBLISHED[name])


def test_a_latent_checkpoint_converts_with_its_exact_recipe(tmp_path, capsys):
    """ImageNet 256 L/2's recipe (issue 24): 4 latent channels under --dataset imagenet256, the
    continuous VP-SDE fed t * 999, the autoencoder and scale 0.18215 recorded; no schedule
    comparison, which would mean nothing here."""
    from duodiff.core.latent import check_model_autoencoder
    from duodiff.models import convert as convert_module

    config = dict(UNCONDITIONAL, in_chans=4, num_classes=1001)
    weights = uvit_weights(config, seed=2)
    torch.save(weights, tmp_path / "uvit.pth")
    (tmp_path / "autoencoder_kl.pth").write_bytes(b"stand-in: only its sha256 is recorded")
    recipe = dict(noise_process="vp_sde", time_input="t_times_999", dataset="imagenet256", label_dropout=0.15,
                  autoencoder=str(tmp_path / "autoencoder_kl.pth"), scale_factor=0.18215)  # fmt: skip
    assert convert(tmp_path / "uvit.pth", model_yaml(tmp_path, config), tmp_path / "model.pt", **recipe) is None
    model, diffusion, meta = load_model(tmp_path / "model.pt")
    assert meta["converted_from"]["recipe"] == {"noise_process": "vp_sde", "time_input": "t_times_999",
                                                "beta_schedule": "linear", "scale_factor": 0.18215}  # fmt: skip
    assert meta["converted_from"]["time_conditioning"] is None
    record = {"sha256": meta["train_args"]["latents_fingerprint"]["autoencoder_sha256"], "scale_factor": 0.18215, "path": "a"}
    check_model_autoencoder(meta, record, "model.pt")  # the same autoencoder and scale: accepted
    with pytest.raises(DuodiffError, match="another autoencoder or scale"):
        check_model_autoencoder(meta, {**record, "scale_factor": 0.23010}, "model.pt")
    # the network sees U-ViT's t * 999 at the continuous times the solver visits
    t = torch.tensor([1e-4, 0.37, 1.0], dtype=torch.float64)
    x, y = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 1000, 0])
    with torch.no_grad():
        got = model(x, diffusion.network_time(t), y)
        torch.testing.assert_close(got, uvit_forward(weights, config, x, (t * 999).float(), y), rtol=1e-4, atol=1e-5)
    # the CLI prints the recipe, not a comparison
    args = ["--checkpoint", str(tmp_path / "uvit.pth"), "--config-path", str(tmp_path / "model.yaml"), "--output",
            str(tmp_path / "cli.pt"), "--dataset", "imagenet256", "--noise-process", "vp_sde", "--time-input", "t_times_999",
            "--label-dropout", "0.15", "--autoencoder", str(tmp_path / "autoencoder_kl.pth")]  # fmt: skip
    from duodiff import cli

    assert cli.main(["convert", *args]) in (0, None)
    out = capsys.readouterr().out
    assert "no schedule comparison" in out and "rel. diff" not in out
    assert convert_module.UVIT_TIME_SCALE == 999


@pytest.mark.parametrize(
    "changes, expected",
    [
        (dict(noise_process="vp_sde"), "--noise-process vp_sde with --time-input index: U-ViT's continuous checkpoints "
         "see t * 999; allowed: --time-input t_times_999"),
        (dict(noise_process="vp_sde", time_input="t_times_999", sde_beta_min=0.2), "--sde-beta-min 0.2: U-ViT's VP-SDE "
         "has 0.1; allowed: --sde-beta-min 0.1"),
        (dict(time_input="t_times_999"), "--noise-process discrete with --time-input t_times_999 and --beta-schedule "
         "linear for a pixel checkpoint: U-ViT's pixel checkpoints are continuous"),
        (dict(time_input="index_plus_one", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
         "for a pixel checkpoint"),
        (dict(latent=True), "--time-input index for a latent checkpoint: U-ViT's discrete latent checkpoints (ImageNet "
         "256/512 H) see n = index + 1; allowed: --time-input index_plus_one"),
        (dict(latent=True, time_input="index_plus_one"), "--beta-schedule linear for a latent checkpoint: U-ViT's "
         "discrete latent checkpoints use Stable Diffusion's schedule; allowed: --beta-schedule scaled_linear"),
    ],
)  # fmt: skip
def test_convert_refuses_a_recipe_no_uvit_checkpoint_was_trained_in(tmp_path, changes, expected):
    """`duodiff convert` checks what validation.smk checks, before reading the checkpoint: one
    message naming the bad flag and what is allowed."""
    import re

    changes = dict(changes)
    if changes.pop("latent", False):
        (tmp_path / "ae.pth").write_bytes(b"stand-in")
        changes["autoencoder"] = str(tmp_path / "ae.pth")
    torch.save(uvit_weights(UNCONDITIONAL, seed=11), tmp_path / "uvit.pth")
    with pytest.raises(DuodiffError, match=re.escape(expected)):
        convert(tmp_path / "uvit.pth", model_yaml(tmp_path, UNCONDITIONAL), tmp_path / "model.pt", **changes)
    assert not (tmp_path / "model.pt").exists()


@pytest.mark.parametrize("recipe", [
    dict(noise_process="vp_sde", time_input="t_times_999"),
    dict(time_input="index_plus_one", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, latent=True),
    dict(noise_process="vp_sde", time_input="t_times_999", latent=True),
])  # fmt: skip
def test_convert_accepts_uvits_recipes(tmp_path, recipe):
    recipe = dict(recipe)
    if recipe.pop("latent", False):
        (tmp_path / "ae.pth").write_bytes(b"stand-in: only its sha256 is recorded")
        recipe |= dict(autoencoder=str(tmp_path / "ae.pth"), dataset=None)
    torch.save(uvit_weights(UNCONDITIONAL, seed=12), tmp_path / "uvit.pth")
    convert(tmp_path / "uvit.pth", model_yaml(tmp_path, UNCONDITIONAL), tmp_path / "model.pt", **recipe)
    meta = torch.load(tmp_path / "model.pt", map_location="cpu", weights_only=False)
    assert meta["converted_from"]["recipe"]["time_input"] == recipe["time_input"]
