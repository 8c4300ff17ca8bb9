"""The tiny-model set-up the test files share, and run_train's arguments from the flags' defaults.

Test files import these helpers (`from conftest import ...`; pytest puts tests/ on sys.path).
"""

import pytest
import yaml

# duodiff (and torch) are imported inside the helpers: every test file loads this one, and the
# workflow's tests need neither.

# An 8x8 one-channel U-ViT of three blocks that learns digits in a few steps (training tests).
TINY_DIGITS = {
    "img_size": 8, "patch_size": 2, "in_chans": 1, "embed_dim": 32, "depth": 3, "num_heads": 2,
    "mlp_ratio": 2.0, "normalize_timesteps": False, "probe_hidden": 16,
}  # fmt: skip
# An 8x8 two-channel U-ViT of five blocks (model and early-exit tests), and the T they use.
TINY = dict(img_size=8, patch_size=2, in_chans=2, embed_dim=32, depth=5, num_heads=4)
TINY_EARLY_EXIT = {**TINY, "probe_hidden": 16}
T = 50
# A tiny diffusers AutoencoderKL standing in for Stable Diffusion's KL-f8: 1-channel 8x8 images
# (digits) <-> 4x4x4 latents (two down blocks: one 2x downsampling).
TINY_AUTOENCODER = {
    "in_channels": 1, "out_channels": 1, "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"], "block_out_channels": [8, 16],
    "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 4, "sample_size": 8,
}  # fmt: skip


def save_tiny_autoencoder(path, seed=0):
    """A randomly initialised TINY_AUTOENCODER saved as a diffusers folder at `path` -> the model."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**TINY_AUTOENCODER).eval()
    vae.save_pretrained(path)
    return vae


def write_model_yaml(path, config=TINY_DIGITS, **overrides):
    """A model YAML (config/models/*.yaml) of `config` with `overrides` -> its path."""
    path.write_text(yaml.safe_dump({**config, **overrides}))
    return path


@pytest.fixture
def tiny_yaml(tmp_path):
    """TINY_DIGITS as a model YAML."""
    return write_model_yaml(tmp_path / "tiny.yaml")


def train_kwargs(config_path, log_path, **settings) -> dict:
    """run_train's keyword arguments: `duodiff train`'s flag defaults (their one home for hand
    use), the two required paths, and `settings` over them."""
    from duodiff.cli import build_parser

    args = build_parser("train").parse_args(["train", "--config-path", str(config_path), "--log-path", str(log_path)])
    defaults = {k: v for k, v in vars(args).items() if k not in ("command", "func", "nproc_per_node") and k[0] != "_"}
    return {**defaults, "config_path": config_path, "log_path": log_path, **settings}


def tiny_batch(n=6, num_classes=0, seed=1):
    """n 2-channel 8x8 images, timesteps in [0, T) and (num_classes > 0) labels, from `seed`."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 8, 8, generator=g, dtype=torch.float64)
    t = torch.randint(0, T, (n,), generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g) if num_classes else None
    return x, t, y


def save_tiny_model(path, model, kind, config, diffusion, classifier_type=None, ema=None, step=1):
    """`model` as the model.pt `duodiff train` leaves (random weights are enough for these tests)."""
    from duodiff.models.checkpoints import save_model

    save_model(
        path, kind=kind, model_config=config, diffusion=diffusion, classifier_type=classifier_type,
        state_dict=model.state_dict(), ema_state_dict=ema, step=step, train_args={},
    )  # fmt: skip
    return path


def select_exit(outputs, uncertainties, threshold):
    """The exit rule written plainly, the reference for EarlyExitUViT.forward_early_exit: per sample
    the first exit with u <= threshold, else the last one -> (output, exit_layer)."""
    import torch

    B = uncertainties.shape[0]
    below = uncertainties <= threshold
    below = torch.cat([below, torch.ones_like(below[:, :1])], dim=1)
    exit_layer = below.int().argmax(dim=1)  # argmax returns the first maximal index
    output = torch.stack(outputs, dim=1)[torch.arange(B, device=exit_layer.device), exit_layer]
    return output, exit_layer



@pytest.fixture(scope="session")
def finished_study(tmp_path_factory):
    """(slow) One finished tiny study per session, shared by tests/test_study_changes_*.py across
    xdist workers (tests/_study_changes.py)."""
    from _study_changes import finished_study as build

    return build(tmp_path_factory)
