"""The workflow as the Snakemake workflow catalog checks it: `snakemake --lint` and `snakefmt
--check` clean."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """The project environment's `name`, else the PATH's; skip the test when there is none."""
    path = BIN / name if (BIN / name).is_file() else shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[test]' -c constraints.txt installs it)")
    return str(path)


def run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "flags",
    [[], ["--configfile", "config/config.yaml"]],
    ids=["as-the-catalog-runs-it", "with-the-readme-configfile"],
)
def test_snakemake_lint_is_clean(flags):
    result = run([tool("snakemake"), "--lint", *flags])
    output = result.stdout + result.stderr
    # Snakemake exits 1 when it has lints, and prints them ("Lints for rule ...").
    assert result.returncode == 0, output
    assert "Lints for" not in output and "Congratulations, your workflow is in a good condition" in output


def test_snakefmt_check_is_clean():
    result = run([tool("snakefmt"), "--check", "workflow/"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_snakefmt_check_is_clean_on_the_files_the_catalog_names():
    # The catalog passes the files themselves (workflow/Snakefile and workflow/rules/*.smk) from the
    # repository root; the line length must come from pyproject.toml then too.
    files = ["workflow/Snakefile", *sorted(str(p.relative_to(REPO)) for p in (REPO / "workflow" / "rules").glob("*.smk"))]
    assert len(files) > 1
    result = run([tool("snakefmt"), "--check", *files])
    assert result.returncode == 0, result.stdout + result.stderr
