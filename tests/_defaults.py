"""The keyword arguments a stage's run_* function gets from `duodiff <command>`: every flag's
default (the one home of each default for hand use; the workflow's schema is the other, for the
pipeline) with the test's own values on top.

The run_* functions take keyword-only arguments without defaults, so a test that calls one
directly builds its arguments here, e.g. `run_fid(**cli_args("fid", samples=..., reference=...,
output=..., batch_size=3))`, and runs what the command would run.
"""

from __future__ import annotations

import argparse

from duodiff.cli import build_parser


def flag_defaults(command: str) -> dict:
    """{dest: default} of every flag of `duodiff <command>` (required flags: None)."""
    parser = build_parser(command)
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a.default for a in subparsers.choices[command]._actions if a.dest != "help"}


def cli_args(command: str, **given) -> dict:
    """The flags' defaults of `duodiff <command>`, overridden by `given` (names as the flags' dests,
    which are the run_* function's keywords)."""
    defaults = flag_defaults(command)
    unknown = sorted(set(given) - set(defaults))
    assert not unknown, f"duodiff {command} has no flag for {unknown}"
    return {**defaults, **given}
