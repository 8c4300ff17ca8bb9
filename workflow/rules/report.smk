# The study's tables and plots (`duodiff tables`, `duodiff plots`), flagged for the Snakemake
# report with the captions in workflow/report/. They go to results/<experiment>/tables/ and
# results/<experiment>/plots/ of the configured experiment (study_path, common.smk), so another
# experiment's study, run in the same folder, keeps its own.
#
# The report's menu lists categories by name, alphabetically, and a category's items by their
# first label (by path when they have none), so the names carry the reading order: the main
# result (the summary table, then the headline score against GFLOPs) first, then the other plots, the tables, and
# the samples (common.smk). A category's items keep to ONE label: Snakemake turns a second label
# with exactly two values into a toggle that merges items.

PLOTS = [
    "quality_vs_gflops",
    "paired_difference",
    "quality_vs_time",
    "exit_heatmap",
    "mean_exit_layer",
    "fid_vs_tswitch",
    "training_curves",
    "sample_grids",
    "search_trace",
]
MAIN_RESULT = "1. Main result"
# The main result's figures, after the summary table: their labels order them in the menu.
# The headline's name as the tables spell it (report.tables.inputs: FD for the classifier, FID for Inception).
HEADLINE_NAME = {"classifier": "FD", "inception": "FID"}[config["metrics"]["headline"]]
MAIN_PLOTS = {
    "quality_vs_gflops": f"2. {HEADLINE_NAME} against GFLOPs per image",
    "paired_difference": "3. Equal quality, paired",
}
REPORT_PLOTS = {
    name: (
        {"category": MAIN_RESULT, "labels": {"result": MAIN_PLOTS[name]}}
        if name in MAIN_PLOTS
        else {"category": "2. Plots"}
    )
    for name in PLOTS
}


rule tables:
    input:
        stats=study_files("stats"),
        real=expand(rules.real_set.output, experiment=config["experiment"]) if config["reference"]["n_real"] else [],
        fid=study_files("fid"),
        fd_classifier=study_files("fd_classifier"),
        cmmd=study_files("cmmd"),
        gflops=study_files("gflops"),
        # Every set timed alone after sampling: the measured speed-ups the tables report.
        timing=rules.timing.output.json,
        # The searches (rules/search.smk): each family's finished trace, and its probes' files.
        search=search_results(),
        probe_stats=probe_files("stats"),
        probe_fid=probe_files("fid"),
        probe_fd_classifier=probe_files("fd_classifier"),
        probe_gflops=probe_files("gflops"),
    output:
        scores=report(
            study_path("tables/scores.csv"),
            caption="../report/scores_table.rst",
            category="3. Tables",
            labels={"table": "1. Headline scores with intervals (scores.csv)"},
        ),
        operating_points=report(
            study_path("tables/operating_points.csv"),
            caption="../report/operating_points.rst",
            category="3. Tables",
            labels={"table": "2. Speed-up at equal quality (operating_points.csv)"},
        ),
        fid=report(
            study_path("tables/fid.csv"),
            caption="../report/fid_table.rst",
            category="3. Tables",
            labels={"table": "3. FID and cost (fid.csv)"},
        ),
        kid=report(
            study_path("tables/kid.csv"),
            caption="../report/kid_table.rst",
            category="3. Tables",
            labels={"table": "4. KID (kid.csv)"},
        ),
        # Listed last: without CLIP weights every row is empty (the summary's notes say why).
        cmmd=report(
            study_path("tables/cmmd.csv"),
            caption="../report/cmmd_table.rst",
            category="3. Tables",
            labels={"table": "6. CMMD (cmmd.csv)"},
        ),
        gflops=report(
            study_path("tables/gflops.csv"),
            caption="../report/gflops_table.rst",
            category="3. Tables",
            labels={"table": "5. GFLOPs (gflops.csv)"},
        ),
        # The report shows html, not Markdown: summary.html is the summary.md table as a page.
        summary_html=report(
            study_path("tables/summary.html"),
            caption="../report/summary.rst",
            category=MAIN_RESULT,
            labels={"result": "1. Summary table"},
        ),
        search=report(
            study_path("tables/search.csv"),
            caption="../report/search_table.rst",
            category="3. Tables",
            labels={"table": "7. Operating-point search, every probe (search.csv)"},
        ),
        summary_md=study_path("tables/summary.md"),
        summary_tex=study_path("tables/summary.tex"),
    log:
        study_path("logs/tables.log"),
    benchmark:
        study_path("benchmarks/tables.tsv")
    conda:
        ENV
    threads: config["threads"]["report"]
    resources:
        **resources("report"),
    params:
        # results/<experiment>/samples/<set>/stats.json -> results/<experiment>/samples
        samples_root=subpath(lambda wildcards, input: input.stats[0], ancestor=2),
        metrics_root=subpath(lambda wildcards, input: input.fid[0], ancestor=2),
        sets=" ".join(scored_sets()),
        headline=config["metrics"]["headline"],
        cmmd="--cmmd" if config["metrics"]["cmmd"]["enabled"] else "--no-cmmd",
        margin=config["metrics"]["equal_quality_margin"],
        output_dir=subpath(output.fid, parent=True),
        search=lambda wildcards, input: f"--search {' '.join(input.search)} " if input.search else "",
    shell:
        "duodiff tables --samples-root {params.samples_root} --metrics-root {params.metrics_root} "
        "--sets {params.sets} --headline {params.headline} {params.cmmd} --margin {params.margin} "
        "--timing {input.timing} {params.search}--output-dir {params.output_dir} > {log} 2>&1"


rule plots:
    input:
        tables=rules.tables.output,
        stats=study_files("stats"),
        exit_layers=study_files("exit_layers"),
        grids=study_files("grids"),
        losses=study_files("losses"),
        reference=expand(rules.reference.output.info, experiment=config["experiment"]),
        # The table's real-data row: its folder must hold images like every set's.
        real=expand(rules.real_set.output, experiment=config["experiment"]) if config["reference"]["n_real"] else [],
    output:
        png=[
            report(study_path(f"plots/{name}.png"), caption=f"../report/{name}.rst", **REPORT_PLOTS[name])
            for name in PLOTS
        ],
        pdf=[study_path(f"plots/{name}.pdf") for name in PLOTS],
        data=[study_path(f"plots/{name}.json") for name in PLOTS],  # the plotted series, as drawn
    log:
        study_path("logs/plots.log"),
    benchmark:
        study_path("benchmarks/plots.tsv")
    conda:
        ENV
    threads: config["threads"]["report"]
    resources:
        **resources("report"),
    params:
        tables_dir=subpath(lambda wildcards, input: input.tables[0], parent=True),
        samples_root=subpath(lambda wildcards, input: input.stats[0], ancestor=2),
        models_root=subpath(lambda wildcards, input: input.losses[0], ancestor=2),
        reference=subpath(lambda wildcards, input: input.reference[0], parent=True),
        output_dir=subpath(lambda wildcards, output: output.png[0], parent=True),
        flags=cli_flags(config["plots"]),
    shell:
        "duodiff plots --tables-dir {params.tables_dir} --samples-root {params.samples_root} "
        "--models-root {params.models_root} --reference {params.reference} --output-dir {params.output_dir} "
        "{params.flags} > {log} 2>&1"


# `snakemake results/tables/fid.csv`, the usage the project was specified with: the configured
# experiment's table, built in its own study folder and copied to results/tables/ (a convenience
# path: each experiment's tables stay in results/<experiment>/tables/, which no other experiment
# writes; the copy is the last requested experiment's).
TABLE_NAMES = ["scores", "operating_points", "fid", "kid", "cmmd", "gflops"]


rule table_copy:
    input:
        study_path("tables/{table}.csv"),
    output:
        "results/tables/{table}.csv",
    log:
        "results/logs/table_copy/{table}.log",
    wildcard_constraints:
        table="|".join(TABLE_NAMES),
    localrule: True
    conda:
        ENV
    shell:
        "cp {input} {output} > {log} 2>&1"
