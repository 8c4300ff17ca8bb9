"""envs/duodiff.yaml (the conda environment of cluster jobs) against constraints.txt and pyproject.

The conda file and constraints.txt must pin the same packages at the same versions, pyproject's
dependencies must all be among them, and the post-deploy script must install this repository,
wherever Snakemake starts it from.
"""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
ENV_FILE = REPO / "envs" / "duodiff.yaml"
POST_DEPLOY = REPO / "envs" / "duodiff.post-deploy.sh"


def normalize(name: str) -> str:
    """PEP 503 name normalization: pip treats open_clip_torch and open-clip-torch alike."""
    return re.sub(r"[-_.]+", "-", name).lower()


def constraints() -> dict:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.strip()] = version.strip()
    return pins


def env_file() -> dict:
    return yaml.safe_load(ENV_FILE.read_text())


def env_pip_pins() -> dict:
    deps = env_file()["dependencies"]
    pip_lists = [d["pip"] for d in deps if isinstance(d, dict) and "pip" in d]
    assert len(pip_lists) == 1, "envs/duodiff.yaml needs exactly one pip: section"
    pins = {}
    for entry in pip_lists[0]:
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s=]+)", entry)
        assert match, f"pip entry {entry!r} is not pinned as name==version"
        pins[match.group(1)] = match.group(2)
    return pins


def test_env_file_is_a_conda_env_with_python_311_and_pip():
    env = env_file()
    assert env["channels"][0] == "conda-forge"
    conda_deps = [d for d in env["dependencies"] if isinstance(d, str)]
    assert "python=3.11" in conda_deps
    assert "pip" in conda_deps


def test_env_pins_exactly_the_constraints():
    # Same names spelled the same way, same versions, nothing more and nothing less.
    assert env_pip_pins() == constraints()


def test_every_pyproject_dependency_is_pinned_in_the_env():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"]) + [d for ds in project.get("optional-dependencies", {}).values() for d in ds]
    names = {normalize(re.split(r"[\[<>=!~; ]", d, maxsplit=1)[0]) for d in wanted}
    pinned = {normalize(name) for name in env_pip_pins()}
    assert names - pinned == set()
    assert "duodiff" not in pinned  # the project itself comes from the post-deploy script


def test_env_file_has_no_relative_pip_paths():
    # Snakemake copies the file to .snakemake/conda/<hash>.yaml before `conda env create`, and
    # conda resolves relative pip paths against the copy's folder: `-e ../` would point there.
    deps = env_file()["dependencies"]
    entries = [e for d in deps if isinstance(d, dict) for e in d.get("pip", [])]
    assert not [e for e in entries if e.startswith(("-e", "--editable", ".", "/", "file:"))]


def test_post_deploy_script_installs_this_repository_from_any_working_directory(tmp_path):
    # Snakemake runs the script inside the new environment; stand in a `python` that records how
    # it was called, and start the script from an unrelated folder.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    record = tmp_path / "python-args"
    (fake_bin / "python").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\n')
    (fake_bin / "python").chmod(0o755)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"}

    subprocess.run(["bash", str(POST_DEPLOY)], cwd=elsewhere, env=env, check=True, timeout=30)

    args = record.read_text().splitlines()
    assert args[:5] == ["-m", "pip", "install", "--no-deps", "-e"]
    installed = Path(args[5])
    assert installed.resolve() == REPO
    assert tomllib.loads((installed / "pyproject.toml").read_text())["project"]["name"] == "duodiff"


def test_post_deploy_script_sits_where_snakemake_looks_for_it():
    # Snakemake runs <env file without .yaml>.post-deploy.sh, with the interpreter of its shebang.
    assert POST_DEPLOY == ENV_FILE.with_name(ENV_FILE.stem + ".post-deploy.sh")
    assert POST_DEPLOY.read_text().startswith("#!/usr/bin/env bash\n")
