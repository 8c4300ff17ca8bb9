"""The flag helpers every stage's `add_cli` uses to register its sub-command.

A leaf module: the stage modules import it, and it imports no duodiff module, so registering a
sub-command never goes back to duodiff.cli (the entry point, which imports the stages).
`add_flag` records the flags that name a command's outputs (OUTPUT_FLAGS) in the parsed
arguments' `_outputs`; `duodiff.cli.main` checks each can be written before the command starts.
"""

from __future__ import annotations

import argparse

# The flags that name what a command writes, and whether each is a folder or a file: add_flag
# records them, and cli.main() checks each can be written before the command starts any work.
OUTPUT_FLAGS = {"--output": "file", "--output-folder": "folder", "--output-dir": "folder", "--log-path": "folder"}


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse prints usage + error; users asked for one line and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_flag(parser: argparse.ArgumentParser, name: str, *aliases: str, **kwargs):
    """Add `--some-flag`, also accepting the seeds' `--some_flag` spelling (and extra aliases)."""
    names = [name]
    # Only the dashes inside the name: the leading "--" must stay dashes.
    underscored = "--" + name[2:].replace("-", "_")
    if underscored != name:
        names.append(underscored)
    names.extend(aliases)
    kwargs.setdefault("dest", name.lstrip("-").replace("-", "_"))
    action = parser.add_argument(*names, **kwargs)
    if name in OUTPUT_FLAGS:
        outputs = parser.get_default("_outputs") or []
        parser.set_defaults(_outputs=[*outputs, (name, action.dest, OUTPUT_FLAGS[name])])
    return action


def cli_flags(settings: dict) -> list[str]:
    """Parsed arguments written back as flags: {'n_steps': 10, 'use_amp': True, 'root': None} ->
    ['--n-steps', '10', '--use-amp']. True booleans become switches; False and None are left out
    (the flags' defaults). The workflow's common.smk has its own copy, as it must not import duodiff."""
    flags = []
    for key, value in settings.items():
        if value is None or value is False:
            continue
        flags.append(f"--{key.replace('_', '-')}")
        if value is not True:
            flags.append(str(value))  # str(float) round-trips exactly
    return flags
