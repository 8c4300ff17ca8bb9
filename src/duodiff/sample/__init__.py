"""`duodiff sample` (workflow/rules/sample.smk): one sample set per method and setting.

    sample_set.py   run_sample: the one check pass, the resumable batches, stats.json, grid.png
    setup.py        device and precision, loading the set's models, warm-up, the timing clock
    policies.py     sampling policies: what runs at each step and what it costs (full, DuoDiff,
                    early exit)

The samplers themselves (DDPM, DDIM, DPM-Solver) and classifier-free guidance live in duodiff.core:
training, conversion and the FLOPs count use them too.
"""
