# Training: the full U-ViT, every shallow U-ViT, and one early-exit model per classifier type on
# top of the trained full U-ViT.
#
# Only model.pt and loss.csv are declared outputs. The resumable state, checkpoint.pt, lies beside
# them undeclared: Snakemake deletes the declared outputs of a failed or killed job, and keeping
# checkpoint.pt lets the rerun (rerun-incomplete, a slurm retry after a time limit) resume instead
# of starting over.
#
# GPUs: `--nproc-per-node {resources.gpu}` starts one DDP process per GPU the job was given (0 or 1:
# a single process), at the same global batch. It is a resource, not a param, so moving a run to
# more GPUs does not count as a changed setting that retrains it.
#
# The full model is on the critical path (every early-exit model and most sample sets wait for
# it), so it and the early-exit trainings start first when cores are scarce.


rule train_full:
    input:
        **latent_inputs(),  # latent diffusion: the latents of rule encode (common.smk)
        model_config=config["models"]["full"],
    output:
        model="results/{experiment}/models/full/model.pt",
        loss="results/{experiment}/models/full/loss.csv",
    log:
        "results/{experiment}/logs/train_full.log",
    benchmark:
        "results/{experiment}/benchmarks/train_full.tsv"
    priority: 10
    conda:
        ENV
    threads: config["threads"]["train"]
    resources:
        **resources("train"),
        gpu=0,  # the Slurm profile's set-resources raises it; one training process per GPU
    params:
        folder=subpath(output.model, parent=True),
        flags=train_flags("full"),
    shell:
        "duodiff train --restart --nproc-per-node {resources.gpu} --model uvit --config-path {input.model_config} --log-path {params.folder} "
        "{params.flags} > {log} 2>&1"


# The shallow U-ViT trains exactly like the full one: the same command, environment, threads and
# resources; it states only its files, its settings (train.shallow) and its priority.
use rule train_full as train_shallow with:
    input:
        **latent_inputs(),
        model_config=shallow_config,
    output:
        model="results/{experiment}/models/shallow_d{depth}/model.pt",
        loss="results/{experiment}/models/shallow_d{depth}/loss.csv",
    log:
        "results/{experiment}/logs/train_shallow/shallow_d{depth}.log",
    benchmark:
        "results/{experiment}/benchmarks/train_shallow/shallow_d{depth}.tsv"
    priority: 0  # off the critical path: no other training waits for a shallow model
    params:
        flags=train_flags("shallow"),


# A rule of its own, not a `use rule` variant: `use rule` cannot change the command, and a generic
# command would change train_full's text, which the `code` rerun trigger (profiles/) would answer
# by retraining every finished full model.
rule train_early_exit:
    input:
        **latent_inputs(),
        model_config=config["models"]["full"],
        backbone=rules.train_full.output.model,
    output:
        model="results/{experiment}/models/ee_{classifier_type}/model.pt",
        loss="results/{experiment}/models/ee_{classifier_type}/loss.csv",
    log:
        "results/{experiment}/logs/train_early_exit/ee_{classifier_type}.log",
    benchmark:
        "results/{experiment}/benchmarks/train_early_exit/ee_{classifier_type}.tsv"
    priority: 5
    conda:
        ENV
    threads: config["threads"]["train"]
    resources:
        **resources("train"),
        gpu=0,  # the Slurm profile's set-resources raises it; one training process per GPU
    params:
        folder=subpath(output.model, parent=True),
        flags=train_flags("early_exit"),
    shell:
        "duodiff train --restart --nproc-per-node {resources.gpu} --model early_exit --classifier-type {wildcards.classifier_type} "
        "--load-backbone {input.backbone} --config-path {input.model_config} --log-path {params.folder} "
        "{params.flags} > {log} 2>&1"


# Learning-to-Cache's router (config `learning_to_cache`): the frozen full model, trained for the
# study's sampler and steps (one gate per cache step and layer); `duodiff train-router` resumes its
# checkpoint.pt like `duodiff train`, which lies beside router.pt undeclared for the same reason.
rule train_router:
    input:
        model=trained(rules.train_full.output.model),
    output:
        router="results/{experiment}/models/router/router.pt",
        loss="results/{experiment}/models/router/loss.csv",
    log:
        "results/{experiment}/logs/train_router.log",
    benchmark:
        "results/{experiment}/benchmarks/train_router.tsv"
    priority: 5
    conda:
        ENV
    threads: config["threads"]["train"]
    resources:
        **resources("train"),
    params:
        folder=subpath(output.router, parent=True),
        flags=router_flags(),
    shell:
        "duodiff train-router --restart --checkpoint-path {input.model} --output-folder {params.folder} "
        "{params.flags} > {log} 2>&1"
