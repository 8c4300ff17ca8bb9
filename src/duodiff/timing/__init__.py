"""`duodiff time` (rules/timing.smk): every sample set's sampling policy timed alone, after sampling.

time_sets.py runs the sub-command (the sets rebuilt as `duodiff sample` runs them, warm-up, interleaved
rounds, timing.json and timing.csv); intervals.py holds the statistics (the median and its
distribution-free 95% interval).
"""
