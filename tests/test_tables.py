"""`duodiff tables` against a hand-made study: every number checked against the fixture's inputs.

The study below is written file by file in the formats of docs/architecture.md (stats.json,
fid.json, cmmd.json, gflops.json). Expected speed-ups, best values and row order are worked out
by hand in the comments, not by the code under test. test_plots.py reuses STUDY and write_study.
"""

import itertools
import json
import math
import re

import pandas as pd
import pytest
from _defaults import cli_args

from duodiff.core.errors import DuodiffError
from duodiff.core.flags import OneLineErrorParser
from duodiff.report.tables.collect import add_cli, run_tables
from duodiff.report.tables.operating_points import paired_verdict

SHA = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
FID_NOTE = "FID from 5 samples is strongly biased upwards; compare sets only at equal sample counts."
CMMD_REASON = "open_clip ViT-L-14-336 weights are not available offline"
STEPS = 4

# name: (method, classifier, threshold, t_switch, fid, kid, cmmd, images/s, GFLOPs/fwd, layer ratio)
# GFLOPs per image = GFLOPs/fwd * STEPS.
STUDY = {
    "full": ("full", None, None, None, 20.0, 0.0100, 0.40, 50.0, 22.75, 1.0),
    # gflops.json's layer ratio is relative to the set's own network: 1.0 for the shallow model alone.
    "shallow_d3": ("shallow", None, None, None, 60.0, 0.0500, 1.20, 200.0, 5.25, 1.0),
    "ee_attention_probe_thr0.05": ("early_exit", "attention_probe", 0.05, None, 21.0, 0.0110, 0.45, 55.0, 18.2, 0.8),
    "ee_attention_probe_thr0.1": ("early_exit", "attention_probe", 0.1, None, 25.0, 0.0140, None, 62.5, 13.65, 0.6),
    "ee_mlp_probe_per_layer_thr0.1": ("early_exit", "mlp_probe_per_layer", 0.1, None, 30.0, 0.0200, 0.60, 70.0, 11.375, 0.5),
    "duodiff_d3_ts1": ("duodiff", None, None, 1, 19.5, 0.0105, 0.38, 60.0, 19.25, 0.846),
    "duodiff_d3_ts3": ("duodiff", None, None, 3, 24.0, 0.0130, 0.90, 100.0, 14.7, 0.646),
}
# Paper order: full, shallow, early exit by classifier then threshold, DuoDiff by depth then t_switch.
ORDER = ["full", "shallow_d3", "ee_attention_probe_thr0.05", "ee_attention_probe_thr0.1",
         "ee_mlp_probe_per_layer_thr0.1", "duodiff_d3_ts1", "duodiff_d3_ts3"]


def write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


# Half the width of every set's paired 95% interval of FID(set) - FID(full). At the default margin
# (10% of the full model's FID 20: 2.0) a set passes when its difference is at most 0.5: of STUDY,
# duodiff_d3_ts1 (-0.5: upper end 1.0) alone; ee_attention_probe_thr0.05 (+1: upper end 2.5) fails.
PAIRED_HALF_WIDTH = 1.5


def write_study(root, study=STUDY, n_samples=5):
    """samples/{set}/stats.json and metrics/{set}/{fid,cmmd,gflops}.json for every set of `study`;
    every set but `full` paired with `full` (fid.json's `paired`: FID(set) - FID(full) ± PAIRED_HALF_WIDTH)."""
    full_fid = study["full"][4] if "full" in study else None
    for name, (method, classifier, threshold, t_switch, fid, kid, cmmd, ips, gpf, ratio) in study.items():
        diff = None if full_fid is None or name == "full" else fid - full_fid
        paired = None if diff is None else {
            "fid_diff": diff, "fid_diff_ci_low": diff - PAIRED_HALF_WIDTH, "fid_diff_ci_high": diff + PAIRED_HALF_WIDTH,
            "kid_diff": kid - study["full"][5], "kid_diff_ci_low": None, "kid_diff_ci_high": None}
        write_json(root / "samples" / name / "stats.json", {
            "method": method, "setting": name, "threshold": threshold, "t_switch": t_switch,
            "classifier_type": classifier, "sampler": "ddim", "steps": STEPS, "eta": 0.0,
            "n_samples": n_samples, "batch_size": 5, "seed": 0,
            "depth": 3 if method == "shallow" else 13, "shallow_depth": 3 if method == "duodiff" else None,
            "checkpoint": "m.pt", "checkpoint_late": None, "wall_time_s": n_samples / ips, "images_per_s": ips,
            "mean_exit_layer_per_step": [], "layer_ratio": ratio, "device": "cpu", "torch_version": "2.14.1"})
        write_json(root / "metrics" / name / "fid.json", {
            "fid": fid, "kid": kid, "kid_std": 0.001, "n_samples": n_samples, "n_reference": 70,
            "feature_network": "inception-v3-compat", "feature_network_sha256": SHA, "mode": "clean",
            "notes": [FID_NOTE], "paired": paired})
        write_json(root / "metrics" / name / "cmmd.json", {
            "cmmd": cmmd, "available": cmmd is not None, "reason": None if cmmd is not None else CMMD_REASON,
            "n_samples": n_samples, "embedding_model": "ViT-L-14-336"})
        write_json(root / "metrics" / name / "gflops.json", {
            "gflops_per_forward": gpf, "gflops_per_forward_linear_conv": gpf * 0.9,
            "gflops_per_image": gpf * STEPS, "layer_ratio": ratio, "lut_gflops": None,
            "theoretical": "FlopCounterMode over all ops, 2 FLOPs per multiply-add"})


def tables(root, sets=None):
    return run_tables(**cli_args("tables", samples_root=root / "samples", metrics_root=root / "metrics",
                                 sets=sets or list(reversed(ORDER)), output_dir=root / "tables"))


def markdown_rows(text, section=0):
    """The header and rows of the summary's table (section 0) or of the operating points (section 1)
    as lists of stripped cells."""
    text = text.split("## Speed-up at equal quality")[section]
    # The section's first table only (the summary's Inception FID/KID table may follow it).
    lines = list(itertools.takewhile(lambda line: line.startswith("|"),
                                     itertools.dropwhile(lambda line: not line.startswith("|"), text.splitlines())))
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    return cells[0], cells[2:]  # cells[1] is the alignment row


@pytest.fixture()
def study(tmp_path):
    write_study(tmp_path)
    return tmp_path


def test_csvs_hold_the_inputs_in_paper_order_with_speedups(study):
    paths = tables(study)
    assert sorted(p.name for p in paths.values()) == sorted(
        ["cmmd.csv", "fid.csv", "gflops.csv", "kid.csv", "operating_points.csv", "scores.csv", "search.csv",
         "summary.html", "summary.md", "summary.tex", "operating_points.html",
         *(f"{name}.html" for name in ("scores", "fid", "kid", "cmmd", "gflops", "search"))])
    fid = pd.read_csv(study / "tables" / "fid.csv")
    assert fid["set"].tolist() == ORDER
    contract = ["set", "method", "setting", "classifier_type", "threshold", "t_switch", "shallow_depth", "n_samples",
                "fid", "gflops_per_forward", "gflops_per_image", "layer_ratio", "images_per_s",
                "speedup_measured", "speedup_theoretical", "feature_network"]
    assert set(contract) <= set(fid.columns)
    row = fid.set_index("set").loc["ee_attention_probe_thr0.1"]
    assert row["fid"] == 25.0 and row["threshold"] == 0.1 and row["classifier_type"] == "attention_probe"
    assert row["speedup_measured"] == pytest.approx(62.5 / 50.0)          # 1.25
    assert row["speedup_theoretical"] == pytest.approx(22.75 / 13.65)     # GFLOPs per image ratio, steps cancel
    duo = fid.set_index("set").loc["duodiff_d3_ts3"]
    assert duo["t_switch"] == 3 and duo["shallow_depth"] == 3
    assert duo["speedup_measured"] == pytest.approx(2.0) and duo["gflops_per_image"] == pytest.approx(14.7 * 4)
    assert fid.set_index("set").loc["full", ["speedup_measured", "speedup_theoretical"]].tolist() == [1.0, 1.0]
    # The shallow set is one 3-block U-ViT: its shallow depth is its depth, and it runs 3 of the
    # full model's 13 blocks per evaluation.
    assert fid.set_index("set").loc["shallow_d3", "shallow_depth"] == 3
    assert fid.set_index("set").loc["shallow_d3", "layer_ratio"] == pytest.approx(3 / 13)
    assert fid.set_index("set").loc["duodiff_d3_ts3", "layer_ratio"] == pytest.approx(0.646)

    kid = pd.read_csv(study / "tables" / "kid.csv").set_index("set")
    assert kid.loc["duodiff_d3_ts1", "kid"] == 0.0105 and kid.loc["full", "kid_std"] == 0.001
    cmmd = pd.read_csv(study / "tables" / "cmmd.csv").set_index("set")
    assert math.isnan(cmmd.loc["ee_attention_probe_thr0.1", "cmmd"])
    assert not cmmd.loc["ee_attention_probe_thr0.1", "available"]
    assert cmmd.loc["ee_attention_probe_thr0.1", "reason"] == CMMD_REASON
    assert cmmd.loc["full", "cmmd"] == 0.40 and cmmd.loc["full", "available"]
    gflops = pd.read_csv(study / "tables" / "gflops.csv").set_index("set")
    assert gflops.loc["shallow_d3", "gflops_per_forward_linear_conv"] == pytest.approx(5.25 * 0.9)
    assert gflops.loc["shallow_d3", "speedup_measured"] == pytest.approx(4.0)


def test_summary_markdown_marks_the_best_value_of_each_column(study):
    tables(study)
    text = (study / "tables" / "summary.md").read_text()
    header, rows = markdown_rows(text)
    assert len(rows) == len(ORDER)
    column = {name: i for i, name in enumerate(header)}
    by_set = dict(zip(ORDER, rows))

    def bold(name, col):
        return by_set[name][column[col]].startswith("**")

    # Hand-picked winners: lowest FID 19.5 (duodiff ts1), KID 10.00e-3 (full), CMMD 0.38 (duodiff ts1).
    # Cost: only sets with an FID no worse than the full model's 20 (no intervals here) compete, and
    # never the shallow model alone: full and duodiff ts1, of which ts1 is cheaper (19.25 < 22.75
    # GFLOPs/fwd, 60 > 50 images/s). The shallow model (5.25 GFLOPs, 200 images/s) is not crowned.
    winners = {"FID ↓": "duodiff_d3_ts1", "KID×10³ ↓": "full", "CMMD ↓": "duodiff_d3_ts1",
               "GFLOPs/image ↓": "duodiff_d3_ts1", "Images/s ↑": "duodiff_d3_ts1",
               "Speed-up (measured) ↑": "duodiff_d3_ts1", "Speed-up (theoretical) ↑": "duodiff_d3_ts1"}
    for col, winner in winners.items():
        assert [name for name in ORDER if bold(name, col)] == [winner], col
    assert not any(bold(name, "Layer ratio") for name in ORDER)  # no "best" layer ratio

    assert by_set["duodiff_d3_ts1"][column["FID ↓"]] == "**19.50**"
    assert by_set["full"][column["KID×10³ ↓"]] == "**10.00 ± 1.00**"
    assert by_set["ee_attention_probe_thr0.1"][column["Speed-up (measured) ↑"]] == "1.25×"
    assert by_set["ee_attention_probe_thr0.1"][column["Speed-up (theoretical) ↑"]] == "1.67×"   # 22.75/13.65
    assert by_set["ee_attention_probe_thr0.05"][column["Layer ratio"]] == "0.800"
    assert by_set["shallow_d3"][column["Layer ratio"]] == "0.231"  # 3 / 13
    assert by_set["ee_attention_probe_thr0.1"][column["Setting"]] == "threshold = 0.1"
    assert by_set["duodiff_d3_ts3"][column["Setting"]] == "t_switch = 3"
    assert by_set["full"][column["Method"]] == "U-ViT (13 blocks)"

    # CMMD n/a carries a footnote mark whose note gives the reason.
    assert by_set["ee_attention_probe_thr0.1"][column["CMMD ↓"]] == "n/a¹"
    assert f"[1] CMMD n/a: {CMMD_REASON}" in text
    # Notes: sample counts, feature network with its sha256 prefix, the FID caveat, conventions.
    assert "Samples: 5 per set; FID and KID from 5 samples against 70 real images" in text
    assert f"inception-v3-compat (sha256 {SHA[:12]}…)" in text
    assert f"FID caveat (all sets): {FID_NOTE}" in text
    assert "FlopCounterMode over all ops" in text and "20.48 GFLOPs per forward" in text  # 22.75 * 0.9 linear+conv
    assert "ddim with 4 steps, seed 0" in text


def test_summary_latex_bolds_the_same_cells_and_escapes_names(study):
    tables(study)
    tex = (study / "tables" / "summary.tex").read_text()
    # Two tabulars one above the other, quality then cost, so each fits a two-column text width.
    assert tex.count("\\toprule") == tex.count("\\bottomrule") == tex.count("\\begin{tabular}") == 2
    assert "\\resizebox" not in tex and "\\usepackage{booktabs}" in tex.split("\\begin")[0]  # says what it needs
    quality, cost = (part.split("\\midrule\n")[1].split("\n\\bottomrule")[0].splitlines()
                     for part in tex.split("\\end{tabular}")[:2])
    # Rows grouped the papers' way: a method with settings has a heading row, then a row per setting.
    # Quality: setting, FID, KID, CMMD (no ΔFID column in LaTeX: the marks carry the verdict);
    # cost: setting, GFLOPs, layer ratio, images/s, the two speed-ups.
    for body, width in ((quality, 4), (cost, 6)):
        first_cells = [line.split(" & ")[0].removesuffix(" \\\\") for line in body]
        assert first_cells == ["U-ViT (13 blocks)", "U-ViT shallow (3 blocks)",
                               f"\\multicolumn{{{width}}}{{@{{}}l}}{{Early exit, attention\\_probe}}",
                               "\\quad threshold = 0.05", "\\quad threshold = 0.1",
                               f"\\multicolumn{{{width}}}{{@{{}}l}}{{Early exit, mlp\\_probe\\_per\\_layer}}",
                               "\\quad threshold = 0.1", f"\\multicolumn{{{width}}}{{@{{}}l}}{{DuoDiff (3 + 13 blocks)}}",
                               "\\quad t\\_switch = 1", "\\quad t\\_switch = 3"]
        assert all(line.count(" & ") == width - 1 for line in body if "\\multicolumn" not in line)
    duo = quality[3 + 5] + cost[3 + 5]  # t_switch = 1 in both
    assert "\\textbf{19.50}" in duo and "\\textbf{0.380}" in duo
    assert "\\textbf{77.00}" in duo and "\\textbf{60.0}" in duo and "\\textbf{1.20$\\times$}" in duo  # 60 / 50
    assert "\\textbf" not in quality[1] + cost[1]  # the shallow model alone: cheapest, but no cost contender
    assert "n/a\\textsuperscript{1}" in quality[4]  # ee_attention_probe_thr0.1
    assert tex.count("\\textbf{") == 7  # one winner per marked column, as in the Markdown
    assert "gflops\\_per\\_forward\\_linear\\_conv" in tex  # notes are escaped too


def test_summary_html_bolds_the_same_cells_for_the_report(study):
    tables(study)
    page = (study / "tables" / "summary.html").read_text()
    # The answer first (the operating points), then every set in a quality and a cost table.
    answer, quality, cost = page.split("<h2>")
    assert "<h1>Speed-up at equal quality</h1>" in answer and 'id="T_operating_points"' in answer
    assert page.startswith("<!DOCTYPE html>")
    assert quality.count("<tr>") == cost.count("<tr>") == 1 + len(ORDER)
    # pandas' Styler names cells T_<table>_row<r>_col<c> and bolds them with one CSS rule.
    bold = set()
    css = "".join(block.split("</style>")[0] for block in page.split('<style type="text/css">')[1:])
    for selectors in re.findall(r"([^{}]*)\{\s*font-weight: bold;\s*\}", css):
        bold |= {sel.strip().removeprefix("#T_") for sel in selectors.split(",")}
    # Winners as in the Markdown test. Quality: Method, Setting, FID, ΔFID vs full (never bold),
    # KID, CMMD; cost: Method, Setting, GFLOPs, layer ratio, images/s, speed-ups measured and theoretical.
    duo_ts1, full = ORDER.index("duodiff_d3_ts1"), ORDER.index("full")
    assert bold == {f"quality_row{duo_ts1}_col2", f"quality_row{full}_col4", f"quality_row{duo_ts1}_col5",
                    f"cost_row{duo_ts1}_col2", f"cost_row{duo_ts1}_col4", f"cost_row{duo_ts1}_col5",
                    f"cost_row{duo_ts1}_col6"}
    assert "Early exit, attention probe" in page and "_probe" not in page and "n/a¹" in page  # readable names
    assert f"[1] CMMD n/a: {CMMD_REASON}" in page


def test_cmmd_missing_for_every_set_is_one_note_not_a_column(tmp_path):
    # No CLIP weights: no set has CMMD. The summaries drop the column and say why once.
    write_study(tmp_path, {name: spec[:6] + (None,) + spec[7:] for name, spec in STUDY.items()})
    tables(tmp_path)
    out = tmp_path / "tables"
    header, rows = markdown_rows((out / "summary.md").read_text())
    assert header == ["Method", "Setting", "FID ↓", "ΔFID vs full", "KID×10³ ↓", "GFLOPs/image ↓", "Layer ratio",
                      "Images/s ↑", "Speed-up (measured) ↑", "Speed-up (theoretical) ↑"]
    reason = {"summary.md": CMMD_REASON, "summary.html": CMMD_REASON, "summary.tex": CMMD_REASON.replace("_", "\\_")}
    for name, text in reason.items():
        page = (out / name).read_text()
        assert "n/a" not in page, name
        assert page.count(text) == 1, name  # one note, not one per set
        assert "CMMD: not computed for any set" in page, name
    tex = (out / "summary.tex").read_text()
    assert "CMMD" not in tex.split("\\midrule")[0]  # not in the LaTeX header either
    assert "CMMD from" not in (out / "summary.md").read_text()  # no sample count for a score that is not there
    # The data file keeps one row per set, each saying why.
    cmmd = pd.read_csv(out / "cmmd.csv")
    assert cmmd["set"].tolist() == ORDER and not cmmd["available"].any() and (cmmd["reason"] == CMMD_REASON).all()


def test_cmmd_switched_off_reads_no_cmmd_file_and_says_so_once(tmp_path):
    # metrics.cmmd.enabled: false schedules no CMMD job, so there is no cmmd.json to read.
    write_study(tmp_path)
    for name in STUDY:
        (tmp_path / "metrics" / name / "cmmd.json").unlink()
    run_tables(**cli_args("tables", samples_root=tmp_path / "samples", metrics_root=tmp_path / "metrics", sets=ORDER,
                          output_dir=tmp_path / "tables", cmmd=False))
    page = (tmp_path / "tables" / "summary.md").read_text()
    header, _ = markdown_rows(page)
    assert "CMMD ↓" not in header and "n/a" not in page
    assert page.count("metrics.cmmd.enabled: false") == 1
    cmmd = pd.read_csv(tmp_path / "tables" / "cmmd.csv")
    assert cmmd["set"].tolist() == ORDER and not cmmd["available"].any()
    assert cmmd["reason"].str.contains("switched off").all()


def test_cost_best_is_the_cheapest_set_that_matches_the_full_model(tmp_path):
    # The shallow model alone made as good as the full model (FD 100 in [90, 110]) and the
    # cheapest (0.02 GFLOPs per forward, 23 images/s): still no cost contender, being DuoDiff's first stage.
    write_ci_study(tmp_path)
    shallow = tmp_path / "metrics" / "shallow_d3" / "fd_classifier.json"
    write_json(shallow, {**json.loads(shallow.read_text()), "fid": 100.0, "fid_ci_low": 90.0, "fid_ci_high": 110.0})
    run_tables(**cli_args("tables", samples_root=tmp_path / "samples", metrics_root=tmp_path / "metrics",
                          sets=list(CI_STUDY) + ["real"], output_dir=tmp_path / "tables", headline="classifier"))
    text = (tmp_path / "tables" / "summary.md").read_text()
    header, rows = markdown_rows(text)
    names = ["real"] + list(CI_STUDY)  # the table's order is CI_STUDY's, after the real data
    bold = {col: [n for n, row in zip(names, rows) if row[header.index(col)].startswith("**")]
            for col in ("GFLOPs/image ↓", "Images/s ↑", "Speed-up (measured) ↑", "Speed-up (theoretical) ↑")}
    # By hand, contenders are the full model and the sets that pass the paired test (CI_PAIRED):
    # full_steps20, attention thr0.1, DuoDiff ts10 and ts20. Cheapest per image and fastest:
    # full_steps20 (0.05 * 20 steps = 1 GFLOP per image against ts20's 0.035 * 40 = 1.4 and the full
    # model's 2; 20 images/s, 2x). The cheaper sets (shallow, ts30, thr0.3, full_steps10 at 0.5 GFLOP
    # per image) fail, or are the shallow model.
    assert bold == {"GFLOPs/image ↓": ["full_steps20"], "Images/s ↑": ["full_steps20"],
                    "Speed-up (measured) ↑": ["full_steps20"], "Speed-up (theoretical) ↑": ["full_steps20"]}
    # Quality columns still crown the best score of any generated set, the shallow model's included.
    assert [n for n, row in zip(names, rows) if row[header.index("FD [95% CI] ↓")].startswith("**")] == [
        "full", "shallow_d3"]
    assert "that pass the paired test of equal quality (10% margin)" in text
    assert "the shallow model alone (DuoDiff's first stage, the cheapest by construction) is never a cost contender" in text


def test_equal_values_as_printed_are_all_marked(tmp_path):
    study = dict(STUDY)
    # 19.996 and 20.004 both print as 20.00: neither can be shown as better than the other.
    study["full"] = STUDY["full"][:4] + (20.004,) + STUDY["full"][5:]
    study["duodiff_d3_ts1"] = STUDY["duodiff_d3_ts1"][:4] + (19.996,) + STUDY["duodiff_d3_ts1"][5:]
    write_study(tmp_path, study)
    tables(tmp_path)
    header, rows = markdown_rows((tmp_path / "tables" / "summary.md").read_text())
    fid = [row[header.index("FID ↓")] for row in rows]
    assert [name for name, cell in zip(ORDER, fid) if cell.startswith("**")] == ["full", "duodiff_d3_ts1"]


def test_small_numbers_keep_two_significant_digits(tmp_path):
    # An 8x8 model costs about a thousandth of a GFLOP: two fixed decimals would print 0.00 for all.
    study = {name: spec[:8] + (spec[8] * 1.1e-4,) + spec[9:] for name, spec in STUDY.items()}
    write_study(tmp_path, study)
    tables(tmp_path)
    text = (tmp_path / "tables" / "summary.md").read_text()
    header, rows = markdown_rows(text)
    gflops = dict(zip(ORDER, (row[header.index("GFLOPs/image ↓")] for row in rows)))
    # Per image (x STEPS = 4): the smallest, 5.25 * 1.1e-4 * 4 = 0.00231, needs 4 decimals for 2
    # significant digits; the column shares them (full: 22.75 * 1.1e-4 * 4 = 0.010010).
    assert gflops["shallow_d3"] == "0.0023" and gflops["full"] == "0.0100"
    assert gflops["duodiff_d3_ts1"] == "**0.0085**"  # 19.25 * 1.1e-4 * 4 = 0.00847, the cheapest cost contender
    # The linear+conv cost in the notes, 0.0025025 * 0.9 = 0.00225225, also to 2 significant digits.
    assert "the full model costs 0.0023 GFLOPs per forward" in text
    # Speed-ups keep their two decimals: 1137.5 / 262.5 = 4.33.
    assert rows[1][header.index("Speed-up (theoretical) ↑")] == "4.33×"


def test_missing_file_is_named_and_nothing_is_written(study):
    (study / "metrics" / "duodiff_d3_ts3" / "gflops.json").unlink()
    with pytest.raises(DuodiffError, match=r"metrics/duodiff_d3_ts3/gflops\.json does not exist"):
        tables(study)
    assert not (study / "tables").exists()


@pytest.mark.parametrize("sets, message", [
    (["shallow_d3", "duodiff_d3_ts1"], "must include 'full'"),
    ([], "at least one"),
    (["full", "full"], "full more than once"),
    (["full", "ee_attention_probe"], "'ee_attention_probe' has none of the forms"),
])
def test_bad_set_lists_are_refused(study, sets, message):
    with pytest.raises(DuodiffError, match=message):
        run_tables(**cli_args("tables", samples_root=study / "samples", metrics_root=study / "metrics", sets=sets,
                              output_dir=study / "tables"))
    assert not (study / "tables").exists()


def test_bad_file_contents_are_refused(study):
    stats = study / "samples" / "shallow_d3" / "stats.json"
    data = json.loads(stats.read_text())
    write_json(stats, {**data, "method": "full"})
    with pytest.raises(DuodiffError, match="method is 'full' but the set name 'shallow_d3' says 'shallow'"):
        tables(study)
    write_json(stats, data)
    fid = study / "metrics" / "full" / "fid.json"
    write_json(fid, {**json.loads(fid.read_text()), "fid": float("nan")})
    with pytest.raises(DuodiffError, match="full/fid.json: fid must be a finite number; got nan"):
        tables(study)
    fid.write_text("{not json")
    with pytest.raises(DuodiffError, match="not valid JSON"):
        tables(study)
    write_json(fid, {"fid": 1.0})
    with pytest.raises(DuodiffError, match="missing kid, kid_std"):
        tables(study)


def test_cli_accepts_dashes_and_underscores(study, capsys):
    parser = OneLineErrorParser(prog="duodiff")
    add_cli(parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrorParser))
    args = parser.parse_args(["tables", "--samples_root", str(study / "samples"), "--metrics-root",
                              str(study / "metrics"), "--sets", *ORDER, "--output-dir", str(study / "out")])
    args.func(args)
    assert pd.read_csv(study / "out" / "fid.csv")["set"].tolist() == ORDER


def test_throughput_note_names_device_precision_and_clock(tmp_path):
    # Sets written before timing_clock / precision were recorded count as wall clock and fp32.
    write_study(tmp_path)
    tables(tmp_path)
    text = (tmp_path / "tables" / "summary.md").read_text()
    assert "measured sampling throughput on cpu (torch 2.14.1, batch size 5, fp32, timed by the wall clock)" in text
    assert "mix them" not in text
    # One set sampled on another set-up: the note lists both and warns.
    stats_path = tmp_path / "samples" / "full" / "stats.json"
    stats = json.loads(stats_path.read_text()) | {"device": "cuda", "precision": "fp16", "timing_clock": "wall"}
    stats_path.write_text(json.dumps(stats))
    tables(tmp_path)
    text = (tmp_path / "tables" / "summary.md").read_text()
    assert "cuda (torch 2.14.1, batch size 5, fp16, timed by the wall clock)" in text
    assert "Sets were timed on different set-ups, so measured speed-ups mix them." in text


# ---- the headline score with intervals, the real-data floor, fewer steps, operating points ---------

# name: (method, classifier, threshold, t_switch, steps, FD, FD interval, images/s, GFLOPs/fwd, layer ratio)
CI_STUDY = {
    "full": ("full", None, None, None, 40, 100.0, (90.0, 110.0), 10.0, 0.05, 1.0),
    "full_steps20": ("full", None, None, None, 20, 105.0, (95.0, 115.0), 20.0, 0.05, 1.0),
    "full_steps10": ("full", None, None, None, 10, 150.0, (135.0, 165.0), 40.0, 0.05, 1.0),
    "shallow_d3": ("shallow", None, None, None, 40, 180.0, (165.0, 195.0), 23.0, 0.02, 1.0),
    "ee_attention_probe_thr0.1": ("early_exit", "attention_probe", 0.1, None, 40, 104.0, (94.0, 116.0), 12.0, 0.04, 0.8),
    "ee_attention_probe_thr0.2": ("early_exit", "attention_probe", 0.2, None, 40, 109.0, (99.0, 121.0), 14.0, 0.035, 0.7),
    "ee_attention_probe_thr0.3": ("early_exit", "attention_probe", 0.3, None, 40, 140.0, (125.0, 155.0), 16.0, 0.03, 0.6),
    "ee_mlp_probe_per_layer_thr0.1": ("early_exit", "mlp_probe_per_layer", 0.1, None, 40, 120.0, (108.0, 130.0), 13.0, 0.04, 0.8),
    "duodiff_d3_ts10": ("duodiff", None, None, 10, 40, 101.0, (91.0, 111.0), 12.0, 0.0425, 0.82),
    "duodiff_d3_ts20": ("duodiff", None, None, 20, 40, 108.0, (97.0, 119.0), 14.0, 0.035, 0.64),
    "duodiff_d3_ts30": ("duodiff", None, None, 30, 40, 125.0, (112.0, 138.0), 17.0, 0.0275, 0.46),
}


# Each generated set's paired 95% interval of FD(set) - FD(full) (its difference is FD - 100). The
# margin is 10% of the full model's FD 100: a set passes when the upper end is at most 10. Paired
# intervals are narrower than the sets' own; note ee_attention_probe_thr0.2 (109, inside the full
# model's unpaired [90, 110]) fails the paired test: its upper end 13 exceeds the margin.
CI_PAIRED = {
    "full_steps20": (3.0, 7.0), "full_steps10": (45.0, 55.0), "shallow_d3": (72.0, 88.0),
    "ee_attention_probe_thr0.1": (1.0, 7.0), "ee_attention_probe_thr0.2": (5.0, 13.0),
    "ee_attention_probe_thr0.3": (34.0, 46.0), "ee_mlp_probe_per_layer_thr0.1": (15.0, 25.0),
    "duodiff_d3_ts10": (-1.0, 3.0), "duodiff_d3_ts20": (6.0, 9.5), "duodiff_d3_ts30": (20.0, 30.0),
}


def write_ci_study(root):
    """A study whose headline is the classifier FD, with intervals, a real-data set and fewer steps."""
    for name, (method, classifier, threshold, t_switch, steps, fd, (low, high), ips, gpf, ratio) in CI_STUDY.items():
        write_json(root / "samples" / name / "stats.json", {
            "method": method, "setting": name, "threshold": threshold, "t_switch": t_switch,
            "classifier_type": classifier, "sampler": "ddim", "steps": steps, "n_samples": 1000, "batch_size": 250,
            "seed": 0, "depth": 3 if method == "shallow" else 7, "shallow_depth": 3 if method == "duodiff" else None,
            "images_per_s": ips, "device": "cpu", "torch_version": "2.14.1"})
        write_json(root / "metrics" / name / "gflops.json", {
            "gflops_per_forward": gpf, "gflops_per_forward_linear_conv": gpf, "gflops_per_image": gpf * steps,
            "layer_ratio": ratio, "theoretical": "FlopCounterMode"})
    real = {"real": (70.0, (60.0, 80.0))}
    for name, values in {**{k: (v[5], v[6]) for k, v in CI_STUDY.items()}, **real}.items():
        fd, (low, high) = values
        common = {"n_samples": 1000, "n_reference": 797, "notes": [], "feature_network_sha256": SHA}
        paired = None
        if name in CI_PAIRED:
            (diff_low, diff_high), diff = CI_PAIRED[name], fd - CI_STUDY["full"][5]
            paired = {"fid_diff": diff, "fid_diff_ci_low": diff_low, "fid_diff_ci_high": diff_high,
                      "kid_diff": diff / 1e4, "kid_diff_ci_low": diff_low / 1e4, "kid_diff_ci_high": diff_high / 1e4}
        write_json(root / "metrics" / name / "fd_classifier.json", {
            "fid": fd, "fid_ci_low": low, "fid_ci_high": high, "kid": fd / 1e4, "kid_ci_low": low / 1e4,
            "kid_ci_high": high / 1e4, "feature_network": "digits classifier", **common, "paired": paired})
        write_json(root / "metrics" / name / "fid.json", {
            "fid": 50.0, "kid": 0.01, "kid_std": 0.001, "feature_network": "inception", **common,
            "n_samples": 100})
        write_json(root / "metrics" / name / "cmmd.json", {
            "cmmd": None, "available": False, "reason": CMMD_REASON, "n_samples": 1000, "embedding_model": "x"})
    write_json(root / "samples" / "real" / "stats.json", {
        "method": "real", "dataset": "digits", "n_samples": 1000, "notes": []})


def test_paired_verdict_is_non_inferiority_at_the_margin():
    # By hand, margin 10 (in the score's units): the upper end of the paired interval decides.
    assert paired_verdict(-0.5, 10.0) == "better"  # the whole interval below 0
    assert paired_verdict(0.0, 10.0) == "equal" and paired_verdict(10.0, 10.0) == "equal"
    assert paired_verdict(10.01, 10.0) == "worse"
    assert paired_verdict(math.nan, 10.0) == ""  # no paired interval: no verdict


def test_scores_carry_the_paired_difference_and_its_verdict(tmp_path):
    write_ci_study(tmp_path)
    run_tables(**cli_args("tables", samples_root=tmp_path / "samples", metrics_root=tmp_path / "metrics",
                          sets=list(CI_STUDY) + ["real"], output_dir=tmp_path / "tables", headline="classifier"))
    scores = pd.read_csv(tmp_path / "tables" / "scores.csv").set_index("set")
    # Real data first, then full, fewer steps (most steps first), shallow, early exit, DuoDiff.
    assert scores.index.tolist()[:4] == ["real", "full", "full_steps20", "full_steps10"]
    assert scores.loc["full_steps10", "method"] == "fewer_steps"
    assert scores.loc["full_steps10", "speedup_theoretical"] == pytest.approx(4.0)  # 40 of the steps / 10
    assert scores.loc["full_steps10", "speedup_measured"] == pytest.approx(4.0)  # 40 / 10 images/s
    assert (scores["score_name"] == "FD").all()
    assert scores.loc["full", ["score", "score_ci_low", "score_ci_high"]].tolist() == [100.0, 90.0, 110.0]
    # By hand from CI_PAIRED against the margin 10 (10% of 100): upper end <= 10 -> equal, else worse;
    # the real images are not paired with the full model's (no verdict), nor is the full model itself.
    expected = {"real": "", "full_steps20": "equal", "full_steps10": "worse", "shallow_d3": "worse",
                "ee_attention_probe_thr0.1": "equal", "ee_attention_probe_thr0.2": "worse",
                "ee_attention_probe_thr0.3": "worse", "ee_mlp_probe_per_layer_thr0.1": "worse",
                "duodiff_d3_ts10": "equal", "duodiff_d3_ts20": "equal", "duodiff_d3_ts30": "worse"}
    assert scores["verdict"].fillna("").to_dict() == {"full": "", **expected}
    assert scores.loc["ee_attention_probe_thr0.2", ["score_diff", "score_diff_ci_low", "score_diff_ci_high"]].tolist() \
        == [9.0, 5.0, 13.0]
    assert (scores["quality_limit"] == 10.0).all() and (scores["margin"] == 0.1).all()
    # A wider margin (15%) lets thr0.2 (upper end 13) pass.
    run_tables(**cli_args("tables", samples_root=tmp_path / "samples", metrics_root=tmp_path / "metrics",
                          sets=list(CI_STUDY), output_dir=tmp_path / "wide", headline="classifier", margin=0.15))
    wide = pd.read_csv(tmp_path / "wide" / "scores.csv").set_index("set")
    assert wide.loc["ee_attention_probe_thr0.2", "verdict"] == "equal" and wide.loc["full_steps10", "verdict"] == "worse"
    assert math.isnan(scores.loc["real", "speedup_theoretical"])  # real images cost nothing to compare


def test_operating_points_pick_the_fastest_setting_that_passes_the_paired_test(tmp_path):
    write_ci_study(tmp_path)
    run_tables(**cli_args("tables", samples_root=tmp_path / "samples", metrics_root=tmp_path / "metrics",
                          sets=list(CI_STUDY) + ["real"], output_dir=tmp_path / "tables", headline="classifier"))
    points = pd.read_csv(tmp_path / "tables" / "operating_points.csv")
    assert points["family"].tolist() == ["fewer steps", "attention_probe", "mlp_probe_per_layer", "shallow depth 3"]
    picked = dict(zip(points["family"], points["set"]))
    # Fewer steps: 20 steps (upper end 7 <= 10) passes, 10 steps (55) does not.
    # Attention probe: thr0.2 is cheaper but fails (13 > 10), so thr0.1 (7); thr0.3 (46) is out.
    # DuoDiff: ts20 (9.5) is the fastest that passes; ts30 (30) is out.
    assert picked["fewer steps"] == "full_steps20"
    assert picked["attention_probe"] == "ee_attention_probe_thr0.1"
    assert picked["shallow depth 3"] == "duodiff_d3_ts20"
    row = points.set_index("family").loc["attention_probe"]
    assert row["speedup_theoretical"] == pytest.approx(0.05 / 0.04)
    assert (row["score"], row["score_diff"], row["score_diff_ci_low"], row["score_diff_ci_high"]) == (104.0, 4.0, 1.0, 7.0)
    assert (row["verdict"], row["quality_limit"], row["full_ci_high"]) == ("equal", 10.0, 110.0)
    # mlp_probe_per_layer's only set fails (upper end 25): no operating point; the note names the closest.
    mlp = points.set_index("family").loc["mlp_probe_per_layer"]
    assert pd.isna(mlp["set"]) and mlp["note"] == (
        "none passes; closest: threshold = 0.1, ΔFD +20 [+15, +25] > margin 10 (ee_mlp_probe_per_layer_thr0.1)")
    summary = (tmp_path / "tables" / "summary.md").read_text()
    header, rows = markdown_rows(summary, section=1)
    assert [r[0] for r in rows] == ["Fewer steps", "Early exit, attention probe", "Early exit, MLP probe per layer",
                                    "DuoDiff, shallow depth 3"]
    # Readable: the closest set by its setting, without its id (operating_points.csv keeps it).
    assert rows[2][-1] == "none passes; closest: threshold = 0.1, ΔFD +20 [+15, +25] > margin 10"
    answer = (tmp_path / "tables" / "operating_points.html").read_text()
    assert "Early exit, MLP probe per layer" in answer and "ee_" not in answer and "_probe" not in answer
    # The summary's headline column carries the interval and the marks of the sets that differ.
    header, rows = markdown_rows(summary)
    cells = {row[0] + " / " + row[1]: row[header.index("FD [95% CI] ↓")] for row in rows}
    assert cells["Real data (floor) / 1000 images"] == "70.00 [60.00, 80.00]"  # not paired: no verdict
    assert cells["U-ViT (7 blocks), fewer steps / 10 steps"] == "150.00 [135.00, 165.00]†"
    assert cells["U-ViT (7 blocks), fewer steps / 20 steps"] == "105.00 [95.00, 115.00]"
    # The real-data row is the floor, not a contender: the best FD in bold is a generated set's.
    bold = [key for key, cell in cells.items() if cell.startswith("**")]
    assert bold == ["U-ViT (7 blocks) / –"]  # 100.00, the lowest generated FD


def write_timing(path, sets, speedups):
    """A timing.json of `duodiff time` by hand: speedups[name] = (median, low, high)."""
    write_json(path, {
        "format": "duodiff-timing", "version": 1, "baseline": "full", "rounds": 6, "batch_size": 64, "threads": 1,
        "device": "cpu", "device_name": "Test CPU", "clock": "time.process_time", "confidence": 0.95,
        "interval_method": "order statistics", "sets": {
            name: {"speedup": speedups[name][0], "speedup_ci_low": speedups[name][1],
                   "speedup_ci_high": speedups[name][2], "images_per_s": 10.0 * speedups[name][0]}
            for name in sets}})


def test_measured_speedups_come_from_the_timing_stage_with_their_intervals(tmp_path):
    write_ci_study(tmp_path)
    # Timed alone: full_steps20 exactly 2x of work measures 2.01 [1.99, 2.04]; the sampling jobs'
    # own images/s (20 vs 10: 2.0) are not used. Every other set at 1.5 [1.4, 1.6].
    speedups = {name: (1.5, 1.4, 1.6) for name in CI_STUDY} | {"full": (1.0, 1.0, 1.0),
                                                                "full_steps20": (2.01, 1.99, 2.04)}
    write_timing(tmp_path / "timing.json", CI_STUDY, speedups)
    run_tables(**cli_args("tables", samples_root=tmp_path / "samples", metrics_root=tmp_path / "metrics",
                          sets=list(CI_STUDY) + ["real"], output_dir=tmp_path / "tables", headline="classifier",
                          timing=tmp_path / "timing.json"))
    scores = pd.read_csv(tmp_path / "tables" / "scores.csv").set_index("set")
    assert scores.loc["full_steps20", ["speedup_measured", "speedup_measured_ci_low", "speedup_measured_ci_high",
                                       "images_per_s"]].tolist() == pytest.approx([2.01, 1.99, 2.04, 20.1])
    assert scores.loc["full", "speedup_measured"] == 1.0 and math.isnan(scores.loc["real", "speedup_measured"])
    points = pd.read_csv(tmp_path / "tables" / "operating_points.csv").set_index("family")
    assert points.loc["fewer steps", ["speedup_measured", "speedup_measured_ci_low"]].tolist() == [2.01, 1.99]
    summary = (tmp_path / "tables" / "summary.md").read_text()
    assert "2.01× [1.99, 2.04]" in summary and "timed alone after sampling (duodiff time) on Test CPU" in summary
    # A set the timing stage did not time is refused, naming it.
    write_timing(tmp_path / "partial.json", [n for n in CI_STUDY if n != "duodiff_d3_ts30"], speedups)
    with pytest.raises(DuodiffError, match=r"partial.json: set duodiff_d3_ts30 was not timed"):
        run_tables(**cli_args("tables", samples_root=tmp_path / "samples", metrics_root=tmp_path / "metrics",
                              sets=list(CI_STUDY), output_dir=tmp_path / "t2", headline="classifier",
                              timing=tmp_path / "partial.json"))


def test_the_report_shows_inceptions_fid_apart_when_the_classifier_is_the_headline(tmp_path):
    write_ci_study(tmp_path)
    run_tables(**cli_args("tables", samples_root=tmp_path / "samples", metrics_root=tmp_path / "metrics",
                          sets=list(CI_STUDY) + ["real"], output_dir=tmp_path / "tables", headline="classifier"))
    page = (tmp_path / "tables" / "summary.html").read_text()
    answer, quality, inception, cost = page.split("<h2>")
    assert "FD [95% CI] ↓" in quality and "FID ↓" not in quality
    assert inception.startswith("Every set: Inception FID and KID") and "FID ↓" in inception
    assert "from the first 100 samples of each set against 797 reference images" in inception
    assert "GFLOPs/image ↓" in cost and "FID" not in cost.split("<ul>")[0]
    # 100 samples cannot separate the sets: nothing in the Inception table is bold.
    assert not re.search(r"#T_inception_row\d+_col\d+[^{]*\{\s*font-weight: bold", page)
    assert re.search(r"#T_quality_row\d+_col\d+[^{]*\{\s*font-weight: bold", page)  # the check can see bold


def test_inceptions_few_sample_fid_is_a_secondary_table_in_markdown_and_latex_never_bold(tmp_path):
    write_ci_study(tmp_path)
    run_tables(**cli_args("tables", samples_root=tmp_path / "samples", metrics_root=tmp_path / "metrics",
                          sets=list(CI_STUDY) + ["real"], output_dir=tmp_path / "tables", headline="classifier"))
    text = (tmp_path / "tables" / "summary.md").read_text()
    header, _ = markdown_rows(text)
    assert "FD [95% CI] ↓" in header and "FID ↓" not in header and "KID×10³ ↓" not in header
    secondary = text.split("## Every set: Inception FID and KID")[1].split("## Speed-up")[0]
    assert "from the first 100 samples of each set against 797 reference images" in secondary
    header, rows = markdown_rows(secondary)
    assert header == ["Method", "Setting", "FID ↓", "KID×10³ ↓"] and len(rows) == len(CI_STUDY) + 1
    assert not any(cell.startswith("**") for row in rows for cell in row)
    tex = (tmp_path / "tables" / "summary.tex").read_text()
    main, inception = tex.split("Secondary scores: ")
    assert "FID" not in main.split("\\end{tabular}")[0] and "FID$\\downarrow$" in inception
    assert "\\textbf" not in inception.split("\\end{tabular}")[0]


def test_the_floor_note_says_how_it_was_drawn_that_the_models_saw_it_and_why_its_kd_is_below_0(tmp_path):
    write_ci_study(tmp_path)
    write_json(tmp_path / "samples" / "real" / "stats.json", {
        "method": "real", "dataset": "digits", "n_samples": 1000, "notes": [], "seen_in_training": True,
        "selection": "1000 training images drawn at random within each class (split seed 0)"})
    real = tmp_path / "metrics" / "real" / "fd_classifier.json"
    write_json(real, {**json.loads(real.read_text()), "kid": -0.0053, "kid_ci_low": -0.0103, "kid_ci_high": -0.0004})
    run_tables(**cli_args("tables", samples_root=tmp_path / "samples", metrics_root=tmp_path / "metrics",
                          sets=list(CI_STUDY) + ["real"], output_dir=tmp_path / "tables", headline="classifier"))
    (note,) = [line for line in (tmp_path / "tables" / "summary.md").read_text().splitlines()
               if line.startswith("- Real data:")]
    assert "(1000 training images drawn at random within each class (split seed 0))" in note
    assert "trained on every training image, these included" in note and "Its KD interval lies below 0" in note
