# The real images every sample set is compared with, once per dataset: the images and their
# Inception features (FID/KID) from `duodiff reference`, their CLIP embeddings (CMMD) from
# `duodiff cmmd-reference`.


rule reference:
    output:
        features="results/{experiment}/reference/features.npz",
        info="results/{experiment}/reference/reference.json",
    params:
        folder=subpath(output.features, parent=True),
        flags=reference_flags(),
    log:
        "results/logs/reference/{experiment}.log",
    benchmark:
        "results/benchmarks/reference/{experiment}.tsv"
    threads: config["threads"]["score"]
    resources:
        **resources("score"),
    conda:
        ENV
    shell:
        "duodiff reference {params.flags} --output-folder {params.folder} > {log} 2>&1"


rule cmmd_reference:
    input:
        "results/{experiment}/reference/reference.json",
    output:
        "results/{experiment}/reference/clip_embeddings.npz",
    params:
        folder=subpath(input[0], parent=True),
        flags=cmmd_flags(),
    log:
        "results/logs/cmmd_reference/{experiment}.log",
    benchmark:
        "results/benchmarks/cmmd_reference/{experiment}.tsv"
    threads: config["threads"]["score"]
    resources:
        **resources("score"),
    conda:
        ENV
    shell:
        "duodiff cmmd-reference --reference {params.folder} --output {output} {params.flags} > {log} 2>&1"
