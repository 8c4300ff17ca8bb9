"""The Snakemake report: its captions (workflow/report/*.rst) and the report itself.

Snakemake renders each caption as a Jinja template (with the job's `snakemake` object, whose
config is the validated experiment config) and then as reStructuredText. A caption that names a
config key an experiment lacks, or whose RST is malformed, breaks `snakemake --report`, so every
caption is rendered here for every shipped experiment config, strictly: undefined names and
docutils warnings are errors.

The last tests build the real report (`snakemake --report`) of the tiny test config over a
finished study: tables and plots made by `duodiff tables`/`duodiff plots` from hand-made sample
sets (test_tables.py, test_plots.py) at the paths the workflow expects, and, where Chromium is
installed, open every page of it in a headless Chromium through selenium at 1400x900.
"""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from _defaults import cli_args
from docutils.core import publish_parts
from jinja2 import Environment, StrictUndefined
from snakemake.iocontainers import Namedlist
from snakemake.utils import validate

REPO = Path(__file__).resolve().parents[1]
REPORT = REPO / "workflow" / "report"
# The captions the rules reference (workflow/rules/*.smk) and the front page.
CAPTIONS = ["scores_table", "operating_points", "fid_table", "kid_table", "cmmd_table", "gflops_table", "summary", "quality_vs_gflops",
            "paired_difference",
            "quality_vs_time", "exit_heatmap", "mean_exit_layer", "fid_vs_tswitch", "training_curves", "sample_grids", "grid",
            "search_trace", "search_table", "reference_grid", "workflow"]
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
             and ".rst" in line and "{" not in line}
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


def test_front_page_states_the_inception_budget_and_mode():
    config = experiment_config("config/config.yaml")
    config["metrics"]["fid"].update(max_samples=20, max_reference=400, mode="clean")
    text, _ = render("workflow", SimpleNamespace(config=config))
    assert "``clean`` mode" in text and "the first 20 samples of each set" in " ".join(text.split())
    assert "against 400 real" in " ".join(text.split())
    config["metrics"]["fid"].update(max_samples=None, max_reference=None, mode="legacy_pytorch")
    config["reference"]["n_reference"] = 797
    text, _ = render("workflow", SimpleNamespace(config=config))
    assert "``legacy_pytorch`` mode" in text and "features of the samples against 797 real" in " ".join(text.split())


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


def build_tiny_report(tmp_path):
    """`snakemake --report` of the tiny config over a finished study made by hand in tmp_path;
    return the report's path."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_plots import write_plot_inputs
    from test_tables import STEPS, write_study

    from duodiff.report.plots.quality import run_plots
    from duodiff.report.tables.collect import run_tables

    config = yaml.safe_load((REPO / TINY).read_text())
    # The study made by hand below has the classic sets and Inception scores only: no fewer-steps,
    # caching, Learning-to-Cache or composed sets, no real-data set, no classifier headline, no search (tests/test_tiny_study.py
    # runs those for real).
    config["sampling"]["fewer_steps"], config["reference"]["n_real"], config["composed"] = [], 0, []
    config["search"]["enabled"], config["cache"]["interval"] = False, []
    config["learning_to_cache"]["thresholds"] = []
    config["metrics"]["headline"] = "inception"
    config_path = tmp_path / "tiny_report.yaml"
    config_path.write_text(yaml.safe_dump(config))
    # Metric numbers do not matter here, only that every output the report flags exists.
    study = {name: (method, classifier, threshold, t_switch, 20.0 + i, 0.01, 0.5, 50.0 + i, 22.75 - i, 1.0)
             for i, (name, (method, classifier, threshold, t_switch, _)) in enumerate(tiny_sets(config).items())}
    for name in ("config", "tests", "profiles"):
        (tmp_path / name).symlink_to(REPO / name)
    experiment = tmp_path / "results" / config["experiment"]
    write_study(experiment, study)
    # The hand-made exit layers have test_tables.STEPS steps; a t_switch beyond them is clipped.
    write_plot_inputs(experiment, {k: v if v[0] != "duodiff" else v[:3] + (min(v[3], STEPS),) + v[4:]
                                   for k, v in study.items()}, grids=list(study))
    run_tables(**cli_args("tables", samples_root=experiment / "samples", metrics_root=experiment / "metrics",
                          sets=list(study), output_dir=experiment / "tables"))
    # At the schema's default resolution, so that the figures have the size a real report shows
    # (some are taller than the browser test's window, some wider than its pane).
    run_plots(**cli_args("plots", tables_dir=experiment / "tables", samples_root=experiment / "samples",
                         models_root=experiment / "models", reference=experiment / "reference",
                         output_dir=experiment / "plots", dpi=150))

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    run = subprocess.run([str(bin_dir / "snakemake"), "--snakefile", str(REPO / "workflow" / "Snakefile"),
                          "--directory", str(tmp_path), "--configfile", str(config_path), "--report",
                          f"results/{config['experiment']}/report.html"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return experiment / "report.html"


@pytest.fixture(scope="session")
def tiny_report(tmp_path_factory):
    """One report of the tiny study, shared by the tests that read or look at it."""
    return build_tiny_report(tmp_path_factory.mktemp("tiny_report"))


@pytest.mark.slow
def test_report_of_a_finished_tiny_study_builds(tiny_report):
    page = tiny_report.read_text()
    # Self-contained: the figures are embedded, nothing is fetched from elsewhere.
    assert "data:image/png;charset=utf8;filename=exit_heatmap.png;base64," in page and 'src="http' not in page
    for phrase in ("duodiff: faster U-ViT sampling without losing quality", "Quality against compute",
                   "Where early exit exits", "Summary table", "Training curves", "Sample grid of set"):
        assert phrase in page, phrase


# ---- the report in a browser ---------------------------------------------------------------------
# Chromium driven by selenium through Debian's chromium-driver (chromedriver, the same version as
# chromium; .ci/run installs both). Nothing is downloaded: the browser and driver are the ones on
# PATH, so selenium's own driver manager never runs.

WINDOW = (1400, 900)
REPORT_READY = ("return document.querySelector('#loading-screen').style.display === 'none'"
                " && !!document.querySelector('nav a')")
# Snakemake's report: the navbar (menu) on the left, then the pane that shows the page or result.
PANE = "document.querySelector('#app > div > div:last-child')"
# Where the pane's content is: the front page's title, or the image or frame of an item; and
# whether the pane or the frame is scrolled.
SHOWN = f"""
    const pane = {PANE}, box = pane.getBoundingClientRect();
    const inner = pane.querySelector('h1.title') || pane.querySelector('img:not([hidden]), iframe') || pane.firstElementChild;
    const r = inner.getBoundingClientRect();
    return {{kind: inner.tagName.toLowerCase(), top: r.top - box.top, left: r.left - box.left, right: r.right - box.left,
             height: r.height, pane_height: pane.clientHeight, pane_scroll_top: pane.scrollTop,
             pane_width: pane.clientWidth, pane_scroll_width: pane.scrollWidth,
             loaded: inner.tagName !== 'IMG' || (inner.complete && inner.naturalWidth > 0)}};"""
# The first heading of an html item, in its frame's own document.
FRAME_SHOWN = """
    const heading = document.querySelector('h1, h2'), r = heading.getBoundingClientRect();
    return {ready: document.readyState === 'complete', title: heading.textContent.trim(), title_top: r.top,
            title_bottom: r.bottom, height: document.documentElement.clientHeight, scroll_y: window.scrollY,
            scroll_width: document.documentElement.scrollWidth, width: document.documentElement.clientWidth,
            text: document.body.innerText.slice(0, 200)};"""


def find_browser() -> tuple[str, str] | None:
    """(chromium, chromedriver) on PATH, or None."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


class Page:
    """A headless Chromium window of WINDOW's size, through selenium."""

    def __init__(self, chromium: str, chromedriver: str, width: int, height: int):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--hide-scrollbars", "--no-first-run", f"--window-size={width},{height}"):
            options.add_argument(argument)
        self.driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
        # The viewport exactly WINDOW, whatever the headless window's frame.
        self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                    {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    def __enter__(self) -> "Page":
        return self

    def __exit__(self, *exc) -> None:
        self.driver.quit()

    def evaluate(self, body: str, *args):
        return self.driver.execute_script(body, *args)

    def wait_for(self, body: str, what: str, timeout: float = 30.0):
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, timeout, poll_frequency=0.1).until(
            lambda driver: driver.execute_script(body), message=f"timed out waiting for {what}")

    def in_frame(self, body: str, what: str):
        """Run body in the shown item's frame (its own document) once that has loaded."""
        self.driver.switch_to.frame(self.driver.find_element("css selector", "#app iframe"))
        try:
            self.wait_for("return document.readyState === 'complete' && !!document.querySelector('h1, h2')", what)
            return self.evaluate(body)
        finally:
            self.driver.switch_to.default_content()

    def screenshot(self, path: Path) -> None:
        self.driver.save_screenshot(str(path))


def menu_entries(page):
    """The navbar's links, top to bottom, as shown."""
    return page.evaluate("return [...document.querySelectorAll('nav a')].map(a => a.textContent.trim()).filter(t => t)")


def click_menu(page, text):
    found = page.evaluate("""
        const link = [...document.querySelectorAll('nav a')].find(a => a.textContent.trim() === arguments[0]);
        if (link) link.click();
        return !!link;""", text)
    assert found, f"no menu entry {text!r} in {menu_entries(page)}"


def menu_items(page, category, subcategory=None):
    """Navigate the menu (no reload: what was scrolled stays scrolled) to a category's items;
    return their names."""
    if "Results" in menu_entries(page):  # inside a category: back to the list of categories
        click_menu(page, "Results")
    click_menu(page, category)
    if subcategory is not None:
        click_menu(page, subcategory)
    page.wait_for("return !!document.querySelector('nav tbody tr a[type=button]')", what=f"{category}'s items")
    return page.evaluate("return [...document.querySelectorAll('nav tbody tr')].map(r => r.textContent.trim())")


def scroll_to_bottom(page, view):
    """Scroll what the reader sees to its end: the pane, and an html item's frame."""
    page.evaluate(f"{PANE}.scrollTop = {PANE}.scrollHeight")
    if view.get("kind") == "iframe":
        page.driver.switch_to.frame(page.driver.find_element("css selector", "#app iframe"))
        page.evaluate("window.scrollTo(0, document.documentElement.scrollHeight)")
        page.driver.switch_to.default_content()
    return page.evaluate(f"return {PANE}.scrollTop")


def show_item(page, row: int) -> dict:
    """Click the view button of the row-th listed item; where it sits (SHOWN), and for an html
    item where its title is in its frame (FRAME_SHOWN)."""
    button = f"document.querySelectorAll('nav tbody tr')[{row}].querySelector('a[type=button]')"
    view = {"name": page.evaluate(f"return document.querySelectorAll('nav tbody tr')[{row}].textContent.trim()"),
            "download": page.evaluate(f"return {button}.hasAttribute('download')")}
    if view["download"]:  # a file offered for download only, not shown
        return view
    page.evaluate(f"{button}.click()")
    # (Two items may show the same image: the hand-made study's sets share one grid.)
    page.wait_for(f"const s = (() => {{ {SHOWN} }})(); return s.kind !== 'div' && s.kind !== 'h1' && s.loaded",
                  what=f"{view['name']} to show")
    time.sleep(0.5)  # layout settles (the image's scaling, the frame's page)
    view.update(page.evaluate(SHOWN))
    if view["kind"] == "iframe":
        view["frame"] = page.in_frame(FRAME_SHOWN, what=f"{view['name']}'s page")
    return view


def look_at_report(report: Path, shots: Path, browser: tuple[str, str]) -> dict:
    """Open the report's front page, then every item of every category (and subcategory) in menu
    order, as a reader would (menu clicks, no reloads), each after scrolling the one before to
    its end, in a WINDOW-sized headless Chromium; screenshot each into shots/ and return
    {"front page": SHOWN and the answer table's place, "categories": [in menu order],
    category: [show_item of each item, with "scrolled_before": how far the pane was scrolled]}."""
    shots.mkdir(parents=True, exist_ok=True)
    seen = {}
    with Page(*browser, *WINDOW) as page:
        page.driver.get(report.as_uri())
        page.wait_for(REPORT_READY, what="the report to render")
        page.screenshot(shots / "0_front_page.png")
        seen["front page"] = page.evaluate(SHOWN)
        seen["answer"] = page.evaluate(f"""
            const table = {PANE}.querySelector('.duodiff-answer table');
            if (!table) return null;
            const r = table.getBoundingClientRect(), box = {PANE}.getBoundingClientRect();
            return {{top: r.top - box.top, bottom: r.bottom - box.top, right: r.right - box.left,
                     text: table.closest('.duodiff-answer').innerText,
                     graph_left: Math.min(...[...{PANE}.querySelectorAll('svg, canvas')]
                                          .map(e => e.getBoundingClientRect().left - box.left)
                                          .filter(x => x > 0), 1e9)}};""")
        view = {"kind": "h1"}
        categories = page.evaluate("return Object.keys(categories)")
        seen["categories"] = [entry for entry in menu_entries(page) if entry in categories]
        for number, category in enumerate(seen["categories"], 1):
            subcategories = page.evaluate("return Object.keys(categories[arguments[0]])", category)
            seen[category] = []
            for subcategory in sorted(subcategories) if len(subcategories) > 1 else [None]:
                for row in range(len(menu_items(page, category, subcategory))):
                    scrolled = scroll_to_bottom(page, view)
                    menu_items(page, category, subcategory)
                    view = show_item(page, row)
                    view["scrolled_before"] = scrolled
                    view["subcategory"] = subcategory
                    seen[category].append(view)
                    name = re.sub(r"[^A-Za-z0-9]+", "_", f"{category} {subcategory or ''} {view['name']}").strip("_")
                    page.screenshot(shots / f"{number}.{len(seen[category])}_{name[:60]}.png")
        # The tallest figure, scrolled to its end, then opened again: Snakemake reuses the same
        # <img> (and the pane) for it, so only a reset of the scroll position opens it at its top.
        category, row = max(((c, i) for c in seen["categories"] for i, v in enumerate(seen[c]) if v.get("kind") == "img"),
                            key=lambda ci: seen[ci[0]][ci[1]]["height"])
        subcategory = seen[category][row]["subcategory"]
        first = next(i for i, v in enumerate(seen[category]) if v["subcategory"] == subcategory)
        menu_items(page, category, subcategory)
        view = show_item(page, row - first)
        scrolled = scroll_to_bottom(page, view)
        view = show_item(page, row - first)
        seen["reopened"] = {**view, "scrolled_before": scrolled}
        page.screenshot(shots / "5_reopened_after_scrolling.png")
    return seen


@pytest.mark.slow
def test_report_pages_open_at_their_top_in_a_browser(request, tmp_path):
    """The answer on the front page, and every page readable from its top in a 1400x900 window
    whatever was scrolled before (Snakemake centres its content pane, which cuts off the top of
    anything taller: workflow/report/report.css; and keeps the pane's scroll position from item to
    item: the front page's reset, workflow/report/workflow.rst); tables shown, not only offered as
    downloads."""
    browser = find_browser()
    if browser is None:
        pytest.skip("no chromium and chromedriver on PATH (Debian: apt-get install chromium chromium-driver; "
                    ".ci/run installs them), so the report was not opened in a browser")
    pytest.importorskip("selenium")
    # DUODIFF_REPORT_SCREENSHOTS=dir keeps the screenshots for a human to look at.
    shots = Path(os.environ.get("DUODIFF_REPORT_SCREENSHOTS") or tmp_path / "screenshots")
    seen = look_at_report(request.getfixturevalue("tiny_report"), shots, browser)  # built only with a browser

    front = seen["front page"]
    assert front["top"] >= 0 and front["left"] >= 0, front  # its title, not its middle, at the top
    # The answer first: the operating-point table on the front page, in view without scrolling,
    # beside (not under) the rule graph, with readable names and no set ids.
    answer = seen["answer"]
    assert answer is not None, "the front page has no operating-point table"
    assert 0 <= answer["top"] and answer["bottom"] <= WINDOW[1], answer
    assert answer["right"] <= answer["graph_left"] + 1, answer
    assert answer["text"].startswith("Speed-up at equal quality"), answer
    assert "Early exit, attention probe" in answer["text"] and "DuoDiff, shallow depth 3" in answer["text"], answer
    assert not re.search(r"\bee_|_probe|duodiff_d\d|shallow_d\d|full_steps", answer["text"]), answer

    assert seen["categories"] == ["1. Main result", "2. Plots", "3. Tables", "4. Samples"]
    for category in seen["categories"]:
        for view in seen[category]:
            assert not view["download"], (category, view)  # every table shown, not only downloadable
            # Opened at its top although the page before was scrolled to its end, and whole in width.
            assert view["pane_scroll_top"] == 0 and 0 <= view["top"] < view["pane_height"], (category, view)
            assert view["left"] >= 0 and view["right"] <= view["pane_width"] + 1, (category, view)
            assert view["pane_scroll_width"] <= view["pane_width"] + 1, (category, view)
            if view["kind"] == "iframe":  # an html page: its own title in view, unscrolled, no sideways scrolling
                frame = view["frame"]
                assert frame["scroll_y"] == 0 and 0 <= frame["title_top"] < frame["height"], (category, view)
                assert frame["scroll_width"] <= frame["width"], (category, view)
    # Scrolling happened: the front page and at least one item were taller than their window.
    assert any(view["scrolled_before"] > 0 for views in map(seen.get, seen["categories"]) for view in views)
    reopened = seen["reopened"]  # the same tall figure again, after scrolling it to its end
    assert reopened["scrolled_before"] > 0 and reopened["pane_scroll_top"] == 0, reopened
    assert 0 <= reopened["top"] < reopened["pane_height"], reopened

    summary, figure, paired = seen["1. Main result"]
    assert summary["name"] == "1. Summary table" and summary["kind"] == "iframe"
    assert summary["frame"]["text"].startswith("Speed-up at equal quality"), summary
    assert figure["name"] == "2. FID against GFLOPs per image"  # this report's headline is Inception
    assert figure["kind"] == "img" and paired["name"] == "3. Equal quality, paired" and paired["kind"] == "img"
    # Readable menus: every plot by its title, every table by its CSV, the real images first among the samples.
    assert [view["name"] for view in seen["2. Plots"]][:2] == ["1. FID against sampling time", "2. Where early exit exits"]
    assert all(view["kind"] == "iframe" and view["name"].endswith(".csv)") for view in seen["3. Tables"])
    samples = seen["4. Samples"]
    assert samples[0]["subcategory"] == "0. Real images" and samples[0]["kind"] == "img", samples[0]
    assert not any(re.search(r"\bee_|duodiff_d\d", view["name"]) for view in samples), [v["name"] for v in samples]
