# Latent diffusion (config autoencoder): the training images, and their mirror images where the
# dataset is flipped in training, encoded once into the autoencoder's scaled latents, which every
# training reads (`duodiff train --latents`). The Snakefile includes this file only when
# autoencoder.path is set.
#
# Only latents.npz is declared. The finished chunks lie beside it in latents.npz.chunks/,
# undeclared: Snakemake deletes the declared outputs of a killed job, and the chunks let the rerun
# encode only what is left (`duodiff encode` is resumable by chunks). --restart: chunks made
# from another autoencoder, other images or settings are discarded, not refused (Snakemake has
# already decided the job must run).


rule encode:
    input:
        **autoencoder_inputs(),
    output:
        latents=LATENTS,
    log:
        "results/{experiment}/logs/encode.log",
    benchmark:
        "results/{experiment}/benchmarks/encode.tsv"
    priority: 20  # every training waits for it
    conda:
        ENV
    threads: config["threads"]["train"]
    resources:
        **resources("train"),
    params:
        flags=encode_flags(),
    shell:
        "duodiff encode --restart --output {output.latents} {params.flags} > {log} 2>&1"
