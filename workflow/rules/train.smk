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
        model_config=config["models"]["full"],
    output:
        model="results/{experiment}/models/full/model.pt",
        loss="results/{experiment}/models/full/loss.csv",
    params:
        folder=subpath(output.model, parent=True),
        flags=train_flags("full"),
    log:
        "results/logs/train_full/{experiment}.log",
    benchmark:
        "results/benchmarks/train_full/{experiment}.tsv"
    threads: config["threads"]["train"]
    priority: 10
    resources:
        gpu=0,  # the Slurm profile's set-resources raises it; one training process per GPU
        **resources("train"),
    conda:
        ENV
    shell:
        "duodiff train --nproc-per-node {resources.gpu} --model uvit --config-path {input.model_config} --log-path {params.folder} "
        "{params.flags} > {log} 2>&1"


rule train_shallow:
    input:
        model_config=shallow_config,
    output:
        model="results/{experiment}/models/shallow_d{depth}/model.pt",
        loss="results/{experiment}/models/shallow_d{depth}/loss.csv",
    params:
        folder=subpath(output.model, parent=True),
        flags=train_flags("shallow"),
    log:
        "results/logs/train_shallow/{experiment}/shallow_d{depth}.log",
    benchmark:
        "results/benchmarks/train_shallow/{experiment}/shallow_d{depth}.tsv"
    threads: config["threads"]["train"]
    resources:
        gpu=0,  # the Slurm profile's set-resources raises it; one training process per GPU
        **resources("train"),
    conda:
        ENV
    shell:
        "duodiff train --nproc-per-node {resources.gpu} --model uvit --config-path {input.model_config} --log-path {params.folder} "
        "{params.flags} > {log} 2>&1"


rule train_early_exit:
    input:
        model_config=config["models"]["full"],
        backbone="results/{experiment}/models/full/model.pt",
    output:
        model="results/{experiment}/models/ee_{classifier_type}/model.pt",
        loss="results/{experiment}/models/ee_{classifier_type}/loss.csv",
    params:
        folder=subpath(output.model, parent=True),
        flags=train_flags("early_exit"),
    log:
        "results/logs/train_early_exit/{experiment}/ee_{classifier_type}.log",
    benchmark:
        "results/benchmarks/train_early_exit/{experiment}/ee_{classifier_type}.tsv"
    threads: config["threads"]["train"]
    priority: 5
    resources:
        gpu=0,  # the Slurm profile's set-resources raises it; one training process per GPU
        **resources("train"),
    conda:
        ENV
    shell:
        "duodiff train --nproc-per-node {resources.gpu} --model early_exit --classifier-type {wildcards.classifier_type} "
        "--load-backbone {input.backbone} --config-path {input.model_config} --log-path {params.folder} "
        "{params.flags} > {log} 2>&1"
