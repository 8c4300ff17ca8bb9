"""The figures (`duodiff plots`).

    quality.py   run_plots; quality against GFLOPs and time, quality against t_switch
    style.py     the shared style: palette, sizes, set labels
    exits.py     exit-layer heat maps and the mean exit layer
    training.py  training curves
    samples.py   sample grids
    labels.py    non-overlapping point labels
"""
