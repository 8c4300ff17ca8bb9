"""One study vocabulary: duodiff.core.study, and the workflow's own copy of it kept in step.

The workflow must not import the package (workflow/rules/common.smk), so it has its own copy: the
schema's enums and the set names its rules build. The tests compare the schema with duodiff.core.study,
and what the workflow plans for the shipped configs (and for one of edge values) with what
duodiff.core.study parses and builds. The workflow's side is taken from `snakemake -n -p`, as users run
it: the `duodiff sample` and `duodiff tables` command lines it would run.
"""

from __future__ import annotations

import ast
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from test_workflow import (
    SHIPPED_CONFIGS,
    TINY,
    add_autoencoders,
    make_workdir,
    planned_commands,
    snakemake,
)

from duodiff.core.errors import DuodiffError
from duodiff.core.study import (
    COMPOSED_FORMS,
    CLASSIFIER_TYPES,
    METHODS,
    PRECISIONS,
    SAMPLERS,
    composed_family_label,
    parse_set_form,
    parse_set_name,
    set_name,
    setting_label,
    stats_method,
)

REPO = Path(__file__).resolve().parents[1]
SCHEMA_PATH = REPO / "workflow" / "schemas" / "config.schema.yaml"
SCHEMA = yaml.safe_load(SCHEMA_PATH.read_text())
# A tiny study whose names are edge cases: every classifier type, thresholds whose shortest float
# text is exponent notation, an integer or a rounding artefact, t_switch at both ends, one step.
EDGES = "edges.yaml"
EDGE_VALUES = {
    "experiment": "edges",
    "early_exit": {"classifier_types": SCHEMA["properties"]["early_exit"]["properties"]["classifier_types"]["items"]["enum"],
                   "thresholds": [1e-05, 0.05, 1, 0.1 + 0.2]},
    "duodiff": {"t_switch": [0, 6]},
    # caching at both ends of its interval: every step full (N 1) and one full step (N = steps)
    "cache": {"interval": [1, 6], "keep_blocks": 1},
    # every composed form, each knob swept once, thresholds of the odd texts too
    "composed": [{"steps": 5, "early_exit": "attention_probe", "threshold": [1e-05, 1]},
                 {"steps": [1, 5], "duodiff": 1, "t_switch": 0},
                 {"duodiff": 1, "t_switch": [0, 6], "early_exit": "mlp_probe_per_layer", "threshold": 0.1 + 0.2},
                 {"duodiff": 1, "t_switch": 2, "early_exit": "attention_probe", "threshold": 0.5, "steps": [2, 3]},
                 {"duodiff": 1, "t_switch": 2, "cache_interval": [1, 6], "cache_keep": 1}],
}  # fmt: skip
CONFIGS = SHIPPED_CONFIGS + [EDGES]


def load_config(workdir: Path, path: str) -> dict:
    """A config as the workflow sees it: the file, with the schema's defaults filled in."""
    from snakemake.utils import validate

    config = yaml.safe_load((workdir / path).read_text())
    validate(config, str(SCHEMA_PATH))
    return config


@pytest.fixture(scope="session")
def plans(tmp_path_factory):
    """{config: (the config with its defaults, [(sub-command, flags)] of `snakemake -n -p`)}."""
    workdir = add_autoencoders(make_workdir(tmp_path_factory.mktemp("vocabulary")))  # tiny_latent's autoencoder
    tiny = yaml.safe_load((REPO / TINY).read_text())
    tiny["sampling"]["fewer_steps"] = [1, 5]
    (workdir / EDGES).write_text(yaml.safe_dump({**tiny, **EDGE_VALUES}))
    with ThreadPoolExecutor(max_workers=3) as pool:
        runs = dict(zip(CONFIGS, pool.map(lambda c: snakemake(workdir, "--configfile", c, "-n", "-p"), CONFIGS)))
    plans = {}
    for config, result in runs.items():
        assert result.returncode == 0, result.stderr
        plans[config] = (load_config(workdir, config), planned_commands(result.stdout))
    return plans


# ---- the schema's enums --------------------------------------------------------------------------


def test_the_schema_allows_the_packages_samplers_precisions_and_classifier_types():
    sampling = SCHEMA["properties"]["sampling"]["properties"]
    classifiers = SCHEMA["properties"]["early_exit"]["properties"]["classifier_types"]["items"]
    assert tuple(sampling["sampler"]["enum"]) == SAMPLERS
    assert tuple(sampling["precision"]["enum"]) == PRECISIONS
    assert tuple(classifiers["enum"]) == CLASSIFIER_TYPES


# ---- set names: what the workflow plans and what duodiff.core.study parses and builds ------------------


@pytest.mark.parametrize("config", CONFIGS)
def test_every_set_the_workflow_samples_parses_into_the_method_and_settings_it_runs(plans, config):
    _, commands = plans[config]
    samples = [flags for name, flags in commands if name == "sample"]
    assert samples
    for flags in samples:
        name = Path(flags["--output-folder"]).name
        method, fields = parse_set_name(name)
        assert flags["--method"] in METHODS and flags["--method"] == stats_method(name), name
        assert flags["--sampler"] in SAMPLERS and flags["--precision"] in PRECISIONS, name
        if "threshold" in fields:
            assert float(flags["--threshold"]) == float(fields["threshold"]), name
        else:
            assert "--threshold" not in flags, name
        if "t_switch" in fields:
            assert flags["--t-switch"] == fields["t_switch"], name
        if "steps" in fields:
            assert flags["--steps"] == fields["steps"], name
        if "cache_interval" in fields:  # caching alone, or in DuoDiff's full-model phase
            assert (flags["--cache-interval"], flags["--cache-keep"]) == (fields["cache_interval"], fields["cache_keep"])
            if "depth" in fields:
                assert Path(flags["--checkpoint-path-late"]).parent.name == "full", name
        else:
            assert "--cache-interval" not in flags and "--cache-keep" not in flags, name
        if method == "l2c":
            assert float(flags["--router-threshold"]) == float(fields["router_threshold"]), name
            assert Path(flags["--router"]).name == "router.pt", name
        else:
            assert "--router" not in flags and "--router-threshold" not in flags, name
        if "classifier_type" in fields:  # early exit alone, or DuoDiff's late model
            late = flags["--checkpoint-path-late"] if "depth" in fields else flags["--checkpoint-path"]
            assert Path(late).parent.name == f"ee_{fields['classifier_type']}", name
        # duodiff.core.study builds the workflow's name back from the fields it parsed.
        assert set_name(method, **fields) == name


@pytest.mark.parametrize("config", CONFIGS)
def test_the_sets_study_names_for_a_config_are_the_sets_the_workflow_tabulates(plans, config):
    # The grid of the config, named by duodiff.core.study, against the --sets `duodiff tables` gets.
    cfg, commands = plans[config]
    depths = [yaml.safe_load((REPO / path).read_text())["depth"] for path in cfg["models"]["shallow"]]
    built = (
        [set_name("full")]
        + [set_name("fewer_steps", steps=n) for n in cfg["sampling"]["fewer_steps"]]
        + [set_name("shallow", depth=d) for d in depths]
        + [set_name("early_exit", classifier_type=c, threshold=t)
           for c in cfg["early_exit"]["classifier_types"] for t in cfg["early_exit"]["thresholds"]]
        + [set_name("duodiff", depth=d, t_switch=t) for d in depths for t in cfg["duodiff"]["t_switch"]]
        + [set_name("cache", cache_interval=n, cache_keep=cfg["cache"]["keep_blocks"]) for n in cfg["cache"]["interval"]]
        + [set_name("l2c", router_threshold=t) for t in cfg.get("learning_to_cache", {}).get("thresholds", [])]
        + [name for entry in cfg.get("composed", []) for name in composed_names(entry)]
        + ([set_name("real")] if cfg["reference"]["n_real"] > 0 else [])
    )  # fmt: skip
    (tables,) = [flags for name, flags in commands if name == "tables"]
    assert sorted(tables["--sets"].split()) == sorted(set(built))
    sampled = {Path(flags["--output-folder"]).name for name, flags in commands if name in ("sample", "real-set")}
    assert sampled == set(built)


def composed_names(entry: dict) -> list[str]:
    """The sets of one `composed` entry, named by duodiff.core.study: its knob's every value."""
    knob = next(k for k in ("t_switch", "threshold", "cache_interval", "steps") if isinstance(entry.get(k), list))
    fields = {"depth": entry.get("duodiff"), "t_switch": entry.get("t_switch"),
              "classifier_type": entry.get("early_exit"), "threshold": entry.get("threshold"), "steps": entry.get("steps"),
              "cache_interval": entry.get("cache_interval"), "cache_keep": entry.get("cache_keep")}
    fields = {k: v for k, v in fields.items() if v is not None}
    return [set_name("composed", **{**fields, knob: value}) for value in entry[knob]]


def test_edge_composed_sets_are_planned_with_every_form(plans):
    _, commands = plans[EDGES]
    names = {Path(flags["--output-folder"]).name for name, flags in commands if name == "sample"}
    assert {"ee_attention_probe_thr1e-05_steps5", "ee_attention_probe_thr1.0_steps5", "duodiff_d1_ts0_steps1",
            "duodiff_d1_ts6_ee_mlp_probe_per_layer_thr0.30000000000000004",
            "duodiff_d1_ts2_ee_attention_probe_thr0.5_steps3", "duodiff_d1_ts2_cache_N1_k1", "duodiff_d1_ts2_cache_N6_k1"} <= names
    forms = {parse_set_form(name)[0] for name in names}
    assert set(COMPOSED_FORMS) <= forms


def _common_smk_function(name: str):
    """A plain function of workflow/rules/common.smk, compiled on its own (the file is Snakemake's)."""
    text = (REPO / "workflow" / "rules" / "common.smk").read_text()
    start = text.index(f"def {name}(")
    source = text[start : text.index("\n\n\n", start)]
    namespace = {"threshold_label": lambda value: repr(float(value))}
    exec(compile(source, "common.smk", "exec"), namespace)  # noqa: S102 - the repository's own file
    return namespace[name]


@pytest.mark.parametrize(
    "fields, knob",
    [({"classifier_type": "attention_probe", "steps": 30}, "threshold"), ({"depth": 3, "steps": 30}, "t_switch"),
     ({"depth": 3, "t_switch": 20, "classifier_type": "attention_probe"}, "threshold"),
     ({"depth": 1, "t_switch": 2, "classifier_type": "attention_probe", "threshold": 0.5}, "steps"),
     ({"depth": 1, "t_switch": 2, "classifier_type": "attention_probe", "threshold": 0.5, "steps": 4}, None)],
)  # fmt: skip
def test_the_workflows_composed_family_labels_are_the_tables(fields, knob):
    assert _common_smk_function("composed_family_label")(fields, knob) == composed_family_label(fields, knob)


def test_edge_thresholds_are_named_by_their_shortest_float_text(plans):
    _, commands = plans[EDGES]
    names = {Path(flags["--output-folder"]).name for name, flags in commands if name == "sample"}
    for text in ("1e-05", "0.05", "1.0", "0.30000000000000004"):
        assert f"ee_mlp_probe_per_layer_per_timestep_thr{text}" in names
    assert {"duodiff_d1_ts0", "duodiff_d1_ts6", "full_steps1", "full_steps5"} <= names


# ---- duodiff.core.study on its own ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, parsed",
    [
        ("real", ("real", {})),
        ("full", ("full", {})),
        ("full_steps20", ("fewer_steps", {"steps": "20"})),
        ("shallow_d3", ("shallow", {"depth": "3"})),
        ("ee_mlp_probe_per_layer_thr0.1", ("early_exit", {"classifier_type": "mlp_probe_per_layer", "threshold": "0.1"})),
        ("ee_mlp_probe_per_layer_per_timestep_thr1e-05",
         ("early_exit", {"classifier_type": "mlp_probe_per_layer_per_timestep", "threshold": "1e-05"})),
        ("duodiff_d3_ts10", ("duodiff", {"depth": "3", "t_switch": "10"})),
        ("cache_N3_k1", ("cache", {"cache_interval": "3", "cache_keep": "1"})),
    ],
)  # fmt: skip
def test_set_names_parse_into_method_and_fields(name, parsed):
    assert parse_set_name(name) == parsed


@pytest.mark.parametrize("name", ["shallow", "full_steps", "duodiff_d3", "ee_mlp_thr0.1", "ee_attention_probe_thrx",
                                  "duodiff_d3_ts-1", "Full", "full ", "cache_N3", "cache_N_k1", "cache_n3_k1"])
def test_names_of_no_known_form_are_refused_with_the_forms(name):
    with pytest.raises(DuodiffError, match=r"has none of the forms real, full, full_steps<steps>"):
        parse_set_name(name)


def test_set_names_are_built_with_the_shortest_threshold_text():
    assert set_name("early_exit", classifier_type="attention_probe", threshold=1) == "ee_attention_probe_thr1.0"
    assert set_name("early_exit", classifier_type="attention_probe", threshold=0.05) == "ee_attention_probe_thr0.05"
    assert set_name("duodiff", depth=3, t_switch=0) == "duodiff_d3_ts0"
    assert set_name("fewer_steps", steps=10) == "full_steps10"
    assert set_name("cache", cache_interval=4, cache_keep=2) == "cache_N4_k2"
    assert stats_method("cache_N4_k2") == "cache"


@pytest.mark.parametrize(
    "rows, style, label",
    [
        ([{"method": "early_exit", "threshold": 0.05}], "stats", "threshold=0.05"),
        ([{"method": "early_exit", "threshold": 0.05}], "table", "threshold = 0.05"),
        ([{"method": "early_exit", "threshold": 0.05}, {"method": "early_exit", "threshold": 0.1}], "plot", "τ=0.05, 0.1"),
        ([{"method": "duodiff", "t_switch": 300}], "stats", "t_switch=300"),
        ([{"method": "duodiff", "t_switch": 300}], "table", "t_switch = 300"),
        ([{"method": "duodiff", "t_switch": 300}], "plot", "tₛ=300"),
        ([{"method": "fewer_steps", "steps": 20}], "table", "20 steps"),
        ([{"method": "cache", "cache_interval": 3}], "stats", "N=3"),
        ([{"method": "cache", "cache_interval": 3}, {"method": "cache", "cache_interval": 4}], "plot", "N=3, 4"),
        ([{"method": "real", "n_samples": 1000}], "table", "1000 images"),
        ([{"method": "real"}], "stats", "real images not in the reference"),
        ([{"method": "full"}], "stats", "-"),
        ([{"method": "shallow"}], "table", "–"),
        ([{"method": "full"}], "plot", ""),
    ],
)  # fmt: skip
def test_setting_labels_in_each_style(rows, style, label):
    assert setting_label(*rows, style=style) == label


def test_the_vocabulary_is_a_leaf():
    tree = ast.parse((REPO / "src" / "duodiff" / "core" / "study.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert {name for name in imported if name.startswith("duodiff")} <= {"duodiff.core.errors"}
