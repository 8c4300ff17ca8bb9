# Timing: every sample set's sampling policy timed once more, after sampling, in one job with the
# machine to itself (`duodiff time`). The sampling jobs time themselves beside whatever else runs
# (other sets, scores; on slurm other GPU models too), so their images/s are not comparable; this
# job rebuilds each set from its stats.json and times them all on one device, interleaved in
# rounds, against the full model (docs/architecture.md, "Timing files").
#
# Alone: locally the job asks for every core Snakemake was given (`threads: workflow.cores`), so
# the scheduler starts it only when nothing else runs and starts nothing beside it; torch's own
# thread count is the config's timing.threads, not the job's threads. On slurm it is a job of its
# own on one node with one GPU and the node to itself (profiles/slurm: set-resources timing).


rule timing:
    input:
        unpack(study_models),  # the checkpoints the stats.json files name: their networks are timed
        unpack(probe_models),  # and the searches' probes' (rules/search.smk: known once the searches are done)
        stats=study_files("stats"),
        probes=probe_files("stats"),
        search=search_results(),  # timed once every search is done (rules/search.smk)
    output:
        json=study_path("timing/timing.json"),
        csv=study_path("timing/timing.csv"),
    log:
        study_path("logs/timing.log"),
    benchmark:
        study_path("benchmarks/timing.tsv")
    conda:
        ENV
    threads: workflow.cores
    resources:
        **resources("timing"),
    params:
        # The probes are known once the searches are done; before, a dry run shows Snakemake's <TBD>.
        samples=lambda wildcards, input: [str(Path(path).parent) for path in input.stats]
        + ([input.probes] if isinstance(input.probes, str) else [str(Path(path).parent) for path in input.probes]),
        baseline=SET_NAMES["full"],
        output_dir=subpath(output.json, parent=True),
        flags=timing_flags(),
    shell:
        "duodiff time --samples {params.samples} --baseline {params.baseline} --output-dir {params.output_dir} "
        "{params.flags} > {log} 2>&1"
