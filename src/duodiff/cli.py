"""The `duodiff` command: one sub-command per pipeline stage.

Each stage module owns its sub-command: it defines `add_cli(subparsers)`, which registers the
sub-command (with duodiff.core.flags.add_flag) and sets `func` to a thin wrapper around the module's
plain `run_*` function. This file only collects them, checks that the command's outputs can be
written, and turns errors into one readable line and an exit status (EXIT_CODES). It is the entry
point: no duodiff module imports it.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys

from duodiff.core.errors import DuodiffError
from duodiff.core.flags import OneLineErrorParser
from duodiff.core.io import check_output_path

# Sub-command -> the module that registers it (its `add_cli`), in the order `duodiff --help`
# lists them. A call imports only its own command's module: every pipeline job starts a fresh
# `duodiff`, and pandas/matplotlib/clean-fid imports would add seconds to each of them.
COMMANDS = {
    "encode": "duodiff.core.latent",
    "train": "duodiff.train.loop",
    "train-router": "duodiff.train.router",
    "convert": "duodiff.models.convert",
    "sample": "duodiff.sample.sample_set",
    "feature-net": "duodiff.metrics.feature_net",
    "reference": "duodiff.metrics.fid",
    "real-set": "duodiff.metrics.fid",
    "fid": "duodiff.metrics.fid",
    "score": "duodiff.metrics.fid",
    "cmmd-reference": "duodiff.metrics.cmmd",
    "cmmd": "duodiff.metrics.cmmd",
    "flops": "duodiff.metrics.flops",
    "time": "duodiff.timing.time_sets",
    "search": "duodiff.search.rounds",
    "search-result": "duodiff.search.rounds",
    "tables": "duodiff.report.tables.collect",
    "plots": "duodiff.report.plots.quality",
}

# Exit statuses (docs/architecture.md, "The CLI"): 128 + the signal number for a run stopped by a
# signal, as shells and Slurm report a process killed by it.
EXIT_CODES = {
    0: "success",
    1: "an unexpected error (a bug): Python's traceback",
    2: "bad input, an unusable file or a run that cannot go on, explained in one line",
    128 + signal.SIGINT: "stopped by Ctrl-C (SIGINT)",
    128 + signal.SIGTERM: "stopped by SIGTERM (Slurm's time limit, preemption, kill); train checkpoints first",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `duodiff` parser; with `command`, only that sub-command's module is imported."""
    parser = OneLineErrorParser(
        prog="duodiff",
        description="Train U-ViT, early-exit and DuoDiff diffusion models; sample and score them.",
        epilog="exit status: " + "; ".join(f"{code} {meaning}" for code, meaning in EXIT_CODES.items()),
    )
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrorParser)
    modules = [COMMANDS[command]] if command in COMMANDS else COMMANDS.values()
    for module_name in dict.fromkeys(modules):  # fid.py registers both reference and fid
        importlib.import_module(module_name).add_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    outputs = vars(args).pop("_outputs", [])  # the output flags duodiff.core.flags.add_flag recorded
    try:
        for flag, dest, kind in outputs:
            paths = getattr(args, dest)
            for path in paths if isinstance(paths, list) else [paths]:  # a flag may name several (flops)
                check_output_path(flag, path, kind)
        args.func(args)
    except DuodiffError as error:
        print(f"duodiff {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"duodiff {args.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    return 0


if __name__ == "__main__":
    sys.exit(main())
