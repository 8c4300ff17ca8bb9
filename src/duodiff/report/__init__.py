"""`duodiff tables` and `duodiff plots` (workflow/rules/report.smk): what a reader sees.

Reads the metrics' and sample sets' result files (never a model or a training run).

    tables/   the csv tables, summary.md / .tex / .html and the operating points
    plots/    the figures
"""
