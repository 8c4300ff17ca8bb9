"""The package's import graph: the layers, the leaf modules everyone uses, and the entry point nobody
imports.

The package mirrors the workflow: one subpackage per stage (train, sample, metrics, timing, report),
built on two shared layers, core (what every stage uses) and models (the networks). A stage imports
the shared layers and never another stage: train does not reach into sample, and report reads the
metrics' and sample sets' result files, never their code, a model or a training run. One exception,
by design: timing times exactly what sample runs, so it imports sample's model loading and policies.

duodiff.core.images (image I/O and the one grid maker) and duodiff.core.flags (the CLI flag helpers) are
leaves: the stages import them, and they import no stage. duodiff.cli imports the stages (their
`add_cli`), so no duodiff module may import it back: it is only the `duodiff` entry point.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "duodiff"
# What the leaves may import from the package: images writes through io's atomic writes.
LEAF_IMPORTS = {"duodiff.core.flags": set(), "duodiff.core.images": {"duodiff.core.io", "duodiff.core.errors"}}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def duodiff_imports(path: Path) -> set[str]:
    """Every duodiff module `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "duodiff"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "duodiff":
            found.add(node.module)
            # `from duodiff import cli` names a module, not an attribute.
            found |= {f"{node.module}.{alias.name}" for alias in node.names
                      if (PACKAGE.parent / node.module.replace(".", "/") / f"{alias.name}.py").is_file()}
    return found


MODULES = {module_name(path): duodiff_imports(path) for path in sorted(PACKAGE.rglob("*.py"))}


# Subpackage -> the subpackages its modules may import (besides their own).
SHARED = {"core", "models"}
ALLOWED = {
    "core": set(),
    "models": {"core"},
    "train": SHARED,
    "sample": SHARED,
    "metrics": SHARED,
    # timing re-runs the sets' sampling policies: it times exactly what sample runs, so it reuses
    # sample's model loading and policies (sample never imports timing).
    "timing": SHARED | {"sample"},
    "report": {"core"},
    # the search judges each probe by the tables' own verdict rule (paired_verdict) and reads the
    # headline's score file the way the tables do (HEADLINES): one rule, imported, not copied.
    "search": SHARED | {"report"},
}


def subpackage(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def test_every_module_lives_in_a_subpackage_but_the_entry_point():
    top = sorted(name for name in MODULES if name.count(".") == 1 and subpackage(name) not in ALLOWED)
    assert top == ["duodiff.cli"]


def test_stages_import_only_the_shared_layers():
    crossings = sorted(
        f"{name} -> {imported}"
        for name, imports in MODULES.items()
        if subpackage(name) in ALLOWED
        for imported in imports
        if subpackage(imported) not in ALLOWED[subpackage(name)] | {subpackage(name), ""}
    )
    assert crossings == []


def test_no_module_imports_the_entry_point():
    importers = sorted(name for name, imports in MODULES.items() if "duodiff.cli" in imports and name != "duodiff.cli")
    assert importers == []


def test_images_and_flags_are_leaves():
    for leaf, allowed in LEAF_IMPORTS.items():
        assert MODULES[leaf] <= allowed, leaf


def test_no_module_but_images_writes_pngs_or_grids_of_its_own():
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name != "images.py":
            source = path.read_text()
            assert "make_grid" not in source, f"{path.name} makes a grid of its own (duodiff.core.images.image_grid)"
            for helper in ("to_uint8", "save_png", "load_png", "image_grid"):
                assert f"def {helper}(" not in source, f"{path.name} defines {helper} (duodiff.core.images has it)"


def test_importing_every_stage_loads_neither_the_cli_nor_a_stage_from_a_leaf():
    # At run time too (transitively): the leaves load only what LEAF_IMPORTS allows, and no stage
    # loads duodiff.cli.
    code = """
import importlib, json, sys
report = {}
for leaf in ("duodiff.core.flags", "duodiff.core.images"):
    before = set(sys.modules)
    importlib.import_module(leaf)
    # A module's packages (duodiff.core for duodiff.core.flags) load with it.
    report[leaf] = sorted(m for m in set(sys.modules) - before if m.startswith("duodiff.") and not leaf.startswith(m + "."))
for stage in ("duodiff.train.loop", "duodiff.models.convert", "duodiff.sample.sample_set", "duodiff.metrics.feature_net", "duodiff.metrics.fid",
              "duodiff.metrics.cmmd", "duodiff.metrics.flops", "duodiff.timing.time_sets", "duodiff.report.tables.collect",
              "duodiff.report.plots.quality"):
    importlib.import_module(stage)
report["cli loaded"] = "duodiff.cli" in sys.modules
print(json.dumps(report))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE.parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    for leaf, allowed in LEAF_IMPORTS.items():
        assert set(report[leaf]) <= allowed | {leaf}, leaf
    assert report["cli loaded"] is False
