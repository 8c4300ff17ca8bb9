# Scoring every sample set: FID and KID against the reference features, the same in the features
# of the dataset's own classifier (metrics.headline classifier), CMMD against the reference's CLIP
# embeddings, and the GFLOPs the set's sampling cost (from its exit layers). The real-data set
# (rule real_set) is scored like the others, except for GFLOPs: nothing was sampled.


# The scores against the reference. One job per set scores it in Inception's features (fid.json)
# and, with metrics.headline classifier, in the dataset classifier's (fd_classifier.json): one
# `duodiff score` process, since a second job per set spent ~7 s more starting Python, torch and
# clean-fid than the classifier needs to score the set.
rule score:
    input:
        unpack(paired_baseline),  # every generated set but the full model's: the full model's scores
        **feature_net_files(),
        stats=set_file("stats"),
        # `duodiff score` reads the whole reference folder: its images (reference.json, written
        # last, stands for them) for the classifier, features.npz for Inception.
        reference=rules.reference.output.info,
        reference_features=rules.reference.output.features,
    output:
        **(
            {
                "fd_classifier": "results/{experiment}/metrics/{set}/fd_classifier.json",
                "fd_classifier_features": "results/{experiment}/metrics/{set}/fd_classifier_features.npz",
            }
            if config["metrics"]["headline"] == "classifier"
            else {}
        ),
        fid="results/{experiment}/metrics/{set}/fid.json",
        # The features each score came from: the full model's are the paired baseline of every set.
        fid_features="results/{experiment}/metrics/{set}/fid_features.npz",
    log:
        "results/{experiment}/logs/score/{set}.log",
    benchmark:
        "results/{experiment}/benchmarks/score/{set}.tsv"
    conda:
        ENV
    threads: config["threads"]["score"]
    resources:
        **resources("score"),
    params:
        samples=subpath(input.stats, parent=True),
        reference=subpath(input.reference, parent=True),
        output_dir=subpath(output.fid, parent=True),
        # A function of the input: a path, which the input trigger follows. The settings stay a plain
        # string, which the params trigger compares (a function's result it does not).
        feature_net=lambda wildcards, input: (
            f"--feature-net {input.feature_net} " if "feature_net" in input.keys() else ""
        ),
        baseline=lambda wildcards, input: (
            f"--baseline {Path(input.baseline_fid).parent} " if "baseline_fid" in input.keys() else ""
        ),
        flags=score_flags(),
    shell:
        "duodiff score --samples {params.samples} --reference {params.reference} --output-dir {params.output_dir} "
        "{params.feature_net}{params.baseline}{params.flags} > {log} 2>&1"


rule cmmd:
    input:
        stats=set_file("stats"),
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
        "duodiff cmmd --samples {params.samples} --reference {input.reference} --output {output} {params.flags} > {log} 2>&1"


# Counting, not comparing: no reference, so a rule of its own. One job counts every sample set:
# counting takes milliseconds a set (each network once per process), while a job per set spent
# ~5 of its ~6 seconds starting Python and torch (19 sets in the embedded study). A new or changed
# set reruns it whole, in seconds.
rule flops:
    input:
        unpack(study_models),  # the checkpoints the stats.json files name: their networks are counted
        stats=study_files("stats"),
        exit_layers=study_files("exit_layers"),
    output:
        [study_path(f"metrics/{name}/gflops.json") for name in sample_sets()],
    log:
        study_path("logs/flops.log"),
    benchmark:
        study_path("benchmarks/flops.tsv")
    conda:
        ENV
    threads: config["threads"]["score"]
    resources:
        **resources("score"),
    params:
        samples=lambda wildcards, input: [str(Path(path).parent) for path in input.stats],
    shell:
        "duodiff flops --samples {params.samples} --output {output} > {log} 2>&1"
