"""The Snakemake report: its captions (workflow/report/*.rst) and the report itself.

Snakemake renders each caption as a Jinja template (with the job's `snakemake` object, whose
config is the validated experiment config) and then as reStructuredText. A caption that names a
config key an experiment lacks, or whose RST is malformed, breaks `snakemake --report`, so every
caption is rendered here for every shipped experiment config, strictly: undefined names and
docutils warnings are errors.

The last test builds the real report (`snakemake --report`) of the tiny test config over a
finished study: tables and plots made by `duodiff tables`/`duodiff plots` from hand-made sample
sets (test_tables.py, test_plots.py) at the paths the workflow expects, and, where Chromium is
installed, looks at it in a headless browser.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from PIL import Image
from docutils.core import publish_parts
from jinja2 import Environment, StrictUndefined
from snakemake.iocontainers import Namedlist
from snakemake.utils import validate

REPO = Path(__file__).resolve().parents[1]
REPORT = REPO / "workflow" / "report"
# The captions the rules reference (workflow/rules/*.smk) and the front page.
CAPTIONS = ["fid_table", "kid_table", "cmmd_table", "gflops_table", "summary", "quality_vs_gflops",
            "quality_vs_time", "exit_heatmap", "fid_vs_tswitch", "training_curves", "sample_grids", "grid",
            "workflow"]
CONFIGS = sorted(str(p.relative_to(REPO)) for p in [*(REPO / "config").glob("*.yaml"),
                                                    *(REPO / "tests" / "configs").glob("*.yaml")])
# grid.rst is rendered per sample set: (rule, set folder, wildcards).
GRID_JOBS = [
    ("sample_full", "full", {}),
    ("sample_shallow", "shallow_d3", {"depth": "3"}),
    ("sample_early_exit", "ee_attention_probe_thr0.1", {"classifier_type": "attention_probe", "threshold": "0.1"}),
    ("sample_duodiff", "duodiff_d3_ts20", {"depth": "3", "t_switch": "20"}),
]


def experiment_config(path):
    config = yaml.safe_load((REPO / path).read_text())
    validate(config, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))  # fills in the defaults
    return config


def render(name, snakemake):
    env = Environment(trim_blocks=True, lstrip_blocks=True, undefined=StrictUndefined)  # as Snakemake, but strict
    text = env.from_string((REPORT / f"{name}.rst").read_text()).render(snakemake=snakemake)
    # halt_level 2: a docutils warning (bad indentation, unknown target, ...) raises.
    html = publish_parts(text, writer="html", settings_overrides={"halt_level": 2, "report_level": 5})
    return text, html["html_body" if name == "workflow" else "body"]


def test_every_caption_the_rules_name_exists():
    rules = "\n".join(p.read_text() for p in (REPO / "workflow" / "rules").glob("*.smk"))
    named = {line.split("report/")[1].split(".rst")[0] for line in rules.splitlines() if "report/" in line
             and ".rst" in line and "{name}" not in line}
    assert named <= set(CAPTIONS)
    for name in CAPTIONS:
        assert (REPORT / f"{name}.rst").is_file(), name


@pytest.mark.parametrize("config_path", CONFIGS)
@pytest.mark.parametrize("name", [c for c in CAPTIONS if c != "grid"])
def test_caption_renders_for_every_experiment(config_path, name):
    config = experiment_config(config_path)
    text, html = render(name, SimpleNamespace(config=config))
    assert "{{" not in text and "{%" not in text
    assert f"``{config['experiment']}``" in text  # every caption says which experiment it shows
    assert "<p>" in html


@pytest.mark.parametrize("rule, set_name, wildcards", GRID_JOBS)
def test_grid_caption_describes_its_sample_set(rule, set_name, wildcards):
    config = experiment_config("config/config.yaml")
    output = Namedlist(fromdict={"stats": f"results/digits/samples/{set_name}/stats.json"})
    job = SimpleNamespace(config=config, rule=rule, output=output,
                          wildcards=Namedlist(fromdict={"experiment": "digits", **wildcards}))
    text, _ = render("grid", job)
    assert f"``{set_name}``" in text
    expected = {"sample_full": "The full U-ViT", "sample_shallow": "The 3-block shallow U-ViT alone",
                "sample_early_exit": "``attention_probe`` probe at\nthreshold 0.1",
                "sample_duodiff": "the first\n20 of 40 sampling steps"}[rule]
    assert expected in text


def test_front_page_states_the_configured_study():
    # The grids are set here, not read from the shipped default, so that retuning the default
    # cannot break (or silently pass) this check.
    config = experiment_config("config/config.yaml")
    config["early_exit"]["thresholds"] = [0.05, 0.1, 0.2]
    config["duodiff"]["t_switch"] = [10, 20, 30]
    config["sampling"]["precision"] = "fp16"
    text, html = render("workflow", SimpleNamespace(config=config))
    assert "experiment ``digits``" in text and "network arithmetic\n(fp16)" in text
    assert "thresholds:\n  0.05, 0.1, 0.2" in text and "t_switch: 10, 20, 30" in text
    for arxiv in ("2209.12152", "2309.17074", "2410.09633"):
        assert f'href="https://arxiv.org/abs/{arxiv}"' in html


TINY = "tests/configs/tiny.yaml"


def tiny_sets(config):
    """The sample sets the tiny config asks for, named as docs/architecture.md says."""
    full_depth = yaml.safe_load((REPO / config["models"]["full"]).read_text())["depth"]
    depths = [yaml.safe_load((REPO / path).read_text())["depth"] for path in config["models"]["shallow"]]
    sets = {"full": ("full", None, None, None, full_depth)}
    sets |= {f"shallow_d{d}": ("shallow", None, None, None, d) for d in depths}
    sets |= {f"ee_{c}_thr{float(t)!r}": ("early_exit", c, float(t), None, full_depth)
             for c in config["early_exit"]["classifier_types"] for t in config["early_exit"]["thresholds"]}
    sets |= {f"duodiff_d{d}_ts{t}": ("duodiff", None, None, t, full_depth)
             for d in depths for t in config["duodiff"]["t_switch"]}
    return sets


@pytest.mark.slow
def test_report_of_a_finished_tiny_study_builds_and_shows(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_plots import write_plot_inputs
    from test_tables import STEPS, write_study

    from duodiff.plots import run_plots
    from duodiff.tables import run_tables

    config = yaml.safe_load((REPO / TINY).read_text())
    # Metric numbers do not matter here, only that every output the report flags exists.
    study = {name: (method, classifier, threshold, t_switch, 20.0 + i, 0.01, 0.5, 50.0 + i, 22.75 - i, 1.0)
             for i, (name, (method, classifier, threshold, t_switch, _)) in enumerate(tiny_sets(config).items())}
    for name in ("config", "tests", "profiles"):
        (tmp_path / name).symlink_to(REPO / name)
    results, experiment = tmp_path / "results", tmp_path / "results" / config["experiment"]
    write_study(experiment, study)
    # The hand-made exit layers have test_tables.STEPS steps; a t_switch beyond them is clipped.
    write_plot_inputs(experiment, {k: v if v[0] != "duodiff" else v[:3] + (min(v[3], STEPS),) + v[4:]
                                   for k, v in study.items()}, grids=list(study))
    run_tables(samples_root=experiment / "samples", metrics_root=experiment / "metrics", sets=list(study),
               output_dir=results / "tables")
    run_plots(tables_dir=results / "tables", samples_root=experiment / "samples", models_root=experiment / "models",
              reference=experiment / "reference", output_dir=results / "plots", dpi=60)

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    run = subprocess.run([str(bin_dir / "snakemake"), "--snakefile", str(REPO / "workflow" / "Snakefile"),
                          "--directory", str(tmp_path), "--configfile", TINY, "--report", "results/report.html"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    page = (results / "report.html").read_text()
    # Self-contained: the figures are embedded, nothing is fetched from elsewhere.
    assert "data:image/png;charset=utf8;filename=exit_heatmap.png;base64," in page and 'src="http' not in page
    for phrase in ("duodiff: faster U-ViT sampling without losing quality", "Quality against compute",
                   "Where early exit exits", "Summary table", "Training curves", "Sample grid of set"):
        assert phrase in page, phrase

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium to look at the report with")
    shot = tmp_path / "report.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    f"--screenshot={shot}", "--window-size=1400,1000", (results / "report.html").as_uri()],
                   capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (1000, 1400)
    # A page that failed to render is one flat colour (the loading screen or blank); text is not.
    assert pixels.std() > 20 and (pixels < 100).mean() > 0.01
