"""The latent path's autoencoder side: loading diffusers' AutoencoderKL from a folder or an
LDM-format file (U-ViT's autoencoder_kl.pth), and `duodiff encode` (whole, flipped views, resumable).
A tiny randomly initialised AutoencoderKL stands in for Stable Diffusion's KL-f8."""

import json
import re

import numpy as np
import pytest
import torch
from conftest import TINY_AUTOENCODER
from PIL import Image

from duodiff.core import latent
from duodiff.core.data import load_dataset
from duodiff.core.errors import DuodiffError

TINY = TINY_AUTOENCODER


def tiny_vae(channels=1, seed=0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**{**TINY, "in_channels": channels, "out_channels": channels}).eval()


def to_ldm_names(state: dict, up_blocks: int) -> dict:
    """diffusers' AutoencoderKL keys -> LDM's (U-ViT's libs/autoencoder.py), written from LDM's
    module names; attention projections become LDM's 1x1 convolutions."""
    out = {}
    for key, value in state.items():
        new = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        new = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", new)
        up = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.", new)
        if up:
            part = "block." if up[2] == "resnets" else "upsample."
            new = f"decoder.up.{up_blocks - 1 - int(up[1])}.{part}" + new[up.end() :]
        if "mid_block.attentions.0." in new:
            new = new.replace("mid_block.attentions.0.", "mid.attn_1.")
            for a, b in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
                new = new.replace(f".{a}.", f".{b}.")
            if value.ndim == 2:
                value = value[:, :, None, None]
        out[new] = value
    return out


def test_ldm_checkpoint_loads_into_the_same_weights(tmp_path):
    vae = tiny_vae()
    ldm = {"first_stage_model." + k: v for k, v in to_ldm_names(vae.state_dict(), up_blocks=2).items()}
    ldm["loss.discriminator.main.0.weight"] = torch.zeros(3)  # LDM files carry the training loss
    torch.save({"state_dict": ldm}, tmp_path / "autoencoder_kl.pth")
    (tmp_path / "tiny.json").write_text(json.dumps(TINY))

    loaded = latent.load_autoencoder(tmp_path / "autoencoder_kl.pth", tmp_path / "tiny.json")
    want = vae.state_dict()
    got = loaded.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)


def test_folder_and_bad_files(tmp_path):
    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "ae")
    loaded = latent.load_autoencoder(tmp_path / "ae")
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    torch.testing.assert_close(loaded.encode(x).latent_dist.mean, vae.encode(x).latent_dist.mean)

    (tmp_path / "tiny.json").write_text(json.dumps({**TINY, "block_out_channels": [8, 8]}))
    torch.save(vae.state_dict(), tmp_path / "diffusers_names.pt")
    with pytest.raises(DuodiffError, match="does not fit --autoencoder-config"):
        latent.load_autoencoder(tmp_path / "diffusers_names.pt", tmp_path / "tiny.json")
    with pytest.raises(DuodiffError, match="needs|must name its architecture"):
        latent.load_autoencoder(tmp_path / "diffusers_names.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(DuodiffError, match="not a PyTorch checkpoint"):
        latent.load_autoencoder(tmp_path / "junk.pt", tmp_path / "tiny.json")


def test_codec_scales_and_unscales():
    vae = tiny_vae()
    codec = latent.LatentCodec(vae, scale_factor=0.25)
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
        z = codec.encode(x)
        torch.testing.assert_close(z, 0.25 * mean)
        torch.testing.assert_close(codec.decode(z), vae.decode(mean).sample.clamp(-1, 1))
    assert z.shape == (3, 4, 4, 4) and codec.downsampling == 2 and codec.latent_channels == 4


def encode_args(tmp_path, **changes):
    return {
        "dataset": "digits", "data_root": None, "download": False, "image_size": None,
        "autoencoder": tmp_path / "ae", "autoencoder_config": None, "scale_factor": 0.5,
        "output": tmp_path / "latents.npz", "batch_size": 100, "chunk_size": 500, "device": "cpu",
        "progress": False, **changes,
    }  # fmt: skip


def test_encode_digits_whole_and_resumable(tmp_path, monkeypatch):
    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "ae")
    images = torch.stack([image for image, _ in load_dataset("digits")])
    with torch.no_grad():
        want = 0.5 * vae.encode(images).latent_dist.mean

    # A run killed after two of its four chunks keeps them; the rerun encodes only the other two.
    real_encode_chunk = latent._encode_chunk
    calls = []

    def dies_after_two(*args):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(args[2])
        return real_encode_chunk(*args)

    monkeypatch.setattr(latent, "_encode_chunk", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        latent.run_encode(**encode_args(tmp_path))
    assert not (tmp_path / "latents.npz").exists()
    assert len(list((tmp_path / "latents.npz.chunks").glob("*.npz"))) == 2

    calls.clear()
    monkeypatch.setattr(latent, "_encode_chunk", lambda *args: calls.append(args[2]) or real_encode_chunk(*args))
    latent.run_encode(**encode_args(tmp_path))
    assert [r.start for r in calls] == [1000, 1500]
    z, labels = latent.load_latents(tmp_path / "latents.npz")
    torch.testing.assert_close(z, want, atol=1e-5, rtol=1e-5)
    assert labels.tolist() == [int(y) for _, y in load_dataset("digits")]
    assert not (tmp_path / "latents.npz.chunks").exists()


def test_chunks_of_another_fingerprint_are_not_reused(tmp_path, monkeypatch):
    tiny_vae().save_pretrained(tmp_path / "ae")
    monkeypatch.setattr(latent, "_encode_chunk", _raise_after_first(latent._encode_chunk))
    with pytest.raises(KeyboardInterrupt):
        latent.run_encode(**encode_args(tmp_path))
    monkeypatch.undo()
    with pytest.raises(DuodiffError, match=r"latents\.npz\.chunks .*--scale-factor 0\.5 -> 1\.0.*--restart"):
        latent.run_encode(**encode_args(tmp_path, scale_factor=1.0))  # another scale: refused...
    latent.run_encode(**encode_args(tmp_path, scale_factor=1.0, restart=True))  # ...or with --restart started over
    z1, _ = latent.load_latents(tmp_path / "latents.npz")
    latent.run_encode(**encode_args(tmp_path, output=tmp_path / "clean.npz", scale_factor=1.0))
    z2, _ = latent.load_latents(tmp_path / "clean.npz")
    torch.testing.assert_close(z1, z2, rtol=0, atol=0)


def _raise_after_first(function):
    state = {"n": 0}

    def wrapper(*args):
        if state["n"]:
            raise KeyboardInterrupt
        state["n"] += 1
        return function(*args)

    return wrapper


def test_flipped_views_follow_the_images(tmp_path):
    """A dataset flipped in training (any ImageFolder) gets its mirror images' latents after the
    images', as U-ViT's feature extraction stores them."""
    vae = tiny_vae(channels=3)
    vae.save_pretrained(tmp_path / "ae")
    rng = np.random.default_rng(0)
    for i in range(3):
        (tmp_path / "data" / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "data" / f"class{i % 2}" / f"{i}.png")
    args = encode_args(tmp_path, dataset="imagefolder", data_root=tmp_path / "data", image_size=8, chunk_size=2)
    latent.run_encode(**args)
    z, labels = latent.load_latents(tmp_path / "latents.npz")
    data = load_dataset("imagefolder", root=tmp_path / "data", image_size=8)
    images = torch.stack([image for image, _ in data])
    with torch.no_grad():
        want = torch.cat([vae.encode(images).latent_dist.mean, vae.encode(images.flip(-1)).latent_dist.mean]) * 0.5
    torch.testing.assert_close(z, want, atol=1e-5, rtol=1e-5)
    assert labels.tolist() == [y for _, y in data] * 2
    fingerprint = json.loads(str(np.load(tmp_path / "latents.npz")["fingerprint"]))
    assert fingerprint["views"] == ["image", "flipped"] and fingerprint["images"] == 3


# ---- training on latents ---------------------------------------------------------------------------

LATENT_MODEL = {
    "img_size": 4, "patch_size": 2, "in_chans": 4, "embed_dim": 16, "depth": 3, "num_heads": 2,
    "mlp_ratio": 2.0, "normalize_timesteps": False,
}  # fmt: skip


@pytest.fixture(scope="session")
def digit_latents(tmp_path_factory):
    """digits (8x8) encoded by the tiny autoencoder into 4x4x4 latents."""
    folder = tmp_path_factory.mktemp("latents")
    tiny_vae().save_pretrained(folder / "ae")
    latent.run_encode(**encode_args(folder))
    return folder / "latents.npz"


def latent_train(tmp_path, latents, log_path, model=LATENT_MODEL, **settings):
    from conftest import train_kwargs, write_model_yaml

    from duodiff.train.loop import run_train

    config = write_model_yaml(tmp_path / "latent_model.yaml", model)
    quick = dict(dataset="digits", n_steps=6, batch_size=8, lr=1e-3, warmup_steps=0, ema_decay=0.9,
                 log_every_n_steps=2, save_every_n_steps=3, device="cpu", seed=5, latents=latents)  # fmt: skip
    return run_train(**train_kwargs(config, log_path, **{**quick, **settings}))


@pytest.mark.parametrize(
    "model, settings, words",
    [
        ({**LATENT_MODEL, "in_chans": 1}, {}, "holds 4x4x4 latents but .* in_chans 1, img_size 4"),
        ({**LATENT_MODEL, "img_size": 8}, {}, "holds 4x4x4 latents but .* in_chans 4, img_size 8"),
        (LATENT_MODEL, {"dataset": "cifar10"}, "encoded from --dataset digits, not cifar10"),
        (LATENT_MODEL, {"image_size": 16}, "encoded from 8-pixel images, not --image-size 16"),
    ],
)
def test_training_on_latents_refuses_a_shape_mismatch(digit_latents, tmp_path, model, settings, words):
    with pytest.raises(DuodiffError, match=words):
        latent_train(tmp_path, digit_latents, tmp_path / "run", model=model, **settings)
    assert not (tmp_path / "run").exists()
    with pytest.raises(DuodiffError, match="does not exist: run `duodiff encode` first"):
        latent_train(tmp_path, tmp_path / "missing.npz", tmp_path / "run")


def test_training_reads_the_latents_unflipped_and_resumes_bit_identically(digit_latents, tmp_path, monkeypatch):
    from duodiff.core.diffusion import GaussianDiffusion
    from duodiff.train.loop import TrainingStopped

    z, _ = latent.load_latents(digit_latents)
    seen = []
    original = GaussianDiffusion.q_sample

    def recording(self, x0, t, noise):
        seen.append(x0.clone())
        return original(self, x0, t, noise)

    monkeypatch.setattr(GaussianDiffusion, "q_sample", recording)
    latent_train(tmp_path, digit_latents, tmp_path / "whole")
    # Every training input is one of the stored latents as it is (no flip, no resize).
    rows = z.flatten(1)
    for batch in seen:
        assert batch.shape == (8, 4, 4, 4)
        assert (batch.flatten(1)[:, None] == rows[None]).all(dim=-1).any(dim=-1).all()

    # A run stopped after step 3 and resumed ends with the uninterrupted run's weights.
    def stop_at_fourth(self, x0, t, noise):
        if len(seen) == 6 + 4:
            raise TrainingStopped("stopped", 15)
        return recording(self, x0, t, noise)

    monkeypatch.setattr(GaussianDiffusion, "q_sample", stop_at_fourth)
    with pytest.raises(TrainingStopped):
        latent_train(tmp_path, digit_latents, tmp_path / "resumed")
    monkeypatch.undo()
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)["step"] == 3
    latent_train(tmp_path, digit_latents, tmp_path / "resumed")
    whole = torch.load(tmp_path / "whole" / "model.pt", weights_only=False)
    resumed = torch.load(tmp_path / "resumed" / "model.pt", weights_only=False)
    for key, value in whole["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    assert whole["train_args"]["latents"] == str(digit_latents)


# ---- sampling decodes -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def latent_model(tmp_path_factory):
    """A random U-ViT on the tiny autoencoder's 4x4x4 latents, its model.pt recording the
    latents' fingerprint as `duodiff train --latents` does, and the autoencoder folder."""
    from duodiff.models import build_model
    from duodiff.models.checkpoints import save_model

    folder = tmp_path_factory.mktemp("latent_model")
    vae = tiny_vae()
    vae.save_pretrained(folder / "ae")
    torch.manual_seed(0)
    config = {**LATENT_MODEL, "num_classes": 0}
    model = build_model("uvit", config, 50)
    fingerprint = {"autoencoder_sha256": latent.file_sha256(folder / "ae"), "scale_factor": 0.5}
    save_model(
        folder / "model.pt", kind="uvit", model_config=config, classifier_type=None, state_dict=model.state_dict(),
        diffusion={"num_timesteps": 50, "beta_start": 1e-4, "beta_end": 0.02, "parametrization": "predict_noise"},
        ema_state_dict=None, step=1, train_args={"latents_fingerprint": fingerprint},
    )  # fmt: skip
    return folder, vae


def latent_sample(folder, out, **changes):
    from _defaults import cli_args

    from duodiff.sample.sample_set import run_sample

    args = cli_args(
        "sample", checkpoint_path=folder / "model.pt", method="full", output_folder=out, sampler="ddim", steps=3,
        n_samples=5, batch_size=2, seed=0, progress=False, device="cpu", autoencoder=folder / "ae", scale_factor=0.5,
    )  # fmt: skip
    return run_sample(**{**args, **changes})


def test_sampling_decodes_each_batch_into_images_of_the_decoders_size(latent_model, tmp_path, monkeypatch):
    folder, vae = latent_model
    decoded = []
    original = latent.LatentCodec.decode

    def recording(self, z):
        decoded.append(z.clone())
        return original(self, z)

    monkeypatch.setattr(latent.LatentCodec, "decode", recording)
    stats = latent_sample(folder, tmp_path / "set")
    # The sampler ran in the 4x4x4 latent space, one decoder call per batch (2 + 2 + 1) ...
    assert [z.shape for z in decoded] == [(2, 4, 4, 4), (2, 4, 4, 4), (1, 4, 4, 4)]
    # ... and each PNG is the tiny autoencoder's decoding of its latent (D(z / scale), [-1, 1] -> 0..255).
    with torch.no_grad():
        images = vae.decode(torch.cat(decoded) / 0.5).sample.clamp(-1, 1)
    want = ((images + 1) / 2 * 255 + 0.5).clamp(0, 255).to(torch.uint8)[:, 0].numpy()
    got = np.stack([np.array(Image.open(tmp_path / "set" / "images" / f"{i:06d}.png")) for i in range(5)])
    assert got.shape == (5, 8, 8)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # float order of two decoder calls
    assert (stats["img_size"], stats["in_chans"], stats["latent_size"], stats["latent_chans"]) == (8, 1, 4, 4)
    assert stats["decode_time_s"] > 0 and stats["autoencoder"]["scale_factor"] == 0.5
    assert stats["autoencoder"]["sha256"] == latent.file_sha256(folder / "ae")
    parts = [torch.load(p, weights_only=False) for p in sorted((tmp_path / "set" / "parts").iterdir())]
    assert stats["decode_time_s"] == pytest.approx(sum(p["decode_time_s"] for p in parts))
    # The network's time excludes the decoder's: the speed-ups count the network only.
    assert stats["wall_time_s"] == pytest.approx(sum(p["wall_time_s"] for p in parts))


@pytest.mark.parametrize("sampler", ["ddim", "dpm_solver"])
def test_latent_sets_are_never_clipped(latent_model, tmp_path, monkeypatch, sampler):
    """Latents are not in [-1, 1]: clipping x0 there (as pixel sets do) would distort every latent
    sample. The pipeline's sampling of a latent set passes clip_denoised=False to every sampler."""
    from duodiff.core.diffusion import GaussianDiffusion

    folder, _ = latent_model
    seen = []
    original = GaussianDiffusion.sample

    def recording(self, *args, **kwargs):
        seen.append(kwargs.get("clip_denoised", True))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GaussianDiffusion, "sample", recording)
    latent_sample(folder, tmp_path / "set", sampler=sampler)
    assert seen and not any(seen)


def test_sampling_a_latent_model_needs_its_own_autoencoder(latent_model, tmp_path):
    folder, _ = latent_model
    with pytest.raises(DuodiffError, match="was trained on latents .*pass --autoencoder"):
        latent_sample(folder, tmp_path / "a", autoencoder=None, scale_factor=None)
    with pytest.raises(DuodiffError, match="another autoencoder or scale"):
        latent_sample(folder, tmp_path / "b", scale_factor=0.25)
    other = tiny_vae(seed=1)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(DuodiffError, match="another autoencoder or scale"):
        latent_sample(folder, tmp_path / "c", autoencoder=tmp_path / "other")
    with pytest.raises(DuodiffError, match="needs --scale-factor > 0"):
        latent_sample(folder, tmp_path / "d", scale_factor=None)
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_a_pixel_space_model_is_not_decoded(latent_model, tmp_path):
    from duodiff.models import build_model
    from duodiff.models.checkpoints import save_model

    folder, _ = latent_model
    config = {**LATENT_MODEL, "in_chans": 1, "img_size": 8}
    save_model(
        tmp_path / "model.pt", kind="uvit", model_config=config, classifier_type=None,
        state_dict=build_model("uvit", config, 50).state_dict(), ema_state_dict=None, step=1, train_args={},
        diffusion={"num_timesteps": 50, "beta_start": 1e-4, "beta_end": 0.02, "parametrization": "predict_noise"},
    )  # fmt: skip
    with pytest.raises(DuodiffError, match="decodes 4-channel latents, but the model has in_chans 1"):
        latent_sample(folder, tmp_path / "set", checkpoint_path=tmp_path / "model.pt")


def test_flops_counts_the_decoder_apart_from_the_network(latent_model, tmp_path):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from duodiff.metrics.flops import run_flops

    folder, vae = latent_model
    latent_sample(folder, tmp_path / "set")
    result = run_flops(samples=tmp_path / "set", output=tmp_path / "gflops.json")
    # The real decoder, run once on a latent, counted on its own (attention as batched matmuls).
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        vae.decode(torch.zeros(1, 4, 4, 4))
    by_op = counter.get_flop_counts()["Global"]
    assert result["gflops_decoder_per_image"] == pytest.approx(sum(by_op.values()) / 1e9, rel=0, abs=1e-15)
    # By hand, layer by layer (2 FLOPs per multiply-add): the tiny decoder on a 4x4x4 latent.
    def conv(c_in, c_out, k, side):
        return 2 * c_in * c_out * k * k * side * side

    linear_conv = (
        conv(4, 4, 1, 4)  # post_quant_conv
        + conv(4, 16, 3, 4)  # conv_in
        + 4 * conv(16, 16, 3, 4)  # mid block: two resnets of two 3x3 convolutions
        + 4 * 2 * 16 * 16 * 16  # mid attention: q, k, v, out projections of 16 tokens
        + 4 * conv(16, 16, 3, 4) + conv(16, 16, 3, 8)  # up block 0: two resnets, then the upsampler's conv at 8x8
        + conv(16, 8, 3, 8) + conv(8, 8, 3, 8) + conv(16, 8, 1, 8)  # up block 1: resnet 16 -> 8 and its shortcut
        + 2 * conv(8, 8, 3, 8)  # up block 1: resnet 8 -> 8
        + conv(8, 1, 3, 8)  # conv_out
    )  # fmt: skip
    attention = 2 * (2 * 16 * 16 * 16)  # QK^T and AV over 16 tokens of width 16
    assert result["gflops_decoder_per_image_linear_conv"] * 1e9 == pytest.approx(linear_conv, rel=1e-12)
    assert result["gflops_decoder_per_image"] * 1e9 == pytest.approx(linear_conv + attention, rel=1e-12)
    # The network's cost is the U-ViT's alone: a pixel-space count of the same network agrees.
    plain = run_flops(samples=_pixel_copy(tmp_path / "set"), output=tmp_path / "plain.json")
    assert plain["gflops_decoder_per_image"] is None
    assert result["gflops_per_image"] == plain["gflops_per_image"] > 0


def _pixel_copy(folder):
    """The set's stats.json without its autoencoder: what flops counts for a pixel-space set."""
    import shutil

    copy = folder.parent / "pixel"
    shutil.copytree(folder, copy)
    stats = json.loads((copy / "stats.json").read_text())
    stats["autoencoder"] = None
    (copy / "stats.json").write_text(json.dumps(stats))
    return copy
