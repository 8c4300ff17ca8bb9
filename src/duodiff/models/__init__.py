"""Model registry: build a U-ViT or an early-exit U-ViT from a model config (config/models/*.yaml)."""

from __future__ import annotations

from duodiff.config import load_yaml
from duodiff.errors import check_choice
from duodiff.models.uvit import EARLY_EXIT_KEYS, MODEL_CONFIG_KEYS, PROBE_DESIGNS, UViT, validate_model_config

# Kept in step with early_exit.CLASSIFIER_TYPES (tested); listed here so importing the registry
# does not need the early-exit module.
CLASSIFIER_TYPES = (
    "attention_probe",
    "mlp_probe_per_layer",
    "mlp_probe_per_timestep",
    "mlp_probe_per_layer_per_timestep",
)
# 'deediff_uvit' is the early-stopping-diffusion seed's name for the early-exit model.
MODEL_KINDS = ("uvit", "early_exit")
KIND_ALIASES = {"deediff_uvit": "early_exit"}

__all__ = [
    "CLASSIFIER_TYPES",
    "EARLY_EXIT_KEYS",
    "KIND_ALIASES",
    "MODEL_CONFIG_KEYS",
    "MODEL_KINDS",
    "PROBE_DESIGNS",
    "UViT",
    "build_model",
    "load_model_config",
    "validate_model_config",
]


def load_model_config(path) -> dict:
    """Read a model YAML and check its keys and values (DuodiffError naming the file otherwise).

    Returns the file's settings as written (defaults are filled in when the model is built), so the
    dict stored in model.pt is the YAML the user wrote.
    """
    config = load_yaml(path)
    validate_model_config(config, source=str(path))
    return config


def build_model(kind: str, model_config: dict, num_timesteps: int = 1000, classifier_type: str | None = None):
    """kind 'uvit' -> UViT; 'early_exit' (alias 'deediff_uvit') -> EarlyExitUViT around a fresh UViT."""
    check_choice("model kind", kind, [*MODEL_KINDS, *KIND_ALIASES])
    kind = KIND_ALIASES.get(kind, kind)
    config = validate_model_config(model_config)
    if kind == "uvit":
        # classifier_type is ignored here, as the seed's train.py ignores --classifier_type for uvit.
        return UViT(**config, num_timesteps=num_timesteps)

    check_choice("classifier type", classifier_type, CLASSIFIER_TYPES)
    from duodiff.models.early_exit import EarlyExitUViT

    backbone = UViT(**config, num_timesteps=num_timesteps)
    return EarlyExitUViT(
        backbone,
        classifier_type=classifier_type,
        probe_hidden=config["probe_hidden"],
        num_timesteps=num_timesteps,
        probe_design=config["probe_design"],
    )
