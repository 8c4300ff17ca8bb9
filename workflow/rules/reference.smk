# The real images every sample set is compared with, once per dataset: the images and their
# Inception features (FID/KID) from `duodiff reference`, their CLIP embeddings (CMMD) from
# `duodiff cmmd-reference`; the real images that are not in the reference, scored like a sample
# set (the floor), from `duodiff real-set`; and, for metrics.headline classifier, the dataset's
# own feature network from `duodiff feature-net`.


rule reference:
    output:
        features="results/{experiment}/reference/features.npz",
        info="results/{experiment}/reference/reference.json",
    log:
        "results/{experiment}/logs/reference.log",
    benchmark:
        "results/{experiment}/benchmarks/reference.tsv"
    conda:
        ENV
    threads: config["threads"]["score"]
    resources:
        **resources("score"),
    params:
        command="reference",
        flags=reference_flags(),
        folder=subpath(output.features, parent=True),
    shell:
        "duodiff {params.command} {params.flags} --output-folder {params.folder} > {log} 2>&1"


rule cmmd_reference:
    input:
        rules.reference.output.info,
    output:
        "results/{experiment}/reference/clip_embeddings.npz",
    log:
        "results/{experiment}/logs/cmmd_reference.log",
    benchmark:
        "results/{experiment}/benchmarks/cmmd_reference.tsv"
    conda:
        ENV
    threads: config["threads"]["score"]
    resources:
        **resources("score"),
    params:
        folder=subpath(input[0], parent=True),
        flags=cmmd_flags(),
    shell:
        "duodiff cmmd-reference --reference {params.folder} --output {output} {params.flags} > {log} 2>&1"


# The real-data set and the feature network read the dataset as the reference does: `use rule`
# variants of it (the command is written once, with the sub-command as a param).
use rule reference as real_set with:
    output:
        set_file("stats", "real"),
    log:
        "results/{experiment}/logs/real_set.log",
    benchmark:
        "results/{experiment}/benchmarks/real_set.tsv"
    params:
        command="real-set",
        flags=real_set_flags(),
        folder=subpath(output[0], parent=True),


use rule reference as feature_net with:
    output:
        model="results/{experiment}/feature_net/model.pt",
        info="results/{experiment}/feature_net/feature_net.json",
    log:
        "results/{experiment}/logs/feature_net.log",
    benchmark:
        "results/{experiment}/benchmarks/feature_net.tsv"
    params:
        command="feature-net",
        flags=feature_net_flags(),
        folder=subpath(output.model, parent=True),
