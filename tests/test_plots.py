"""`duodiff plots` on the hand-made study of test_tables.py.

Each figure must be a real image (PIL opens the png, the pdf starts with %PDF) and must show the
numbers it claims: run_plots records the series as drawn (read back from the matplotlib
artists) in <name>.json, and the tests compare those with the fixture's numbers, with the Pareto
fronts, heat-map fractions and smoothed losses worked out by hand.
"""

import itertools
import json
import re
import zlib

import numpy as np
import pandas as pd
import pytest
import torch
from _defaults import cli_args
from matplotlib import rc_context
from matplotlib.text import Text
from PIL import Image
from test_tables import ORDER, STEPS, STUDY, tables, write_study

import duodiff.report.plots.training as plot_training
from duodiff.core.errors import DuodiffError
from duodiff.report.plots.labels import text_overlaps
from duodiff.report.plots.quality import PLOT_NAMES, load_table, plot_quality_vs_gflops, run_plots
from duodiff.report.plots.samples import grid_from_images
from duodiff.report.plots.style import STYLE, Palette

# Exit layers (steps=4, n=5) of one early-exit set, and by hand the fraction exiting at each layer.
EE_LAYERS = [[0, 0, 1, 13, 13],
             [2, 2, 2, 2, 13],
             [13, 13, 13, 13, 13],
             [5, 6, 5, 6, 5]]
EE_FRACTIONS = {(0, 0): 0.4, (1, 0): 0.2, (13, 0): 0.4,  # (layer, step): fraction
                (2, 1): 0.8, (13, 1): 0.2,
                (13, 2): 1.0,
                (5, 3): 0.6, (6, 3): 0.4}
EE_MEAN = [5.4, 4.2, 13.0, 5.4]  # (0+0+1+13+13)/5, (4*2+13)/5, 13, (3*5+2*6)/5
GRID_PNG_SHAPE = (30, 40, 3)     # full's grid.png; the other sets rebuild their grid from images/
N_SET_IMAGES = 3
LOSSES = [4.0, 2.0, 1.0]
# Debiased EMA with weight 0.5: 4; (0.5*2 + 0.5*4 ... ) = (0.5*4*0.5 + 0.5*2) / (1 - 0.25) = 2/0.75;
# (0.25*4 + 0.5*2 + 1) * 0.5 / (1 - 0.125) = 1.5 / 0.875.
SMOOTHED = [4.0, 2.0 / 0.75, 1.5 / 0.875]


def exit_layers_of(name, spec):
    method = spec[0]
    if name == "ee_attention_probe_thr0.05":
        return torch.tensor(EE_LAYERS)
    if method == "early_exit":
        return torch.tensor(EE_LAYERS).flip(0)
    if method == "duodiff":
        t_switch = spec[3]
        return torch.tensor([[3] * 5] * t_switch + [[13] * 5] * (STEPS - t_switch))
    return torch.full((STEPS, 5), 3 if method == "shallow" else 13)


def write_plot_inputs(root, study=STUDY, grids=("full",)):
    """What run_plots reads besides the tables: exit layers, samples (grid.png for the sets in
    `grids`, images/ for the others), real images, loss logs."""
    rng = np.random.default_rng(0)
    for name, spec in study.items():
        folder = root / "samples" / name
        torch.save(exit_layers_of(name, spec), folder / "exit_layers.pt")
        if name in grids:
            Image.fromarray(np.full(GRID_PNG_SHAPE, 200, np.uint8)).save(folder / "grid.png")
        else:
            (folder / "images").mkdir()
            for i in range(N_SET_IMAGES):
                Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / "images" / f"{i:06d}.png")
    (root / "reference" / "images").mkdir(parents=True)
    for i in range(70):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / "reference" / "images" / f"{i:06d}.png")
    # The early-exit model logs loss terms; loss_unweighted was switched off (all zero).
    for model, parts in [("full", ""), ("shallow_d3", ""), ("ee_attention_probe", ",loss_simple,loss_u,loss_unweighted")]:
        (root / "models" / model).mkdir(parents=True)
        rows = [f"{10 * (i + 1)},{loss},0.0002,5.0" + (f",{loss / 2},{loss / 4},0.0" if parts else "")
                for i, loss in enumerate(LOSSES)]
        (root / "models" / model / "loss.csv").write_text("step,loss,lr,steps_per_s" + parts + "\n" + "\n".join(rows) + "\n")


def plots(root, **kwargs):
    return run_plots(**cli_args("plots", tables_dir=root / "tables", samples_root=root / "samples",
                                models_root=root / "models", reference=root / "reference", output_dir=root / "plots",
                                **{"smoothing": 0.5, "dpi": 60, **kwargs}))


@pytest.fixture(scope="session")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    write_study(root)
    write_plot_inputs(root)
    tables(root)
    write_search(root)
    data = plots(root)
    return root, data


def write_search(root):
    """search.csv as `duodiff tables` writes it for one family: two grid seeds (round 0), then two
    bisection probes between the pass at 0.1 and the failure at 0.3."""
    trace = [(0, "grid", 0.1, 0.02, -0.05, 0.09, "equal"), (0, "grid", 0.3, 0.40, 0.25, 0.55, "worse"),
             (1, "search", 0.2, 0.15, 0.05, 0.25, "worse"), (2, "search", 0.15, 0.06, -0.01, 0.11, "equal")]
    rows = [{"family": "early_exit-attention_probe", "label": "early exit, attention_probe", "round": r, "source": source,
             "set": f"ee_attention_probe_thr{value}", "knob": "threshold", "value": value, "score_name": "FD",
             "score": 1.2 + diff, "score_diff": diff, "score_diff_ci_low": low, "score_diff_ci_high": high,
             "verdict": verdict, "margin": 0.1, "quality_limit": 0.12, "speedup_theoretical": 1 + value,
             "speedup_measured": 1 + value, "stopped": "budget exhausted", "best": "ee_attention_probe_thr0.15",
             "note": ""} for r, source, value, diff, low, high, verdict in trace]  # fmt: skip
    pd.DataFrame(rows).to_csv(root / "tables" / "search.csv", index=False)


def series(data, label):
    (found,) = [s for s in data["series"] if s["label"] == label]
    return found


def column(names, index):
    return [STUDY[name][index] for name in names]


def test_every_figure_is_a_png_and_a_pdf_with_its_data(study):
    root, data = study
    for name in PLOT_NAMES:
        with Image.open(root / "plots" / f"{name}.png") as image:
            image.verify()
            assert image.format == "PNG" and min(image.size) > 150
        assert (root / "plots" / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"
        assert json.loads((root / "plots" / f"{name}.json").read_text()) == json.loads(json.dumps(data[name]))


COLUMN_WIDTH_PT = 3.3 * 72  # a two-column paper's column


def pdf_text_sizes(path):
    """The size (pt) of every text a matplotlib PDF draws, read from the font operators ("/F1 7.5 Tf")
    of its content streams, and the page's width (pt)."""
    raw = path.read_bytes()
    x0, _, x1, _ = map(float, re.search(rb"/MediaBox\s*\[\s*([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*\]", raw).groups())
    sizes = []
    for stream in re.findall(rb"stream\r?\n(.*?)endstream", raw, re.S):
        try:
            content = zlib.decompress(stream)
        except zlib.error:
            continue
        sizes += [float(size) for size in re.findall(rb"/F\d+\s+([\d.]+)\s+Tf", content)]
    return sizes, x1 - x0


def test_every_figure_is_legible_at_a_papers_column_width(study):
    # Each PDF scaled to a 3.3-inch column: its smallest text must still print at 6 pt or more.
    root, _ = study
    for name in PLOT_NAMES:
        sizes, width = pdf_text_sizes(root / "plots" / f"{name}.pdf")
        assert len(sizes) > 5, name
        assert min(sizes) * COLUMN_WIDTH_PT / width >= 6.0, (name, min(sizes), width / 72)


def test_quality_vs_gflops_plots_the_table_values(study):
    _, data = study
    quality = data["quality_vs_gflops"]
    attention = ["ee_attention_probe_thr0.05", "ee_attention_probe_thr0.1"]  # by threshold
    # x: GFLOPs per image (per forward x STEPS), so fewer sampling steps show as less compute too.
    per_image = lambda sets: [pytest.approx(v * STEPS) for v in column(sets, 8)]  # noqa: E731
    assert series(quality, "early exit, attention_probe") == {
        "label": "early exit, attention_probe", "x": per_image(attention), "y": column(attention, 4)}
    assert series(quality, "early exit, mlp_probe_per_layer")["y"] == [30.0]
    duodiff = ["duodiff_d3_ts1", "duodiff_d3_ts3"]  # by t_switch
    assert series(quality, "DuoDiff, 3-block shallow")["x"] == per_image(duodiff)
    assert series(quality, "DuoDiff, 3-block shallow")["y"] == column(duodiff, 4)
    assert series(quality, "full U-ViT (13 blocks)") | {"label": None} == {"label": None, "x": [22.75 * STEPS], "y": [20.0]}
    assert series(quality, "shallow alone (3 blocks)")["x"] == [5.25 * STEPS]
    # By hand: only full is beaten on both axes (duodiff ts1: 19.25 GFLOPs, FID 19.5 < 22.75, 20).
    front = ["shallow_d3", "ee_mlp_probe_per_layer_thr0.1", "ee_attention_probe_thr0.1", "duodiff_d3_ts3",
             "ee_attention_probe_thr0.05", "duodiff_d3_ts1"]
    assert quality["pareto"] == front
    assert series(quality, "Pareto front")["x"] == per_image(front)
    assert {tuple(a["sets"]): a["text"] for a in quality["annotations"]} == {
        ("ee_attention_probe_thr0.05",): "τ=0.05", ("ee_attention_probe_thr0.1",): "τ=0.1",
        ("ee_mlp_probe_per_layer_thr0.1",): "τ=0.1", ("duodiff_d3_ts1",): "tₛ=1", ("duodiff_d3_ts3",): "tₛ=3"}


def test_settings_on_the_same_point_share_one_annotation(tmp_path):
    # Two thresholds at which nothing exits: same FID, same cost, one label "τ=0.05, 0.1".
    study = {name: STUDY[name] for name in ("full", "ee_attention_probe_thr0.05", "ee_attention_probe_thr0.1")}
    study["ee_attention_probe_thr0.1"] = study["ee_attention_probe_thr0.05"][:2] + (0.1,) + study["ee_attention_probe_thr0.05"][3:]
    write_study(tmp_path, study)
    tables(tmp_path, sets=list(study))
    figure, data = plot_quality_vs_gflops(load_table(tmp_path / "tables"), Palette(load_table(tmp_path / "tables")))
    assert [(a["sets"], a["text"]) for a in data["annotations"]] == [
        (["ee_attention_probe_thr0.05", "ee_attention_probe_thr0.1"], "τ=0.05, 0.1")]
    assert [t.get_text() for t in figure.axes[0].texts] == ["τ=0.05, 0.1"]


# A crowded sweep like the digits study's: four probes whose points at each threshold nearly
# coincide, DuoDiff among them, and the shallow model far off (it squeezes the rest together).
PROBES = ["attention_probe", "mlp_probe_per_layer", "mlp_probe_per_timestep", "mlp_probe_per_layer_per_timestep"]
CROWDED = {
    "full": STUDY["full"], "shallow_d3": STUDY["shallow_d3"],
    **{f"ee_{probe}_thr{thr:g}": ("early_exit", probe, thr, None, 20.0 + 10 * thr**2 + 0.1 * i, 0.01, None, 50.0,
                                  20.0 - 20 * thr + 0.3 * i, 1.0)
       for i, probe in enumerate(PROBES) for thr in (0.1, 0.2, 0.3)},
    **{f"duodiff_d3_ts{ts}": ("duodiff", None, None, ts, 20.2 + 0.3 * ts, 0.01, None, 50.0, 22.0 - 2 * ts, 1.0)
       for ts in (1, 2, 3)},
}


def overlap(a, b):
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_point_labels_of_a_crowded_sweep_never_overlap(tmp_path):
    write_study(tmp_path, CROWDED)
    tables(tmp_path, sets=list(CROWDED))
    table = load_table(tmp_path / "tables")
    with rc_context(STYLE):
        fig, data = plot_quality_vs_gflops(table, Palette(table))
        fig.canvas.draw()
    ax = fig.axes[0]
    labels = ax.texts
    assert len(labels) >= 3
    boxes = [Text.get_window_extent(label) for label in labels]  # the text's own box, without a leader line
    for i, j in itertools.combinations(range(len(boxes)), 2):
        assert not overlap(boxes[i], boxes[j]), (labels[i].get_text(), labels[j].get_text())
    frame = ax.get_window_extent()
    for label, box in zip(labels, boxes):
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, label.get_text()
        # Beside a point of its setting (within 10 pt: GFLOPs per image, FID), or joined to it by a line.
        points = ax.transData.transform([(spec[8] * STEPS, spec[4]) for name, spec in CROWDED.items()
                                         if setting_of(name) == label.get_text()])
        gaps = [max(box.x0 - x, x - box.x1, box.y0 - y, y - box.y1, 0.0) * 72 / fig.dpi for x, y in points]
        assert min(gaps) <= 10 or label.arrow_patch is not None, label.get_text()
    # Every setting of the sweep is named by exactly one label, which reads its setting.
    named = [name for a in data["annotations"] for name in a["sets"]]
    assert sorted(named) == sorted(name for name in CROWDED if name.startswith(("ee_", "duodiff_")))
    for a in data["annotations"]:
        assert {a["text"]} == {setting_of(name) for name in a["sets"]}


def setting_of(name):
    """A CROWDED set's label text: τ=<threshold> or tₛ=<t_switch>."""
    spec = CROWDED[name]
    return f"τ={spec[2]:g}" if spec[0] == "early_exit" else f"tₛ={spec[3]}"


def test_quality_vs_time_uses_milliseconds_per_image(study):
    _, data = study
    quality = data["quality_vs_time"]
    assert series(quality, "DuoDiff, 3-block shallow")["x"] == pytest.approx([1000 / 60.0, 1000 / 100.0])
    assert series(quality, "full U-ViT (13 blocks)")["x"] == pytest.approx([1000 / 50.0])
    # By hand: duodiff ts3 (10 ms, FID 24) beats mlp (14.3 ms, 30) and attention 0.1 (16 ms, 25);
    # duodiff ts1 (16.7 ms, 19.5) beats attention 0.05 (18.2 ms, 21) and full (20 ms, 20).
    assert quality["pareto"] == ["shallow_d3", "duodiff_d3_ts3", "duodiff_d3_ts1"]


def test_exit_heatmap_fractions_match_a_hand_count(study):
    _, data = study
    heat = data["exit_heatmap"]
    assert sorted(heat["heatmaps"]) == ["ee_attention_probe_thr0.05", "ee_attention_probe_thr0.1",
                                        "ee_mlp_probe_per_layer_thr0.1"]
    expected = np.zeros((14, STEPS))
    for (layer, step), fraction in EE_FRACTIONS.items():
        expected[layer, step] = fraction
    np.testing.assert_allclose(heat["heatmaps"]["ee_attention_probe_thr0.05"]["fraction"], expected)
    # The other early-exit sets hold the same layers in reverse step order.
    np.testing.assert_allclose(heat["heatmaps"]["ee_attention_probe_thr0.1"]["fraction"], expected[:, ::-1])



def test_mean_exit_layer_has_one_panel_per_family_with_its_settings(study):
    _, data = study
    panels = {p["title"]: {s["label"]: s["y"] for s in p["series"]} for p in data["mean_exit_layer"]["panels"]}
    # One panel per classifier type and per DuoDiff shallow depth, each with its own settings and
    # the full model as a reference (DuoDiff's also the shallow model alone).
    assert panels == {
        "Early exit, attention_probe": {"U-ViT (13 blocks)": [13.0] * STEPS, "τ=0.05": pytest.approx(EE_MEAN),
                                        "τ=0.1": pytest.approx(EE_MEAN[::-1])},
        "Early exit, mlp_probe_per_layer": {"U-ViT (13 blocks)": [13.0] * STEPS, "τ=0.1": pytest.approx(EE_MEAN[::-1])},
        "DuoDiff (3 + 13 blocks)": {"U-ViT (13 blocks)": [13.0] * STEPS, "U-ViT shallow (3 blocks)": [3.0] * STEPS,
                                    "tₛ=1": [3.0, 13.0, 13.0, 13.0], "tₛ=3": [3.0, 3.0, 3.0, 13.0]},
    }


def test_fid_vs_tswitch_puts_shallow_alone_at_t_switch_steps(study):
    _, data = study
    duo = series(data["fid_vs_tswitch"], "DuoDiff, 3-block shallow")
    assert duo["x"] == [1.0, 3.0, float(STEPS)]
    assert duo["y"] == [19.5, 24.0, 60.0]
    assert series(data["fid_vs_tswitch"], "full U-ViT (13 blocks)")["y"] == [20.0, 20.0]


def test_training_curves_show_each_loss_kind_on_its_own_axis(study):
    _, data = study
    curves = data["training_curves"]
    assert curves["smoothing"] == 0.5
    panels = {p["title"]: {s["label"]: s for s in p["series"]} for p in curves["panels"]}
    for panel in panels.values():
        for s in panel.values():
            assert s["x"] == [10.0, 20.0, 30.0]
    # One kind of loss per panel, each on its own y axis: the U-ViT models' MSE, the early-exit
    # model's total, then each of its terms (loss_unweighted is all zero: not drawn).
    assert {title: list(panel) for title, panel in panels.items()} == {
        "U-ViT models: denoising MSE": ["full", "shallow_d3"],
        "Early exit: total loss": ["ee_attention_probe"],
        "loss_simple (final MSE)": ["ee_attention_probe"],
        "loss_u (uncertainty error)": ["ee_attention_probe"],
    }
    # Three logged rows (each the mean of its interval) are drawn as logged: an EMA over so few rows
    # would lag the whole run behind.
    assert panels["U-ViT models: denoising MSE"]["full"]["y"] == pytest.approx(LOSSES)
    assert panels["Early exit: total loss"]["ee_attention_probe"]["y"] == pytest.approx(LOSSES)
    assert panels["loss_simple (final MSE)"]["ee_attention_probe"]["y"] == pytest.approx([v / 2 for v in LOSSES])
    assert panels["loss_u (uncertainty error)"]["ee_attention_probe"]["y"] == pytest.approx([v / 4 for v in LOSSES])


def test_long_training_curves_are_smoothed_by_hand_computed_ema(tmp_path):
    # A run with enough rows gets the debiased EMA beside its faint interval means: at weight 0.5 the
    # losses 4, 2, 1, 1, ... smooth to 4, (0.5*4*0.5 + 0.5*2) / 0.75 = 8/3, (2/3*0.75*0.5 + 0.5) / 0.875, ...
    n = plot_training.MIN_ROWS_TO_SMOOTH
    losses = LOSSES + [1.0] * (n - len(LOSSES))
    log = tmp_path / "full" / "loss.csv"
    log.parent.mkdir()
    log.write_text("step,loss,lr,steps_per_s\n" + "".join(f"{10 * (i + 1)},{v},0.001,5\n" for i, v in enumerate(losses)))
    _, data = plot_training.plot_training_curves([log], 0.5)
    series = {s["label"]: s["y"] for s in data["panels"][0]["series"]}
    assert series["full"][:3] == pytest.approx(SMOOTHED)
    assert len(series["full"]) == n


def test_sample_grids_show_real_images_and_every_set(study):
    root, data = study
    panels = data["sample_grids"]["panels"]
    assert [p["set"] for p in panels] == [None] + ORDER  # real images first, then the table's order
    # As many real images as each set has samples (5), 4 a row at their own 8 px, 1 px white
    # between: 1 + 2 * (8 + 1) high, 1 + 4 * (8 + 1) wide.
    assert panels[0]["title"] == "real images" and panels[0]["shape"] == [19, 37, 3]
    assert panels[1]["source"] == str(root / "samples" / "full" / "grid.png")  # no images/: its grid.png
    assert panels[1]["shape"] == list(GRID_PNG_SHAPE)
    assert panels[2]["shape"] == [10, 28, 3]  # 3 images in one row: 1 + 3 * (8 + 1) wide
    # One row per method family, titled with it; each panel titled with its setting and score.
    assert (panels[6]["row"], panels[6]["title"]) == ("DuoDiff (3 + 13 blocks)", "tₛ=1\nFID 19.50")
    assert (panels[3]["row"], panels[3]["title"]) == ("Early exit, attention_probe", "τ=0.05\nFID 21.00")
    assert [p["title"] for p in panels[:3]] == ["real images", "full U-ViT\nFID 20.00", "shallow, 3 blocks\nFID 60.00"]
    assert {p["row"] for p in panels[:3]} == {"Real images and references"}


def test_sample_grid_digits_are_at_least_20_px_at_a_column_width(study):
    # Printed at a 3.3-inch column from the 150-dpi PNG the report shows, every image drawn from a
    # set's images/ (and the real images) is at least 20 px wide (the 64-image grids gave ~5 px).
    root, data = study
    panels = [p for p in data["sample_grids"]["panels"] if "images" in p["source"]]
    assert len(panels) == len(ORDER)  # the real images and every set but full (grid.png only)
    with Image.open(root / "plots" / "sample_grids.png") as image:
        figure_width_in = image.size[0] / 60  # the fixture's dpi
    for panel in panels:
        assert panel["image_width_in"] * 3.3 / figure_width_in * 150 >= 20, panel


def test_grid_from_images_places_images_like_make_grid(tmp_path):
    red, blue = np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.uint8)
    red[..., 0], blue[..., 2] = 255, 255
    Image.fromarray(red).save(tmp_path / "0.png")
    Image.fromarray(blue).save(tmp_path / "1.png")
    grid = grid_from_images([tmp_path / "0.png", tmp_path / "1.png"], n_images=64)
    # Like sampling's grid.png: 4x4 images enlarged 8x (nearest) to 32x32, 2 px white padding.
    assert grid.shape == (36, 70, 3)
    assert (grid[2:34, 2:34] == [255, 0, 0]).all() and (grid[2:34, 36:68] == [0, 0, 255]).all()
    assert (grid[:2] == 255).all() and (grid[:, 34:36] == 255).all() and (grid[34:] == 255).all()


def test_a_study_without_early_exit_still_gets_every_figure(tmp_path):
    study = {k: v for k, v in STUDY.items() if not k.startswith("ee_")}
    write_study(tmp_path, study)
    write_plot_inputs(tmp_path, study)
    tables(tmp_path, sets=list(study))
    data = plots(tmp_path)
    assert data["exit_heatmap"]["heatmaps"] == {}
    assert [p["title"] for p in data["mean_exit_layer"]["panels"]] == ["DuoDiff (3 + 13 blocks)"]
    assert all((tmp_path / "plots" / f"{name}.png").is_file() for name in PLOT_NAMES)


def test_bad_inputs_are_refused_before_drawing(tmp_path):
    write_study(tmp_path)
    write_plot_inputs(tmp_path)
    with pytest.raises(DuodiffError, match=r"tables/scores\.csv does not exist"):
        plots(tmp_path)
    tables(tmp_path)
    with pytest.raises(DuodiffError, match=r"--smoothing must be in \[0, 1\); got 1.0"):
        plots(tmp_path, smoothing=1.0)
    (tmp_path / "samples" / "duodiff_d3_ts1" / "exit_layers.pt").unlink()
    with pytest.raises(DuodiffError, match=r"duodiff_d3_ts1/exit_layers\.pt does not exist"):
        plots(tmp_path)
    torch.save(exit_layers_of("duodiff_d3_ts1", STUDY["duodiff_d3_ts1"]), tmp_path / "samples" / "duodiff_d3_ts1" / "exit_layers.pt")
    for loss in (tmp_path / "models").glob("*/loss.csv"):
        loss.unlink()
    with pytest.raises(DuodiffError, match="no trained models under"):
        plots(tmp_path)
    assert not (tmp_path / "plots").exists()


def test_exit_layers_outside_the_model_are_refused(tmp_path):
    write_study(tmp_path)
    write_plot_inputs(tmp_path)
    tables(tmp_path)
    torch.save(torch.full((STEPS, 5), 14), tmp_path / "samples" / "ee_attention_probe_thr0.1" / "exit_layers.pt")
    with pytest.raises(DuodiffError, match=r"exit layers must lie in \[0, 13\], found \[14, 14\]"):
        plots(tmp_path)


def test_paired_difference_plots_each_family_against_the_margin(study):
    # By hand from STUDY and test_tables.PAIRED_HALF_WIDTH (1.5): the margin is 10% of the full
    # model's FID 20 = 2.0; DuoDiff t_switch 1 differs by -0.5 (upper end 1.0: passes) at 22.75 /
    # 19.25 = 1.18x, t_switch 3 by +4.0 (5.5: fails) at 22.75 / 14.7 = 1.55x.
    _, data = study
    figure = data["paired_difference"]
    assert figure["quality_limit"] == pytest.approx(2.0) and figure["score_name"] == "FID"
    panels = {panel["family"]: panel for panel in figure["panels"]}
    assert list(panels) == ["attention_probe", "mlp_probe_per_layer", "shallow depth 3"]
    duodiff = panels["shallow depth 3"]
    assert duodiff["sets"] == ["duodiff_d3_ts1", "duodiff_d3_ts3"]
    assert duodiff["x"] == [pytest.approx(22.75 / 19.25), pytest.approx(22.75 / 14.7)]
    assert duodiff["y"] == [pytest.approx(-0.5), pytest.approx(4.0)]
    assert (duodiff["low"], duodiff["high"]) == ([pytest.approx(-2.0), pytest.approx(2.5)],
                                                 [pytest.approx(1.0), pytest.approx(5.5)])
    assert duodiff["passes"] == [True, False]


def figures_of(root, monkeypatch, tmp_path) -> dict:
    """Every figure run_plots draws, as drawn (before saving), by name."""
    from duodiff.report.plots import quality

    drawn, save = {}, quality.save_figure
    monkeypatch.setattr(quality, "save_figure", lambda fig, data, folder, name, dpi: (
        drawn.__setitem__(name, fig), save(fig, data, folder, name, dpi)))
    run_plots(**cli_args("plots", tables_dir=root / "tables", samples_root=root / "samples",
                         models_root=root / "models", reference=root / "reference", output_dir=tmp_path, dpi=150))
    return drawn


def test_no_figure_has_text_over_data_or_other_text(study, monkeypatch, tmp_path):
    root, _ = study
    figures = figures_of(root, monkeypatch, tmp_path)
    assert sorted(figures) == sorted(PLOT_NAMES)
    with rc_context(STYLE):
        found = {name: text_overlaps(fig) for name, fig in figures.items()}
    assert not any(found.values()), found


def test_the_overlap_check_sees_a_legend_on_data_and_texts_on_each_other():
    from duodiff.report.plots.style import new_figure

    fig = new_figure(2.0)
    ax = fig.subplots()
    ax.plot(np.linspace(0, 1, 50), np.full(50, 0.5), label="a line across the middle")
    ax.legend(loc="center")
    ax.text(0.1, 0.9, "one label", transform=ax.transAxes)
    ax.text(0.12, 0.9, "another label", transform=ax.transAxes)
    found = text_overlaps(fig)
    assert any(line.startswith("the legend covers") for line in found), found
    assert any("'one label' overlaps text 'another label'" in line for line in found), found
    assert any("'a line across the middle' covers" in line for line in found), found  # the legend's own text


def test_pdfs_embed_truetype_fonts_not_type3(study):
    # Some venues reject Type 3 fonts, matplotlib's default in PDFs; STYLE asks for Type 42.
    root, _ = study
    for name in PLOT_NAMES:
        raw = (root / "plots" / f"{name}.pdf").read_bytes()
        # Type 42 as matplotlib writes it: a CID font over the embedded TrueType program (FontFile2).
        assert b"/FontFile2" in raw and b"/Subtype /Type3" not in raw, name


def test_search_trace_draws_each_probe_in_order_under_the_familys_label(study):
    # write_search: grid 0.1 (pass) and 0.3 (fail), then the probes 0.2 (fail) and 0.15 (pass).
    _, data = study
    (panel,) = data["search_trace"]["panels"]
    assert panel["label"] == "early exit, attention_probe"
    assert panel["x"] == [0.1, 0.3, 0.2, 0.15] and panel["rounds"] == [0, 0, 1, 2]
    assert panel["passes"] == [True, False, False, True] and panel["margin"] == 0.12
    assert panel["best"] == "ee_attention_probe_thr0.15"
