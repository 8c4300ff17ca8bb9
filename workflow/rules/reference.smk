# The real images every sample set is compared with: Inception features (FID/KID) and the
# images themselves (CMMD embeds them with CLIP), written by `duodiff reference`.


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
