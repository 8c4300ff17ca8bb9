"""The networks: build a U-ViT or an early-exit U-ViT from a model config (config/models/*.yaml).

    uvit.py         UViTConfig and U-ViT (Bao et al.), faithful to the reference code; UViT.loss
    early_exit.py   the DeeDiff / AdaDiff early-exit U-ViT: heads, probes, the exit, its loss
    checkpoints.py  the files that carry models between stages: model.pt, checkpoint.pt
    convert.py      `duodiff convert` (workflow/rules/convert.smk): U-ViT's released weights -> model.pt
"""

from __future__ import annotations

from duodiff.core.config import load_yaml
from duodiff.core.study import CLASSIFIER_TYPES
from duodiff.models.uvit import EARLY_EXIT_KEYS, PROBE_DESIGNS, UViT, UViTConfig

# 'deediff_uvit' is the early-stopping-diffusion seed's name for the early-exit model.
MODEL_KINDS = ("uvit", "early_exit")
KIND_ALIASES = {"deediff_uvit": "early_exit"}

__all__ = [
    "CLASSIFIER_TYPES",
    "EARLY_EXIT_KEYS",
    "KIND_ALIASES",
    "MODEL_KINDS",
    "PROBE_DESIGNS",
    "UViT",
    "UViTConfig",
    "build_model",
    "load_model_config",
]


def load_model_config(path) -> dict:
    """Read a model YAML and check its keys and values (DuodiffError naming the file otherwise).

    Returns the file's settings as written (defaults are filled in by UViTConfig), so the dict
    stored in model.pt is the YAML the user wrote.
    """
    config = load_yaml(path)
    UViTConfig.from_dict(config, source=str(path))
    return config


def build_model(
    kind: str, model_config: dict | UViTConfig, num_timesteps: int = 1000, classifier_type: str | None = None
):
    """kind 'uvit' -> UViT; 'early_exit' (alias 'deediff_uvit') -> EarlyExitUViT around a fresh UViT.

    model_config: a UViTConfig, or a mapping as in a model YAML or model.pt (UViTConfig.from_dict
    checks it). kind, num_timesteps and classifier_type are trusted: `duodiff train`'s check pass
    and GaussianDiffusion checked them, and model.pt holds what they passed.
    """
    kind = KIND_ALIASES.get(kind, kind)
    assert kind in MODEL_KINDS, kind
    config = model_config if isinstance(model_config, UViTConfig) else UViTConfig.from_dict(model_config)
    if kind == "uvit":
        # classifier_type is ignored here, as the seed's train.py ignores --classifier_type for uvit.
        return UViT(config, num_timesteps=num_timesteps)

    from duodiff.models.early_exit import EarlyExitUViT

    return EarlyExitUViT(UViT(config, num_timesteps=num_timesteps), classifier_type=classifier_type)
