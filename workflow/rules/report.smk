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
# The other figures' menu entries, in reading order (without a label the menu lists their paths).
OTHER_PLOTS = {
    "quality_vs_time": f"1. {HEADLINE_NAME} against sampling time",
    "exit_heatmap": "2. Where early exit exits",
    "mean_exit_layer": "3. Mean exit layer per step",
    "fid_vs_tswitch": f"4. {HEADLINE_NAME} against t_switch",
    "search_trace": "5. Operating-point search",
    "training_curves": "6. Training curves",
    "sample_grids": "7. Sample grids, every set",
}
REPORT_PLOTS = {
    name: (
        {"category": MAIN_RESULT, "labels": {"result": MAIN_PLOTS[name]}}
        if name in MAIN_PLOTS
        else {"category": "2. Plots", "labels": {"figure": OTHER_PLOTS[name]}}
    )
    for name in PLOTS
}


# The tables as the report shows them: {name: (caption, label)} of each tables/<name>.html, the
# html page of <name>.csv. operating_points.html, the answer, is also the report's front page's
# first section (workflow.rst includes it).
REPORT_TABLES = {
    "scores": ("scores_table", "1. Headline scores with intervals (scores.csv)"),
    "operating_points": ("operating_points", "2. Speed-up at equal quality (operating_points.csv)"),
    "fid": ("fid_table", "3. FID and cost (fid.csv)"),
    "kid": ("kid_table", "4. KID (kid.csv)"),
    "gflops": ("gflops_table", "5. GFLOPs (gflops.csv)"),
    # Listed last but one: without CLIP weights every row is empty (the summary's notes say why).
    "cmmd": ("cmmd_table", "6. CMMD (cmmd.csv)"),
    "search": ("search_table", "7. Operating-point search, every probe (search.csv)"),
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
        **{
            f"{name}_html": report(
                study_path(f"tables/{name}.html"),
                caption=f"../report/{caption}.rst",
                category="3. Tables",
                labels={"table": label},
            )
            for name, (caption, label) in REPORT_TABLES.items()
        },
        # The report shows html, not Markdown: summary.html is the summary.md table as a page.
        # The CSVs, and for the report (which shows html and offers a CSV only as a download) each
        # as an html page (`duodiff tables`), flagged with the CSV's caption and label.
        scores=study_path("tables/scores.csv"),
        operating_points=study_path("tables/operating_points.csv"),
        fid=study_path("tables/fid.csv"),
        kid=study_path("tables/kid.csv"),
        cmmd=study_path("tables/cmmd.csv"),
        gflops=study_path("tables/gflops.csv"),
        search=study_path("tables/search.csv"),
        summary_html=report(
            study_path("tables/summary.html"),
            caption="../report/summary.rst",
            category=MAIN_RESULT,
            labels={"result": "1. Summary table"},
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
        # The real images beside the sample sets' grids, in the report's Samples (common.smk).
        reference_grid=report(
            study_path("plots/reference_grid.png"),
            caption="../report/reference_grid.rst",
            category="4. Samples",
            subcategory=SAMPLE_SUBCATEGORIES["real"],
            labels={"set": "real images (the reference)"},
        ),
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
