# Sampling: one `duodiff sample` job per sample set. Every set uses the same sampler, steps,
# number of samples and seed (config `sampling`), so all methods start from the same noise.
#
# Declared outputs are stats.json (written last), grid.png and exit_layers.pt. The images/ and
# parts/ folders are not declared: Snakemake deletes the declared outputs of a killed job, and
# the finished batches in parts/ let the rerun resume where it stopped.
#
# One family: sample_full is the base, and every other set is a `use rule` variant of it that
# states its model(s), its set name and its params. `use rule` cannot change the command, so the
# command is written once with the method's parts as params: `method`, `checkpoints` (the model
# paths: derived from the inputs, they stay out of the params rerun trigger, which the inputs'
# own trigger covers) and `flags`, which starts with the set's own setting (threshold, t_switch).


rule sample_full:
    input:
        **autoencoder_inputs(),  # latent diffusion: each batch is decoded (common.smk)
        model=trained(rules.train_full.output.model),
    output:
        **sample_outputs("full"),
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
        method="full",
        checkpoints=lambda wildcards, input: f"--checkpoint-path {input.model}",
        flags=sampling_flags(),
        folder=subpath(output.stats, parent=True),
    shell:
        "duodiff sample --restart --method {params.method} {params.checkpoints} {params.flags} "
        "--output-folder {params.folder} > {log} 2>&1"


use rule sample_full as sample_fewer_steps with:
    output:
        **sample_outputs("fewer_steps"),
    log:
        "results/{experiment}/logs/sample_fewer_steps/full_steps{steps}.log",
    benchmark:
        "results/{experiment}/benchmarks/sample_fewer_steps/full_steps{steps}.tsv"
    params:
        flags=lambda wildcards: sampling_flags(steps=int(wildcards.steps)),


use rule sample_full as sample_shallow with:
    input:
        **autoencoder_inputs(),
        model=trained(rules.train_shallow.output.model),
    output:
        **sample_outputs("shallow"),
    log:
        "results/{experiment}/logs/sample_shallow/shallow_d{depth}.log",
    benchmark:
        "results/{experiment}/benchmarks/sample_shallow/shallow_d{depth}.tsv"
    params:
        method="shallow",


use rule sample_full as sample_early_exit with:
    input:
        **autoencoder_inputs(),
        model=trained(rules.train_early_exit.output.model),
    output:
        **sample_outputs("early_exit"),
    log:
        "results/{experiment}/logs/sample_early_exit/ee_{classifier_type}_thr{threshold}.log",
    benchmark:
        "results/{experiment}/benchmarks/sample_early_exit/ee_{classifier_type}_thr{threshold}.tsv"
    params:
        method="early_exit",
        flags=lambda wildcards: f"--threshold {wildcards.threshold} {sampling_flags()}",


use rule sample_full as sample_duodiff with:
    input:
        **autoencoder_inputs(),
        shallow=trained(rules.train_shallow.output.model),
        full=trained(rules.train_full.output.model),
    output:
        **sample_outputs("duodiff"),
    log:
        "results/{experiment}/logs/sample_duodiff/duodiff_d{depth}_ts{t_switch}.log",
    benchmark:
        "results/{experiment}/benchmarks/sample_duodiff/duodiff_d{depth}_ts{t_switch}.tsv"
    params:
        method="duodiff",
        # The shallow model denoises the first t_switch steps, the full one the rest.
        checkpoints=lambda wildcards, input: f"--checkpoint-path {input.shallow} --checkpoint-path-late {input.full}",
        flags=lambda wildcards: f"--t-switch {wildcards.t_switch} {sampling_flags()}",


# DeepCache-style caching (config `cache`): the full model, its inner blocks taken from the last
# full pass on the steps between (`duodiff sample --method cache`).


use rule sample_full as sample_cache with:
    output:
        **sample_outputs("cache"),
    log:
        "results/{experiment}/logs/sample_cache/cache_N{cache_interval}_k{cache_keep}.log",
    benchmark:
        "results/{experiment}/benchmarks/sample_cache/cache_N{cache_interval}_k{cache_keep}.tsv"
    params:
        method="cache",
        flags=lambda wildcards: (
            f"--cache-interval {wildcards.cache_interval} --cache-keep {wildcards.cache_keep} {sampling_flags()}"
        ),


# Learning-to-Cache (config `learning_to_cache`): the full model and the study's trained router;
# on the cache steps a layer whose gate is at most the threshold reuses its last residual.


use rule sample_full as sample_l2c with:
    input:
        **autoencoder_inputs(),
        model=trained(rules.train_full.output.model),
        router=rules.train_router.output.router,
    output:
        **sample_outputs("l2c"),
    log:
        "results/{experiment}/logs/sample_l2c/l2c_thr{router_threshold}.log",
    benchmark:
        "results/{experiment}/benchmarks/sample_l2c/l2c_thr{router_threshold}.tsv"
    params:
        method="l2c",
        checkpoints=lambda wildcards, input: f"--checkpoint-path {input.model} --router {input.router}",
        flags=lambda wildcards: f"--router-threshold {wildcards.router_threshold} {sampling_flags()}",


# Composed policies (config `composed`, common.smk): the same `duodiff sample` methods at fewer
# steps, or DuoDiff whose late model is the early-exit model (the frozen full backbone with its
# heads and probes), its exit rule running in the full model's phase.


use rule sample_full as sample_composed_early_exit_steps with:
    input:
        **autoencoder_inputs(),
        model=trained(rules.train_early_exit.output.model),
    output:
        **sample_outputs("early_exit_steps"),
    log:
        "results/{experiment}/logs/sample_composed_early_exit_steps/ee_{classifier_type}_thr{threshold}_steps{steps}.log",
    benchmark:
        "results/{experiment}/benchmarks/sample_composed_early_exit_steps/ee_{classifier_type}_thr{threshold}_steps{steps}.tsv"
    params:
        method="early_exit",
        flags=lambda wildcards: f"--threshold {wildcards.threshold} {sampling_flags(steps=int(wildcards.steps))}",


use rule sample_full as sample_composed_duodiff_steps with:
    input:
        **autoencoder_inputs(),
        shallow=trained(rules.train_shallow.output.model),
        full=trained(rules.train_full.output.model),
    output:
        **sample_outputs("duodiff_steps"),
    log:
        "results/{experiment}/logs/sample_composed_duodiff_steps/duodiff_d{depth}_ts{t_switch}_steps{steps}.log",
    benchmark:
        "results/{experiment}/benchmarks/sample_composed_duodiff_steps/duodiff_d{depth}_ts{t_switch}_steps{steps}.tsv"
    params:
        method="duodiff",
        checkpoints=lambda wildcards, input: f"--checkpoint-path {input.shallow} --checkpoint-path-late {input.full}",
        flags=lambda wildcards: f"--t-switch {wildcards.t_switch} {sampling_flags(steps=int(wildcards.steps))}",


use rule sample_full as sample_composed_duodiff_early_exit with:
    input:
        **autoencoder_inputs(),
        shallow=trained(rules.train_shallow.output.model),
        early_exit=trained(rules.train_early_exit.output.model),
    output:
        **sample_outputs("duodiff_early_exit"),
    log:
        "results/{experiment}/logs/sample_composed_duodiff_early_exit/duodiff_d{depth}_ts{t_switch}_ee_{classifier_type}_thr{threshold}.log",
    benchmark:
        "results/{experiment}/benchmarks/sample_composed_duodiff_early_exit/duodiff_d{depth}_ts{t_switch}_ee_{classifier_type}_thr{threshold}.tsv"
    params:
        method="duodiff",
        # The shallow model for the first t_switch steps, then the early-exit model with its exit rule.
        checkpoints=lambda wildcards, input: f"--checkpoint-path {input.shallow} --checkpoint-path-late {input.early_exit}",
        flags=lambda wildcards: f"--t-switch {wildcards.t_switch} --threshold {wildcards.threshold} {sampling_flags()}",


use rule sample_full as sample_composed_duodiff_early_exit_steps with:
    input:
        **autoencoder_inputs(),
        shallow=trained(rules.train_shallow.output.model),
        early_exit=trained(rules.train_early_exit.output.model),
    output:
        **sample_outputs("duodiff_early_exit_steps"),
    log:
        "results/{experiment}/logs/sample_composed_duodiff_early_exit_steps/duodiff_d{depth}_ts{t_switch}_ee_{classifier_type}_thr{threshold}_steps{steps}.log",
    benchmark:
        "results/{experiment}/benchmarks/sample_composed_duodiff_early_exit_steps/duodiff_d{depth}_ts{t_switch}_ee_{classifier_type}_thr{threshold}_steps{steps}.tsv"
    params:
        method="duodiff",
        checkpoints=lambda wildcards, input: f"--checkpoint-path {input.shallow} --checkpoint-path-late {input.early_exit}",
        flags=lambda wildcards: (
            f"--t-switch {wildcards.t_switch} --threshold {wildcards.threshold} "
            f"{sampling_flags(steps=int(wildcards.steps))}"
        ),


use rule sample_full as sample_composed_duodiff_cache with:
    input:
        **autoencoder_inputs(),
        shallow=trained(rules.train_shallow.output.model),
        full=trained(rules.train_full.output.model),
    output:
        **sample_outputs("duodiff_cache"),
    log:
        "results/{experiment}/logs/sample_composed_duodiff_cache/duodiff_d{depth}_ts{t_switch}_cache_N{cache_interval}_k{cache_keep}.log",
    benchmark:
        "results/{experiment}/benchmarks/sample_composed_duodiff_cache/duodiff_d{depth}_ts{t_switch}_cache_N{cache_interval}_k{cache_keep}.tsv"
    params:
        method="duodiff",
        # The shallow model for the first t_switch steps, then the full model cached as a cache set is.
        checkpoints=lambda wildcards, input: f"--checkpoint-path {input.shallow} --checkpoint-path-late {input.full}",
        flags=lambda wildcards: (
            f"--t-switch {wildcards.t_switch} --cache-interval {wildcards.cache_interval} "
            f"--cache-keep {wildcards.cache_keep} {sampling_flags()}"
        ),
