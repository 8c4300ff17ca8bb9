"""summary.tex compiles as it is: pdflatex on a two-column paper that loads only the packages the
file's header names and \\input's it. Skipped where pdflatex or pdftotext is missing (.ci/run
installs texlive-latex-base, texlive-latex-recommended for booktabs, and poppler-utils).

The study is test_tables.py's hand-made one, with the FID notes a small study really gets
(duodiff.metrics.fid.small_sample_notes: "FID from 5 < 2048 samples ..."), whose "<" the default
OT1 font encoding prints as "¡" unless escaped, and one set without CMMD (a footnote).
"""

import json
import re
import shutil
import subprocess

import pytest
from _defaults import cli_args
from test_tables import ORDER, write_study

from duodiff.metrics.fid import small_sample_notes
from duodiff.report.tables.collect import run_tables

PAPER = r"""\documentclass[twocolumn]{article}
%(packages)s
\begin{document}
A paper's text, and then its table.
\input{summary.tex}
\end{document}
"""


@pytest.fixture(scope="session")
def tools():
    missing = [tool for tool in ("pdflatex", "pdftotext") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (Debian: texlive-latex-base, texlive-latex-recommended, "
                    "poppler-utils; .ci/run installs them)")


def test_summary_tex_compiles_as_it_is_in_a_two_column_paper(tools, tmp_path):
    write_study(tmp_path)
    notes = small_sample_notes(5, 70)
    assert any("<" in note for note in notes)
    for name in ORDER:
        path = tmp_path / "metrics" / name / "fid.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "notes": notes}))
    paths = run_tables(**cli_args("tables", samples_root=tmp_path / "samples", metrics_root=tmp_path / "metrics",
                                  sets=ORDER, output_dir=tmp_path / "paper"))
    tex = paths["summary.tex"].read_text()

    # The packages it needs are the ones its header names: the paper loads those and no others.
    header = "\n".join(line for line in tex.splitlines() if line.startswith("%"))
    packages = re.findall(r"\\usepackage\{[^}]+\}", header)
    assert packages == ["\\usepackage{booktabs}"]
    paper = tmp_path / "paper" / "paper.tex"
    paper.write_text(PAPER % {"packages": "\n".join(packages)})
    for _ in range(2):  # the second run settles the float and the label
        run = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", paper.name],
                             cwd=paper.parent, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stdout[-3000:]
    log = paper.with_suffix(".log").read_text(errors="replace")
    assert "LaTeX Error" not in log and "Missing character" not in log
    # Readable at the paper's size: nothing scaled, and the table fits the text width.
    assert "\\resizebox" not in tex and "\\scalebox" not in tex
    assert "Overfull \\hbox" not in log, re.findall(r"Overfull \\hbox.*", log)

    text = subprocess.run(["pdftotext", "-layout", str(paper.with_suffix(".pdf")), "-"],
                          capture_output=True, text=True, check=True, timeout=60).stdout
    assert "¡" not in text and "¿" not in text
    assert "FID from 5 < 2048 samples" in text  # as the note reads in fid.json
    # One float per part, the notes a float of their own: each fits its page.
    assert "Float too large" not in log
    assert "Table 1: Sample quality per method and setting" in text and "Table 2: Sampling cost" in text
    assert "Notes to Tables 1, 2" in text
    assert re.search(r"Early exit, attention.probe\s*\n\s*threshold = 0\.05\s+21\.00", text)  # grouped rows
    assert "CMMD n/a: open clip ViT-L-14-336 weights are not available offline." in text


def test_a_study_with_intervals_compiles_without_hanging_and_fits(tools, tmp_path):
    # A study with intervals puts "[95% CI]" in stacked headers; `\\[95\% CI]` made pdflatex read it
    # as a line break's spacing and hang without a message (the embedded default's summary.tex).
    from test_tables import CI_STUDY, write_ci_study

    write_ci_study(tmp_path)
    paths = run_tables(**cli_args("tables", samples_root=tmp_path / "samples", metrics_root=tmp_path / "metrics",
                                  sets=list(CI_STUDY) + ["real"], output_dir=tmp_path / "paper", headline="classifier"))
    assert "[95\\% CI]" in paths["summary.tex"].read_text()
    paper = tmp_path / "paper" / "paper.tex"
    paper.write_text(PAPER % {"packages": "\\usepackage{booktabs}"})
    run = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", paper.name],
                         cwd=paper.parent, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout[-3000:]
    # With intervals in every score and speed-up cell, quality and cost still each fit the text width.
    log = paper.with_suffix(".log").read_text(errors="replace")
    assert "Overfull \\hbox" not in log, re.findall(r"Overfull \\hbox.*", log)
    assert "Float too large" not in log
    text = subprocess.run(["pdftotext", "-layout", str(paper.with_suffix(".pdf")), "-"],
                          capture_output=True, text=True, check=True, timeout=60).stdout
    assert "[95% CI]" in text and "FD" in text


def test_greek_and_math_in_labels_are_written_for_latex():
    # Composed sets' settings read "τ = 0.12, 20 steps": pdflatex stops on a bare τ (no glyph in
    # its default fonts), so every non-ASCII symbol the labels use has a LaTeX spelling.
    from duodiff.report.tables.formats import _escape_latex

    assert _escape_latex("τ = 0.12, 20 steps") == "$\\tau$ = 0.12, 20 steps"
    assert _escape_latex("t_switch = 20, τ = 0.2") == "t\\_switch = 20, $\\tau$ = 0.2"
    assert _escape_latex("ΔFD ± 0.1 × 2") == "$\\Delta$FD $\\pm$ 0.1 $\\times$ 2"
