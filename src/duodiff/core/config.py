"""Reading experiment and model configs (YAML) with clear errors."""

from __future__ import annotations

from pathlib import Path

import yaml

from duodiff.core.errors import DuodiffError


def load_yaml(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DuodiffError(f"config file {path} does not exist")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as error:
        raise DuodiffError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise DuodiffError(f"{path}: expected a mapping of settings, found {type(data).__name__}")
    return data
