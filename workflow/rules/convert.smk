# Starting from a published U-ViT checkpoint (models.full_checkpoint): the full model is converted
# by `duodiff convert` instead of trained. The Snakefile includes this file only when the key is
# set. convert_full makes the model.pt train_full would; the ruleorder makes Snakemake choose it,
# so the early-exit trainings and the sample jobs (whose input is rules.train_full.output.model)
# build on the converted model, and train_full is never planned (nothing asks for models/full's
# loss.csv then: common.smk's model_dirs leaves it out).


def check_full_checkpoint(config) -> None:
    """What a U-ViT checkpoint needs of the config, refused before any job starts (duodiff
    convert checks the same; the workflow does not import duodiff, see common.smk)."""
    full_path, diffusion = config["models"]["full"], config["diffusion"]
    if read_model_config(full_path).get("normalize_timesteps", False):
        raise ValueError(
            f"invalid config: models.full_checkpoint is set, but models.full {full_path} has normalize_timesteps: "
            "true; U-ViT's checkpoints see the raw step (t * 999): use a model file with normalize_timesteps: false"
        )
    if diffusion["num_timesteps"] != 1000 or diffusion["parametrization"] != "predict_noise":
        raise ValueError(
            f"invalid config: models.full_checkpoint is set, but diffusion has num_timesteps {diffusion['num_timesteps']} "
            f"and parametrization {diffusion['parametrization']}; U-ViT's checkpoints need 1000 and predict_noise"
        )


check_full_checkpoint(config)


def convert_flags() -> str:
    """The diffusion settings stored in model.pt, and the dataset the model is recorded under."""
    return " ".join([cli_flags(config["diffusion"]), cli_flags({"dataset": config["dataset"]["name"]})])


ruleorder: convert_full > train_full


rule convert_full:
    input:
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
