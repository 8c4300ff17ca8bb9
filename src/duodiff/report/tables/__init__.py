"""The tables (`duodiff tables`).

    collect.py           run_tables: collect the sets into one frame, write every table
    inputs.py            reading and checking each set's files (TableSettings: the run's settings)
    operating_points.py  comparisons with the full model, speed-ups, operating points
    cells.py             the summary table's cells (a score with its interval, a speed-up, ...)
    notes.py             the notes under the summary table
    formats.py           the summary in Markdown, LaTeX and HTML
"""
