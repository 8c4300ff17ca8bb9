"""`duodiff search`: the operating points found by search (bisect.py: the next probe; rounds.py:
one round of the workflow's checkpoint search_round, workflow/rules/search.smk)."""
