r"""The summary as the three documents `duodiff tables` writes: summary.md (for people),
summary.tex (to \input in a paper) and summary.html (for the Snakemake report, which shows html).
All three show the cells of cells.py and the notes of notes.py, then the
operating points ("Speed-up at equal quality")."""

from __future__ import annotations

import html

import pandas as pd

from duodiff.report.tables.cells import (
    best_mask,
    footnotes,
    inception_caption,
    operating_point_cells,
    readable,
    summary_cells,
    summary_columns,
    summary_parts,
)
from duodiff.report.tables.notes import notes
from duodiff.report.tables.operating_points import operating_points

OPERATING_POINTS_TEXT = (
    "Per method, the fastest setting (most theoretical speed-up) of equal quality by the paired test: the upper "
    "end of the paired 95% interval of its headline score minus the full model's is at most the margin "
    "(operating_points.csv)."
)


def summary_markdown(frame: pd.DataFrame) -> str:
    numbered = footnotes(frame)
    cells = summary_cells(frame, numbered, latex=False)
    mask = best_mask(frame)
    for column in mask.columns:
        cells[column] = [f"**{text}**" if best else text for text, best in zip(cells[column], mask[column])]
    parts = summary_parts(frame)
    headers = {column: md for column, md, _, _ in summary_columns(frame)}

    def markdown(columns: list) -> str:
        # disable_numparse: the cells are already formatted; tabulate would re-format "1.000" as "1".
        shown = cells[["Method", "Setting", *(c for c, *_ in columns)]].rename(columns=headers)
        return shown.to_markdown(index=False, disable_numparse=True, colalign=["left", "left"] + ["right"] * len(columns))

    table = markdown(parts["quality"] + parts["cost"])
    if parts["inception"]:
        table += ("\n\n## Every set: Inception FID and KID\n\n" + inception_caption(frame) + "\n\n"
                  + markdown(parts["inception"]))
    note_text = "\n".join(f"- {note}" for note in notes(frame, numbered))
    points = operating_point_cells(operating_points(frame))
    points_table = points.to_markdown(index=False, disable_numparse=True)
    return ("# Results: sample quality and cost per method\n\n"
            "Full U-ViT, the fewer-steps baseline, the shallow U-ViT alone, early exit (DeeDiff/AdaDiff) and "
            "DuoDiff, one row per sample set, below the real-data floor.\n\n" + table + "\n\n" + note_text + "\n\n"
            "## Speed-up at equal quality\n\n" + OPERATING_POINTS_TEXT + "\n\n" + points_table + "\n")

# Characters of the notes (free text, some from other files) that LaTeX would fail on or
# mis-typeset: specials, and "<", ">", "|", which the default OT1 encoding prints as other glyphs
# ("100 < 2048" as "100 ¡ 2048"). Non-ASCII letters pass: LaTeX reads UTF-8.
LATEX_TEXT = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
              "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
              "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}",
              "Δ": r"$\Delta$", "÷": r"$\div$", "×": r"$\times$", "±": r"$\pm$", "≤": r"$\leq$", "≥": r"$\geq$", "≈": r"$\approx$",
              "τ": r"$\tau$", "→": r"$\rightarrow$", "↑": r"$\uparrow$", "↓": r"$\downarrow$", "µ": r"$\mu$",
              "²": r"\textsuperscript{2}", "³": r"\textsuperscript{3}",
              "…": r"\ldots{}", "—": "---", "–": "--"}


def _escape_latex(text: str) -> str:
    return "".join(LATEX_TEXT.get(char, char) for char in text)


def _stacked_header(tex: str) -> str:
    """A header over two lines at its first space outside math ("Layer ratio", "Speed-up
    (meas.)$\\uparrow$"), bottom-aligned, so that headers are no wider than their numbers."""
    head, space, tail = tex.partition(" ")
    if not space or head.count("$") % 2:
        return tex
    # "{}" ends the line break: `\\[95\% CI]` would read "[95\% CI]" as the break's spacing
    # argument, and pdflatex hangs on it without a message.
    return f"\\shortstack[r]{{{head}\\\\{{}}{tail}}}"


def _latex_tabular(frame: pd.DataFrame, cells: pd.DataFrame, mask: pd.DataFrame, columns: list) -> str:
    """One booktabs tabular of the summary's `columns`, rows grouped the papers' way: a method with
    swept settings gets a heading row and one indented row per setting."""
    numbers = [column for column, *_ in columns]
    width = 1 + len(numbers)
    rows, group = [], None
    for index, row in cells.iterrows():
        # Numeric cells already hold LaTeX ($\pm$, \textsuperscript); method and setting are free text.
        values = [f"\\textbf{{{row[c]}}}" if mask.at[index, c] else row[c] for c in numbers]
        if not frame.at[index, "has_setting"]:  # no swept setting: one row, its method
            label, group = _escape_latex(row["Method"]), None
        else:
            if row["Method"] != group:
                rows.append(f"\\multicolumn{{{width}}}{{@{{}}l}}{{{_escape_latex(row['Method'])}}} \\\\")
                group = row["Method"]
            label = "\\quad " + _escape_latex(row["Setting"])
        rows.append(" & ".join([label, *values]) + " \\\\")
    header = " & ".join(["Method, setting"] + [_stacked_header(tex) for _, _, tex, _ in columns]) + " \\\\"
    return ("\\begin{tabular}{@{}l" + "r" * len(numbers) + "@{}}\n\\toprule\n" + header + "\n\\midrule\n"
            + "\n".join(rows) + "\n\\bottomrule\n\\end{tabular}\n")


def summary_latex(frame: pd.DataFrame) -> str:
    r"""summary.tex: the summary as booktabs table* floats (quality, cost, and beside another
    headline Inception's few-sample scores) and their notes as a float of their own, to \input in a paper.

    Readable as it is: \footnotesize type (8 pt in a 10 pt document), never scaled to fit. To fit
    the text width of a two-column paper (table*; in a one-column document table* is a plain
    table), rows are grouped the papers' way: a method with swept settings (early exit, DuoDiff)
    gets a heading row and one indented row per setting, so the first column is only as wide as
    a setting; long headers take two lines. The notes follow in the same size. Needs booktabs.
    """
    numbered = footnotes(frame)
    cells = summary_cells(frame, numbered, latex=True)
    mask = best_mask(frame)
    # Without the paired-difference column (the marks on the headline score carry its verdict, the
    # notes the rule, scores.csv the numbers); quality and cost as two tabulars one above the other,
    # each narrower than a two-column paper's text width (one was 221 pt wider on the default study).
    # Inception's few-sample FID and KID (beside another headline) as a third, secondary tabular.
    columns = [column for column in summary_columns(frame) if column[0] != "score_diff"]
    parts = summary_parts(frame, columns)
    # One float per tabular: a study's grid (~30 sets) makes each tabular about half a page high,
    # so quality, cost and the secondary scores one above the other ran off the page; the notes
    # (most of a page on their own, so in \\scriptsize) are a float of their own, [p]: a page of floats.
    tables = [("quality", "Sample quality per method and setting (full U-ViT, fewer steps, early exit, DuoDiff and "
                          "the study's other methods).", parts["quality"]),
              ("cost", "Sampling cost per method and setting.", parts["cost"])]
    if parts["inception"]:
        tables.append(("inception", "Secondary scores: " + inception_caption(frame), parts["inception"]))
    float_head = "\\begin{table*}[%s]\n\\centering\n\\footnotesize\n\\setlength{\\tabcolsep}{4pt}\n"
    floats = [float_head % "t"
              + f"\\caption{{{_escape_latex(caption)} Notes: Table~\\ref{{tab:duodiff-notes}}.}}\n"
              + f"\\label{{tab:duodiff-{key}}}\n" + _latex_tabular(frame, cells, mask, part) + "\\end{table*}\n"
              for key, caption, part in tables]
    note_text = "\n".join(f"{_escape_latex(note)}\\par" for note in notes(frame, numbered))
    refs = ", ".join(f"\\ref{{tab:duodiff-{key}}}" for key, *_ in tables)
    floats.append(float_head % "p" + f"\\caption{{Notes to Tables {refs}.}}\n\\label{{tab:duodiff-notes}}\n"
                  + "\\begingroup\\scriptsize\\raggedright\\setlength{\\parskip}{1pt}\n" + note_text + "\n\\endgroup\n"
                  + "\\end{table*}\n")
    return ("% duodiff summary tables (`duodiff tables`: results/<experiment>/tables/summary.tex), to \\input in a paper.\n"
            "% Needs \\usepackage{booktabs} (TeX Live: texlive-latex-recommended); nothing else.\n"
            "% One table* per part (in a one-column document, the same as table) in footnotesize type, never\n"
            "% scaled: quality, cost and (beside another headline) Inception's few-sample scores, each under\n"
            "% 450 pt wide with a study's labels, so it fits a two-column paper's text width, and each its own\n"
            "% float, so it fits a page. For a narrower text block, \\scriptsize (7 pt) instead. Rewritten by\n"
            "% `duodiff tables`: edit a copy.\n"
            + "\n".join(floats))


# The HTML summary is what the Snakemake report shows in the browser (it cannot display Markdown),
# in a pane about 1000 px wide at a 1400 px window: headers and the method column wrap, numbers
# and settings do not, and the padding is tight, so that the table fits without sideways scrolling.
HTML_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1em 1.25em; color: #1a1a1a; }
h1 { font-size: 1.3em; }
h2 { font-size: 1.1em; margin-top: 1.5em; }
table { border-collapse: collapse; font-size: 0.85em; }
thead th { border-top: 2px solid #333; border-bottom: 1px solid #333; padding: 0.35em 0.45em; text-align: right;
           vertical-align: bottom; }
thead th:nth-child(-n+2) { text-align: left; }
tbody td { padding: 0.3em 0.45em; text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tbody td:nth-child(-n+2) { text-align: left; }
tbody td:first-child { white-space: normal; min-width: 9em; }
tbody tr:last-child td { border-bottom: 2px solid #333; }
ul { font-size: 0.85em; max-width: 70em; line-height: 1.4; padding-left: 1.25em; }
"""


def summary_html(frame: pd.DataFrame) -> str:
    """summary.html, for the Snakemake report: the answer first (the speed-up at equal quality per
    method), then every set in two tables that fit the report's pane, quality then cost (the same
    cells and bold as the Markdown and LaTeX summaries), then the notes."""
    numbered = footnotes(frame)
    cells = summary_cells(frame, numbered, latex=False)
    # The report's reader gets the probes' names spelled out (the files for code keep identifiers).
    cells["Method"] = cells["Method"].map(readable)
    mask = best_mask(frame)
    headers = {column: md for column, md, _, _ in summary_columns(frame)}
    # Inception's FID and KID beside another headline (the classifier's) get a table of their own.
    parts = {name: [c for c, *_ in columns] for name, columns in summary_parts(frame).items()}
    tables = []
    for name, columns in parts.items():
        if not columns:
            tables.append("")
            continue
        styler = cells[["Method", "Setting", *columns]].style.set_uuid(name).hide(axis="index").format(escape="html")
        styler = styler.apply(lambda column: ["font-weight: bold" if best else "" for best in mask[column.name]],
                              axis=0, subset=[c for c in columns if c in mask.columns])
        tables.append(styler.relabel_index(["Method", "Setting"] + [headers[c] for c in columns], axis=1).to_html())
    note_text = "\n".join(f"<li>{html.escape(note)}</li>" for note in notes(frame, numbered))
    # The report leads with the answer: the speed-up at equal quality per method, then every set.
    points_html = answer_section(frame, heading="h1")
    return ("<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n"
            "<title>duodiff results: sample quality and cost per method</title>\n"
            f"<style>{HTML_STYLE}{ANSWER_STYLE}</style>\n</head>\n<body>\n" + points_html + "\n"
            "<h2>Every set: sample quality</h2>\n"
            "<p>Full U-ViT, the fewer-steps baseline, the shallow U-ViT alone, early exit (DeeDiff/AdaDiff) and "
            "DuoDiff, one row per sample set, below the real-data floor.</p>\n" + tables[0]
            + (f"\n<h2>Every set: Inception FID and KID</h2>\n<p>{html.escape(inception_caption(frame))}</p>\n"
               + tables[1] if tables[1] else "")
            + "\n<h2>Every set: cost</h2>\n" + tables[2] + f"\n<ul>\n{note_text}\n</ul>\n</body>\n</html>\n")


# ---- the report's own pages: the answer for its front page, and each CSV as a table -----------------

ANSWER_STYLE = """
.duodiff-answer { font-family: system-ui, sans-serif; color: #1a1a1a; margin: 0.5em 0 1.5em; max-width: 100%;
                  overflow-x: auto; }
.duodiff-answer h1, .duodiff-answer h2 { font-size: 1.25em; font-weight: 600; margin: 0 0 0.4em; }
.duodiff-answer p { font-size: 0.9em; margin: 0 0 0.6em; max-width: 60em; }
.duodiff-answer table { border-collapse: collapse; font-size: 0.8em; width: 100%; }
.duodiff-answer th { border-top: 2px solid #333; border-bottom: 1px solid #333; padding: 0.35em 0.45em;
                     text-align: right; vertical-align: bottom; font-weight: 600; }
.duodiff-answer td { padding: 0.3em 0.45em; text-align: right; vertical-align: top; font-variant-numeric: tabular-nums;
                     white-space: nowrap; }
.duodiff-answer th:nth-child(-n+2), .duodiff-answer td:nth-child(-n+2) { text-align: left; }
.duodiff-answer td:nth-child(-n+2) { white-space: normal; min-width: 7em; }
.duodiff-answer td.note { white-space: normal; text-align: left; min-width: 9em; }
.duodiff-answer tbody tr:last-child td { border-bottom: 2px solid #333; }
"""


def answer_section(frame: pd.DataFrame, heading: str = "h2") -> str:
    """The answer (the speed-up at equal quality per method, readable names, no set ids) as one
    <section class="duodiff-answer">, styled by ANSWER_STYLE."""
    cells = operating_point_cells(operating_points(frame))
    head = "".join(f"<th>{html.escape(column)}</th>" for column in cells.columns)
    body = "".join(
        "<tr>" + "".join(("<td class=\"note\">" if column == "Note" else "<td>") + f"{html.escape(str(value))}</td>"
                         for column, value in row.items()) + "</tr>\n"
        for _, row in cells.iterrows())
    return (f"<section class=\"duodiff-answer\" id=\"operating-points\">\n<{heading}>Speed-up at equal quality</{heading}>\n"
            f"<p>{html.escape(OPERATING_POINTS_TEXT)}</p>\n"
            f"<table id=\"T_operating_points\">\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>\n</section>\n")


def operating_points_html(frame: pd.DataFrame) -> str:
    """operating_points.html: the answer as one self-styled section, which the report's front page
    (workflow.rst) includes as it is and the report's Tables category shows as a page of its own."""
    return ("<!DOCTYPE html>\n<meta charset=\"utf-8\">\n<title>Speed-up at equal quality</title>\n"
            f"<style>{ANSWER_STYLE}</style>\n" + answer_section(frame))


CSV_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1em 1.25em; color: #1a1a1a; }
h1 { font-size: 1.2em; } p { font-size: 0.9em; max-width: 60em; }
.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; font-size: 0.8em; }
th { border-top: 2px solid #333; border-bottom: 1px solid #333; padding: 0.3em 0.4em; text-align: right;
     vertical-align: bottom; font-weight: 600; }
td { padding: 0.25em 0.4em; text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
tbody tr:nth-child(even) td { background: #f4f4f4; }
"""


def _cell(value) -> str:
    if isinstance(value, float):
        return "" if pd.isna(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def csv_html(csv_path, description: str = "") -> str:
    """A CSV the tables write, as an html page for the report (which shows html, not CSV): every
    column and row as in the file, numbers to 4 significant digits, the file named so a reader
    finds the full precision. Wide tables scroll inside their own box, not the page."""
    from pathlib import Path

    frame = pd.read_csv(csv_path, keep_default_na=False, na_values=[""])
    name = Path(csv_path).name
    head = "".join(f"<th>{html.escape(str(column))}</th>" for column in frame.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>\n"
                   for row in frame.itertuples(index=False))
    return ("<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(name)}</title>\n<style>{CSV_STYLE}</style>\n</head>\n<body>\n"
            f"<h1>{html.escape(name)}</h1>\n"
            + (f"<p>{html.escape(description)}</p>\n" if description else "")
            + f"<p>{len(frame)} rows; this page rounds numbers to 4 significant digits, {html.escape(name)} "
            "beside it holds them in full.</p>\n"
            f"<div class=\"scroll\"><table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table></div>\n"
            "</body>\n</html>\n")
