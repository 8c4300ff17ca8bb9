# Starting from a published U-ViT checkpoint (models.full_checkpoint): the full model is converted
# by `duodiff convert` instead of trained. The Snakefile includes this file only when the key is
# set. convert_full makes the model.pt train_full would; the ruleorder makes Snakemake choose it,
# so the early-exit trainings and the sample jobs (whose input is rules.train_full.output.model)
# build on the converted model, and train_full is never planned (nothing asks for models/full's
# loss.csv then: common.smk's study_files leaves it out).


check_full_checkpoint(config)  # validation.smk


ruleorder: convert_full > train_full


rule convert_full:
    input:
        **autoencoder_inputs(),  # a latent checkpoint records its autoencoder (common.smk)
        checkpoint=config["models"]["full_checkpoint"],
        model_config=config["models"]["full"],
    output:
        model="results/{experiment}/models/full/model.pt",
    log:
        "results/{experiment}/logs/convert_full.log",
    benchmark:
        "results/{experiment}/benchmarks/convert_full.tsv"
    priority: 10
    conda:
        ENV
    threads: 1
    resources:
        **resources("train"),
    params:
        flags=convert_flags(),
    shell:
        "duodiff convert --checkpoint {input.checkpoint} --config-path {input.model_config} --output {output.model} "
        "{params.flags} > {log} 2>&1"
