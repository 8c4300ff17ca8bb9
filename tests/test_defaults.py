"""One value for each default: where a config key of the workflow schema is also a flag of the
`duodiff` subcommand its rule calls, both give the same default (a user who runs the command by
hand gets what the pipeline would have run)."""

import argparse
from pathlib import Path

import pytest
import yaml

from duodiff.cli import build_parser

SCHEMA = yaml.safe_load((Path(__file__).resolve().parents[1] / "workflow/schemas/config.schema.yaml").read_text())
METRICS = SCHEMA["properties"]["metrics"]["properties"]
# Schema block -> the subcommand its keys are passed to.
BLOCKS = {
    "train": (SCHEMA["$defs"]["training_settings"]["properties"], "train"),
    # The diffusion block reaches `duodiff train` and, with models.full_checkpoint, `duodiff convert`.
    "diffusion": (SCHEMA["properties"]["diffusion"]["properties"], "train"),
    "diffusion (convert)": (SCHEMA["properties"]["diffusion"]["properties"], "convert"),
    "sampling": (SCHEMA["properties"]["sampling"]["properties"], "sample"),
    "metrics.fid": (METRICS["fid"]["properties"], "score"),  # the workflow's scoring command
    "metrics.fid (fid)": (METRICS["fid"]["properties"], "fid"),
    "metrics.fid (reference)": (METRICS["fid"]["properties"], "reference"),  # max_reference
    "metrics.cmmd": (METRICS["cmmd"]["properties"], "cmmd"),
    "metrics.classifier": (METRICS["classifier"]["properties"], "feature-net"),
    "timing": (SCHEMA["properties"]["timing"]["properties"], "time"),
    "learning_to_cache": (SCHEMA["properties"]["learning_to_cache"]["properties"], "train-router"),
}
# By design: `duodiff sample --steps` has no default (ddim needs it, ddpm takes num_timesteps),
# the workflow's sampling block samples 50 DDIM steps unless the config says otherwise.
EXCEPTIONS = {("sampling", "steps")}


def flag_defaults(command: str) -> dict:
    parser = build_parser(command)
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a.default for a in subparsers.choices[command]._actions}


@pytest.mark.parametrize("block", BLOCKS)
def test_schema_and_command_line_defaults_agree(block):
    properties, command = BLOCKS[block]
    flags = flag_defaults(command)
    shared = [key for key, spec in properties.items() if "default" in spec and key in flags]
    assert shared, f"no key of {block} is a flag of duodiff {command}"
    disagree = {key: (properties[key]["default"], flags[key]) for key in shared if (block, key) not in EXCEPTIONS
                and properties[key]["default"] != flags[key]}
    assert not disagree, f"{block}: schema default vs duodiff {command} default: {disagree}"


def test_warm_up_is_described_as_the_schedule_the_code_runs():
    from duodiff.train.loop import warmup_cosine

    description = SCHEMA["$defs"]["training_settings"]["properties"]["warmup_steps"]["description"]
    assert "cosine" in description and "constant" not in description
    factor = warmup_cosine(warmup_steps=10, n_steps=110)
    assert factor(5) == pytest.approx(0.5) and factor(60) == pytest.approx(0.5) and factor(110) == pytest.approx(0.0)
