# Scoring every sample set: FID and KID against the reference features, the same in the features
# of the dataset's own classifier (metrics.headline classifier), CMMD against the reference's CLIP
# embeddings, and the GFLOPs the set's sampling cost (from its exit layers). The real-data set
# (rule real_set) is scored like the others.


# The three scores against the reference are one family: fid is the base, fd_classifier and cmmd
# are `use rule` variants that state their inputs, outputs and params. `use rule` cannot change the
# command, so it is written once with the sub-command (`command`) and the reference as params.
rule fid:
    input:
        stats=set_file("stats"),
        reference=rules.reference.output.features,
        reference_info=rules.reference.output.info,
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
        command="fid",
        samples=subpath(input.stats, parent=True),
        reference=subpath(input.reference, parent=True),
        flags=fid_flags(),
    shell:
        "duodiff {params.command} --samples {params.samples} --reference {params.reference} --output {output} "
        "{params.flags} > {log} 2>&1"


use rule fid as fd_classifier with:
    input:
        stats=set_file("stats"),
        # `duodiff fid --feature-net` reads the whole reference folder: its images (reference.json,
        # written last, stands for them), features.npz, and the network's feature_net.json.
        reference=rules.reference.output.info,
        reference_features=rules.reference.output.features,
        feature_net=rules.feature_net.output.model,
        feature_net_info=rules.feature_net.output.info,
    output:
        "results/{experiment}/metrics/{set}/fd_classifier.json",
    log:
        "results/{experiment}/logs/fd_classifier/{set}.log",
    benchmark:
        "results/{experiment}/benchmarks/fd_classifier/{set}.tsv"
    params:
        # `duodiff fid` in the feature network's features instead of Inception's.
        command=lambda wildcards, input: f"fid --feature-net {input.feature_net}",
        flags=fd_classifier_flags(),


use rule fid as cmmd with:
    input:
        stats=set_file("stats"),
        reference=rules.cmmd_reference.output,
    output:
        "results/{experiment}/metrics/{set}/cmmd.json",
    log:
        "results/{experiment}/logs/cmmd/{set}.log",
    benchmark:
        "results/{experiment}/benchmarks/cmmd/{set}.tsv"
    params:
        command="cmmd",
        reference=lambda wildcards, input: input.reference,  # the embeddings file itself
        flags=cmmd_flags(),


# Counting, not comparing: no reference, so a rule of its own.
rule flops:
    input:
        unpack(sample_models),  # the checkpoint(s) stats.json names: their networks are counted
        stats=set_file("stats"),
        exit_layers=set_file("exit_layers"),
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
