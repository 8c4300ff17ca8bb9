"""The workflow as the Snakemake workflow catalog checks it: `snakemake --lint` and `snakefmt
--check` clean, and the catalog's files (.snakemake-workflow-catalog.yml, config/README.md,
workflow/Snakefile with rules/*.smk, a LICENSE) in place and in step with the repository."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

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


def test_catalog_settings_match_the_repository():
    settings = yaml.safe_load((REPO / ".snakemake-workflow-catalog.yml").read_text())
    usage = settings["usage"]
    assert usage["report"] is True
    assert usage["software-stack-deployment"] == {"conda": True}
    flags = usage["mandatory-flags"]
    assert isinstance(flags["desc"], str) and flags["desc"].strip()
    words = shlex.split(flags["flags"]) if isinstance(flags["flags"], str) else list(flags["flags"])
    values = dict(zip(words[::2], words[1::2]))
    assert set(values) == {"--configfile", "--profile"}
    assert (REPO / values["--configfile"]).is_file()
    assert (REPO / values["--profile"] / "config.yaml").is_file()
    # The flags are the ones the README's run command uses, and conda deployment has its env.
    readme = (REPO / "README.md").read_text()
    assert f"--configfile {values['--configfile']}" in readme and f"--profile {values['--profile']}" in readme
    # conda: true means every job can run under --sdm conda: each rule that runs a command names an
    # env (checkpoints too), and each `use rule` variant inherits the env of its base rule.
    rules, variants = set(), {}
    for path in (REPO / "workflow" / "rules").glob("*.smk"):
        lines = path.read_text().splitlines()
        names = [match[2] for line in lines if (match := re.match(r"(local)?(?:rule|checkpoint) (\w+):", line))]
        assert len(names) == sum(line.strip() == "conda:" for line in lines), path.name
        rules.update(names)
        variants.update(
            {match[2]: match[1] for line in lines if (match := re.match(r"use rule (\w+) as (\w+) with:", line))}
        )
    assert set(variants.values()) <= rules
    assert len(rules) + len(variants) >= 10
    assert (REPO / "envs" / "duodiff.yaml").is_file()


def test_catalog_standardized_usage_files_exist():
    assert (REPO / "workflow" / "Snakefile").is_file()
    assert list((REPO / "workflow" / "rules").glob("*.smk"))
    assert (REPO / "config" / "README.md").is_file()
    readme = (REPO / "README.md").read_text().lower()
    assert "snakemake" in readme and "workflow" in readme  # how the catalog finds repositories
    license_text = (REPO / "LICENSE").read_text()
    assert license_text.startswith("MIT License") and "Copyright (c) 2026 the duodiff authors" in license_text
