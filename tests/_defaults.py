"""Arguments for calling a command's run_* function directly, as `duodiff <command>` would.

The run_* functions take keyword-only arguments without defaults: the defaults live in the
argparse flags (and the workflow schema). A test starts from the flags' defaults and names the
required flags and whatever it changes.
"""

from __future__ import annotations

import argparse

from duodiff.cli import build_parser


def run_args(command: str, **values) -> dict:
    """The default of every optional flag of `duodiff <command>`, by its argument name, then `values`."""
    parser = build_parser(command)
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    flags = subparsers.choices[command]._actions
    return {**{a.dest: a.default for a in flags if not a.required and a.dest != "help"}, **values}
