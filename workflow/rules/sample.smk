# Sampling: one `duodiff sample` job per sample set. Every set uses the same sampler, steps,
# number of samples and seed (config `sampling`), so all methods start from the same noise.
#
# Declared outputs are stats.json (written last), grid.png and exit_layers.pt. The images/ and
# parts/ folders are not declared: Snakemake deletes the declared outputs of a killed job, and
# the finished batches in parts/ let the rerun resume where it stopped.


rule sample_full:
    input:
        model=rules.train_full.output.model,
    output:
        **sample_outputs("full", "full"),
    log:
        "results/{experiment}/logs/sample_full/full.log",
    benchmark:
        "results/{experiment}/benchmarks/sample_full/full.tsv"
    conda:
        ENV
    threads: config["threads"]["sample"]
    resources:
        **resources("sample"),
    params:
        folder=subpath(output.stats, parent=True),
        flags=sampling_flags(),
    shell:
        "duodiff sample --method full --checkpoint-path {input.model} {params.flags} "
        "--output-folder {params.folder} > {log} 2>&1"


rule sample_fewer_steps:
    input:
        model=rules.sample_full.input.model,
    output:
        **sample_outputs("full_steps{steps}", "fewer_steps"),
    log:
        "results/{experiment}/logs/sample_fewer_steps/full_steps{steps}.log",
    benchmark:
        "results/{experiment}/benchmarks/sample_fewer_steps/full_steps{steps}.tsv"
    conda:
        ENV
    threads: config["threads"]["sample"]
    resources:
        **resources("sample"),
    params:
        folder=subpath(output.stats, parent=True),
        flags=lambda wildcards: sampling_flags(steps=int(wildcards.steps)),
    shell:
        "duodiff sample --method full --checkpoint-path {input.model} {params.flags} "
        "--output-folder {params.folder} > {log} 2>&1"


rule sample_shallow:
    input:
        model=rules.train_shallow.output.model,
    output:
        **sample_outputs("shallow_d{depth}", "shallow"),
    log:
        "results/{experiment}/logs/sample_shallow/shallow_d{depth}.log",
    benchmark:
        "results/{experiment}/benchmarks/sample_shallow/shallow_d{depth}.tsv"
    conda:
        ENV
    threads: config["threads"]["sample"]
    resources:
        **resources("sample"),
    params:
        folder=subpath(output.stats, parent=True),
        flags=sampling_flags(),
    shell:
        "duodiff sample --method shallow --checkpoint-path {input.model} {params.flags} "
        "--output-folder {params.folder} > {log} 2>&1"


rule sample_early_exit:
    input:
        model=rules.train_early_exit.output.model,
    output:
        **sample_outputs("ee_{classifier_type}_thr{threshold}", "early_exit"),
    log:
        "results/{experiment}/logs/sample_early_exit/ee_{classifier_type}_thr{threshold}.log",
    benchmark:
        "results/{experiment}/benchmarks/sample_early_exit/ee_{classifier_type}_thr{threshold}.tsv"
    conda:
        ENV
    threads: config["threads"]["sample"]
    resources:
        **resources("sample"),
    params:
        folder=subpath(output.stats, parent=True),
        flags=sampling_flags(),
    shell:
        "duodiff sample --method early_exit --checkpoint-path {input.model} --threshold {wildcards.threshold} "
        "{params.flags} --output-folder {params.folder} > {log} 2>&1"


rule sample_duodiff:
    input:
        shallow=rules.train_shallow.output.model,
        full=rules.train_full.output.model,
    output:
        **sample_outputs("duodiff_d{depth}_ts{t_switch}", "duodiff"),
    log:
        "results/{experiment}/logs/sample_duodiff/duodiff_d{depth}_ts{t_switch}.log",
    benchmark:
        "results/{experiment}/benchmarks/sample_duodiff/duodiff_d{depth}_ts{t_switch}.tsv"
    conda:
        ENV
    threads: config["threads"]["sample"]
    resources:
        **resources("sample"),
    params:
        folder=subpath(output.stats, parent=True),
        flags=sampling_flags(),
    shell:
        "duodiff sample --method duodiff --checkpoint-path {input.shallow} --checkpoint-path-late {input.full} "
        "--t-switch {wildcards.t_switch} {params.flags} --output-folder {params.folder} > {log} 2>&1"
