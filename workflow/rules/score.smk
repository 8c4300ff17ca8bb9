# Scoring every sample set: FID and KID against the reference features, the same in the features
# of the dataset's own classifier (metrics.headline classifier), CMMD against the reference's CLIP
# embeddings, and the GFLOPs the set's sampling cost (from its exit layers). The real-data set
# (rule real_set) is scored like the others.


rule fid:
    input:
        stats="results/{experiment}/samples/{set}/stats.json",
        reference=rules.reference.output.features,
    output:
        "results/{experiment}/metrics/{set}/fid.json",
    log:
        "results/{experiment}/logs/fid/{set}.log",
    benchmark:
        "results/{experiment}/benchmarks/fid/{set}.tsv"
    conda:
        ENV
    threads: config["threads"]["score"]
    resources:
        **resources("score"),
    params:
        samples=subpath(input.stats, parent=True),
        reference=subpath(input.reference, parent=True),
        flags=fid_flags(),
    shell:
        "duodiff fid --samples {params.samples} --reference {params.reference} --output {output} "
        "{params.flags} > {log} 2>&1"


rule fd_classifier:
    input:
        stats="results/{experiment}/samples/{set}/stats.json",
        reference=rules.reference.output.info,
        feature_net=rules.feature_net.output.model,
    output:
        "results/{experiment}/metrics/{set}/fd_classifier.json",
    log:
        "results/{experiment}/logs/fd_classifier/{set}.log",
    benchmark:
        "results/{experiment}/benchmarks/fd_classifier/{set}.tsv"
    conda:
        ENV
    threads: config["threads"]["score"]
    resources:
        **resources("score"),
    params:
        samples=subpath(input.stats, parent=True),
        reference=subpath(input.reference, parent=True),
        flags=fd_classifier_flags(),
    shell:
        "duodiff fid --feature-net {input.feature_net} --samples {params.samples} --reference {params.reference} "
        "--output {output} {params.flags} > {log} 2>&1"


rule cmmd:
    input:
        stats="results/{experiment}/samples/{set}/stats.json",
        reference=rules.cmmd_reference.output,
    output:
        "results/{experiment}/metrics/{set}/cmmd.json",
    log:
        "results/{experiment}/logs/cmmd/{set}.log",
    benchmark:
        "results/{experiment}/benchmarks/cmmd/{set}.tsv"
    conda:
        ENV
    threads: config["threads"]["score"]
    resources:
        **resources("score"),
    params:
        samples=subpath(input.stats, parent=True),
        flags=cmmd_flags(),
    shell:
        "duodiff cmmd --samples {params.samples} --reference {input.reference} --output {output} "
        "{params.flags} > {log} 2>&1"


rule flops:
    input:
        stats="results/{experiment}/samples/{set}/stats.json",
        exit_layers="results/{experiment}/samples/{set}/exit_layers.pt",
    output:
        "results/{experiment}/metrics/{set}/gflops.json",
    log:
        "results/{experiment}/logs/flops/{set}.log",
    benchmark:
        "results/{experiment}/benchmarks/flops/{set}.tsv"
    conda:
        ENV
    threads: config["threads"]["score"]
    resources:
        **resources("score"),
    params:
        samples=subpath(input.stats, parent=True),
    shell:
        "duodiff flops --samples {params.samples} --output {output} > {log} 2>&1"
