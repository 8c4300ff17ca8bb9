# Operating points found by search (`duodiff search`; docs/architecture.md, "Search"): per method
# family (search_families, common.smk) the cheapest setting of its knob that passes the paired test
# of equal quality, bisected between the cheapest pass and the cheapest failure, the grid's sets
# as the first bracket.
#
# Snakemake checkpoints drive the rounds, so the DAG only ever holds what is known: round 0 reads
# the family's grid scores; round r reads round r-1's file (checkpoints.search_round.get, which
# raises until that round has run) and the score of the probe it named, an ordinary sample set
# (ee_attention_probe_thr0.17) that rules sample_* and score make like any other. `snakemake -n`
# therefore plans round 0 of every family and nothing after it; once a round has run, the next
# round and its probe's sample and score jobs join the DAG. A probe already sampled or scored is
# not computed again (its files exist), and a finished search is read back from its round files.


checkpoint search_round:
    input:
        unpack(search_round_inputs),
    output:
        "results/{experiment}/search/{family}/round{round}.json",
    log:
        "results/{experiment}/logs/search/{family}/round{round}.log",
    benchmark:
        "results/{experiment}/benchmarks/search/{family}/round{round}.tsv"
    wildcard_constraints:
        family=r"[A-Za-z0-9][A-Za-z0-9_-]*",
        round=r"\d+",
    localrule: True
    conda:
        ENV
    threads: 1
    resources:
        **resources("report"),
    params:
        flags=search_flags,
        previous=lambda wildcards, input: f"--previous {input.previous}" if "previous" in input.keys() else "",
        metrics_root=lambda wildcards, input: str(Path(input.full).parent.parent),
    shell:
        "duodiff search {params.flags} {params.previous} --metrics-root {params.metrics_root} "
        "--output {output} > {log} 2>&1"


# A family's finished search at a path known before it runs (SEARCH_RESULT, common.smk): rule all
# asks for every family's, so all searches run side by side; the tables and the timing job read
# the probes from them (search_probe_sets).
checkpoint search_result:
    input:
        last_round,
    output:
        SEARCH_RESULT,
    log:
        "results/{experiment}/logs/search/{family}/search.log",
    wildcard_constraints:
        family=r"[A-Za-z0-9][A-Za-z0-9_-]*",
    localrule: True
    conda:
        ENV
    threads: 1
    resources:
        **resources("report"),
    shell:
        "duodiff search-result --last-round {input} --output {output} > {log} 2>&1"


# The probes' GFLOPs: rule flops counts the grid's sets in one job, whose outputs are fixed before
# any search has run; a probe set is counted by a job of its own (a few seconds each).
rule flops_probe:
    input:
        unpack(sample_models),
        stats=set_file("stats"),
        exit_layers=set_file("exit_layers"),
    output:
        "results/{experiment}/metrics/{set}/gflops.json",
    log:
        "results/{experiment}/logs/flops_probe/{set}.log",
    benchmark:
        "results/{experiment}/benchmarks/flops_probe/{set}.tsv"
    conda:
        ENV
    threads: config["threads"]["score"]
    resources:
        **resources("score"),
    params:
        samples=subpath(input.stats, parent=True),
    shell:
        "duodiff flops --samples {params.samples} --output {output} > {log} 2>&1"


ruleorder: flops > flops_probe
