"""FID and KID through clean-fid (Parmar et al., "On Aliased Resizing and Surprising Subtleties in
GAN Evaluation", CVPR 2022), "clean" mode by default; "legacy_pytorch" (pytorch-fid's network and
bilinear resize, the papers' protocol: inception.py) when metrics.fid.mode says so.

Every number is clean-fid's own: images are read with PIL and converted to RGB (8x8 grayscale
digits become three equal channels), resized to 299x299 with PIL bicubic in float (no
quantisation after the resize), and passed as float tensors in [0, 255] to the InceptionV3 of
the TensorFlow 2015-12-05 release, whose 2048-d pool features are kept. FID is
clean-fid's Fréchet distance ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) on the features' mean
and covariance (see `frechet_distance` below for how the trace term is computed); KID is
`cleanfid.fid.kernel_distance`, the unbiased MMD^2 with the cubic polynomial kernel
k(x, y) = (x.y / 2048 + 1)^3 averaged over random subsets (Binkowski et al. 2018).

The parts: inception.py (the feature networks and clean-fid's loader), reference.py (the real
images and their statistics, `duodiff reference` and `duodiff real-set`), distances.py (the
Fréchet distance and KID), uncertainty.py (their 95% intervals). This module scores a sample
folder against a reference: `duodiff fid` in one network, `duodiff score` in Inception's and the
dataset classifier's at once (the workflow's scoring job).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from duodiff.core.distributed import default_device
from duodiff.core.errors import DuodiffError, check_choice, check_int, check_positive, require
from duodiff.core.flags import add_flag
from duodiff.core.io import read_json, write_json
from duodiff.metrics import inception
from duodiff.metrics import reference as reference_stage
from duodiff.metrics.distances import KID_PRECOMPUTE_MAX, frechet_distance, kid_with_std, psd_sqrt
from duodiff.metrics.feature_cache import remove_cache
from duodiff.metrics.inception import (
    FEATURE_DIM,
    FEATURE_NETWORKS,
    MODE,
    FeatureRun,
    cached_image_features,
    image_files,
)
from duodiff.metrics.paired import (
    check_pairing,
    features_path,
    load_baseline,
    load_pairing,
    paired_differences,
    read_pairing,
    save_features,
)
from duodiff.metrics.reference import CHUNK_HELP, load_reference, load_reference_sigma_sqrt, load_reference_statistics
from duodiff.metrics.uncertainty import CONFIDENCE, frechet_statistic, jackknife_interval, kid_kernels, kid_statistic

FID_CACHE = ".fid-features-cache"  # beside fid.json until it is written (feature_cache.py)
# What `duodiff score` writes into its --output-dir (the workflow's metrics/<set>/ holds the same names).
FID_FILE, FD_CLASSIFIER_FILE = "fid.json", "fd_classifier.json"


def small_sample_notes(n_samples: int, n_reference: int, feature_dim: int = FEATURE_DIM) -> list[str]:
    """Fréchet distances from fewer images than feature dimensions are biased upward."""
    notes = []
    if n_samples < feature_dim:
        notes.append(f"FID from {n_samples} < {feature_dim} samples is biased upward; compare only at equal N")
    if n_reference < feature_dim:
        notes.append(f"reference statistics from only {n_reference} < {feature_dim} real images")
    return notes


def sample_files(samples) -> list[Path]:
    """The PNGs of a sample set folder; DuodiffError naming the folder when it has none to score."""
    samples = Path(samples)
    require(samples.is_dir(), f"--samples {samples}: no such folder (a sample set folder, as `duodiff sample` writes)")
    require((samples / "images").is_dir(), f"--samples {samples}: no images/ folder there (expected {samples / 'images'}/*.png)")
    files = image_files(samples / "images")
    require(
        len(files) >= 2,
        f"--samples {samples}: found {len(files)} PNGs in {samples / 'images'}; FID and KID need at least 2",
    )
    return files


def check_samples_fit_reference(samples, files, reference, ref_meta) -> None:
    """Refuse to score a sample set against a reference it cannot be compared with.

    Every PNG must be readable (PIL's verify: complete chunks, correct checksums) and all of one
    shape, the reference's image size and channel count; a set whose stats.json names the dataset
    its model was trained on must match the reference's dataset. DuodiffError otherwise, naming
    the file or the two values."""
    from PIL import Image

    shapes = {}  # (channels, height, width) -> the first file of that shape
    for path in files:
        try:
            with Image.open(path) as image:
                shape = (len(image.getbands()), image.height, image.width)
                image.verify()
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
            raise DuodiffError(
                f"--samples {samples}: {path} is not a readable PNG, truncated or corrupt ({type(error).__name__}: "
                f"{error}); delete it and rerun the `duodiff sample` command of the set, which redoes its batch"
            ) from None
        shapes.setdefault(shape, path)

    def described(channels, height, width):
        return f"{height}x{width} images with {channels} channel{'s' if channels != 1 else ''}"

    if len(shapes) > 1:
        raise DuodiffError(
            f"--samples {samples} mixes images of different shapes: "
            + ", ".join(f"{described(*shape)} ({path.name})" for shape, path in shapes.items())
        )
    missing = [key for key in ("dataset", "image_size", "channels") if ref_meta.get(key) is None]
    require(
        not missing,
        f"--reference {reference}: reference.json lacks {', '.join(missing)}, so the sets it can score are unknown; "
        "rebuild it with `duodiff reference`",
    )
    ((channels, height, width),) = shapes
    ref_size, ref_channels, ref_dataset = ref_meta["image_size"], ref_meta["channels"], ref_meta["dataset"]
    require(
        (channels, height, width) == (ref_channels, ref_size, ref_size),
        f"--samples {samples} holds {described(channels, height, width)} but --reference {reference} holds "
        f"{described(ref_channels, ref_size, ref_size)} ({ref_dataset}); FID compares sets of one size and channel "
        f"count: build a reference of the samples' dataset at their size (`duodiff reference --dataset DATASET --image-size {width}`)",
    )
    stats_path = samples / "stats.json"
    if stats_path.is_file():
        try:
            dataset = read_json(stats_path).get("dataset")  # null or absent: written before it was recorded
        except (ValueError, AttributeError) as error:
            raise DuodiffError(f"--samples {samples}: {stats_path} is not a stats.json ({error}); rerun `duodiff sample`") from None
        require(
            dataset is None or dataset == ref_dataset,
            f"--samples {samples} comes from a model trained on {dataset}, but --reference {reference} holds "
            f"{ref_dataset} images; score it against a {dataset} reference (`duodiff reference --dataset {dataset}`)",
        )


def run_fid(*, samples, reference, output, batch_size: int, device: str | None, num_workers: int, kid_subsets: int,
            kid_subset_size: int, seed: int, chunk_size: int, feature_net, max_samples: int | None,
            intervals: bool, mode: str, legacy_weights, baseline) -> dict:
    """FID and KID of DIR/images/*.png against a reference folder -> FILE.json, and the features
    they were computed from -> FILE_features.npz (paired.py).

    feature_net: a `duodiff feature-net` model.pt; its features replace Inception's on both sides
    (the reference's images are passed through it here: a few hundred small images take a second).
    max_samples: score only the first N images of the set. intervals: the 95% confidence
    intervals of FID and KID (jackknife over the set's images, uncertainty.py). mode: the FID
    protocol, the reference's. A statistics reference gives no KID (fid.json's notes say so).
    baseline: another set's FILE_features.npz, of the same network: FILE.json gains `paired`, the
    differences to that set's FID and KID with their paired intervals (paired.py), after checking
    that both sets were drawn from the same noise and labels."""
    run = FeatureRun(batch_size=batch_size, device=device or default_device(), num_workers=num_workers,
                     chunk_size=chunk_size, cache=Path(output).parent / FID_CACHE, mode=mode)
    check_positive("--kid-subsets", kid_subsets)
    check_int("--kid-subset-size", kid_subset_size, 2)
    if max_samples is not None:
        check_int("--max-samples", max_samples, 2)
    samples = Path(samples)
    files = sample_files(samples)[:max_samples]
    ref_meta, ref_features = load_reference(reference)
    _check_mode_fits(mode, reference, ref_meta, feature_net, legacy_weights)  # before any image is read
    check_samples_fit_reference(samples, files, reference, ref_meta)
    pairing = read_pairing(samples)
    if baseline is not None:  # before any image is read: the records are in the two stats.json files
        require(Path(baseline).is_file(), f"--baseline: {baseline} does not exist; score the baseline set first")
        check_pairing(samples, pairing, baseline, load_pairing(baseline))

    resize = None  # Inception: clean-fid's own 299 px resize
    if feature_net is None:
        fn, info = _inception_for(reference, ref_meta, run.device, mode, legacy_weights)
    else:
        from duodiff.metrics import feature_net as classifier

        fn, resize, info = classifier.feature_extractor(str(feature_net), run.device)
        _check_feature_net_fits(feature_net, reference, ref_meta)
        ref_features = cached_image_features(image_files(Path(reference) / "images"), fn, info, run,
                                             "reference features", resize)
    features = cached_image_features(files, fn, info, run, f"FID {samples.name}", resize).astype(np.float64)
    baseline_features = None
    if baseline is not None:
        baseline_features = load_baseline(baseline, info["feature_network_sha256"], len(features))
    if ref_features is None:
        ref_mu, ref_sigma, ref_sigma_sqrt = load_reference_statistics(reference)
        scored = statistics_scores(features, reference, (ref_mu, ref_sigma, ref_sigma_sqrt), intervals=intervals)
    else:
        # Statistics in float64 (clean-fid leaves float32 features in float32 for the mean and for
        # KID's kernel sums, which cancel to a small number: ~1e-4 relative error there).
        ref_features = ref_features.astype(np.float64)
        ref_mu, ref_sigma = np.mean(ref_features, axis=0), np.cov(ref_features, rowvar=False)
        ref_sigma_sqrt = load_reference_sigma_sqrt(reference, ref_sigma) if feature_net is None else psd_sqrt(ref_sigma)
        scored = scores(features, ref_features, ref_sigma, ref_sigma_sqrt, kid_subsets=kid_subsets,
                        kid_subset_size=kid_subset_size, seed=seed, intervals=intervals)
    paired = None
    if baseline_features is not None:
        differences = paired_differences(features, baseline_features, ref_features, ref_mu, ref_sigma, ref_sigma_sqrt,
                                         intervals=intervals)
        paired = {**differences, "baseline": str(baseline), "n_paired": len(features), "pairing": pairing}
    n_reference = None if ref_features is None else len(ref_features)
    result = {
        **scored,
        "n_samples": len(features),
        "n_reference": n_reference,
        **{key: info[key] for key in ("feature_network", "feature_network_key", "feature_network_sha256")},
        "mode": mode,
        "reference_source": ref_meta.get("source", "images"),
        # How the reference was drawn (reference.json): the tables' note says it.
        "reference_selection": ref_meta.get("selection"),
        # Inception's pool is 2048-d (a stand-in network in the tests may be smaller); the classifier's its own.
        "notes": ([STATISTICS_NOTE] if ref_features is None else [])
        + small_sample_notes(len(features), n_reference or FEATURE_DIM, FEATURE_DIM if feature_net is None else features.shape[1]),
        "samples": str(samples),
        "reference": str(reference),
        "paired": paired,
    }
    save_features(features_path(output), features, info["feature_network_sha256"], pairing)
    write_json(output, result)  # last: its presence marks a finished score
    remove_cache(run.cache)
    return result


def scores(features: np.ndarray, ref_features: np.ndarray, ref_sigma: np.ndarray, ref_sigma_sqrt: np.ndarray, *,
           kid_subsets: int, kid_subset_size: int, seed: int, intervals: bool) -> dict:
    """fid.json's scores of float64 features against the reference's: FID, KID (the mean and
    spread over its subsets) and, with intervals, their 95% intervals (else NaN)."""
    ref_mu = np.mean(ref_features, axis=0)
    fid = frechet_distance(features, ref_mu, ref_sigma, ref_sigma_sqrt)
    # KID's kernel matrices once, for KID over subsets and for its interval.
    fits = len(features) * len(ref_features) <= KID_PRECOMPUTE_MAX
    kernels = kid_kernels(features, ref_features) if fits or intervals else None
    kid, kid_std = kid_with_std(ref_features, features, kid_subsets, kid_subset_size, seed, kernels)
    fid_ci = kid_ci = (float("nan"), float("nan"))
    if intervals:
        fid_ci = jackknife_interval(frechet_statistic(features, ref_mu, ref_sigma, ref_sigma_sqrt), len(features))
        kid_ci = jackknife_interval(kid_statistic(kernels), len(features))
    return {
        "fid": fid,
        "fid_ci_low": fid_ci[0],
        "fid_ci_high": fid_ci[1],
        "kid": kid,
        "kid_std": kid_std,
        "kid_ci_low": kid_ci[0],
        "kid_ci_high": kid_ci[1],
        "confidence": CONFIDENCE,
        "interval_method": "jackknife" if intervals else None,
        "kid_subset_size": min(len(features), len(ref_features), kid_subset_size),
        "kid_subsets": kid_subsets,
        "kid_seed": seed,
    }


STATISTICS_NOTE = ("reference from published statistics (mu, sigma) without its features: no KID against it, "
                   "and the network and resize behind them are the ones its config states")


def statistics_scores(features: np.ndarray, reference, statistics, *, intervals: bool) -> dict:
    """fid.json's scores against a statistics reference (`statistics`: its mu, sigma and sigma's
    square root, load_reference_statistics): FID and its interval (the reference held fixed, as for
    an images reference); KID and its interval are None (they need the features)."""
    ref_mu, ref_sigma, ref_sigma_sqrt = statistics
    require(
        features.shape[1] == len(ref_mu),
        f"--reference {reference}: its statistics are {len(ref_mu)}-d but the feature network gives {features.shape[1]}-d features",
    )
    fid_ci = (float("nan"), float("nan"))
    if intervals:
        fid_ci = jackknife_interval(frechet_statistic(features, ref_mu, ref_sigma, ref_sigma_sqrt), len(features))
    return {
        "fid": frechet_distance(features, ref_mu, ref_sigma, ref_sigma_sqrt),
        "fid_ci_low": fid_ci[0], "fid_ci_high": fid_ci[1],
        "kid": None, "kid_std": None, "kid_ci_low": None, "kid_ci_high": None,
        "confidence": CONFIDENCE, "interval_method": "jackknife" if intervals else None,
        "kid_subset_size": None, "kid_subsets": None, "kid_seed": None,
    }  # fmt: skip


def _check_mode_fits(mode: str, reference, ref_meta: dict, feature_net, legacy_weights) -> None:
    """One protocol on both sides, whose weights are here; a statistics reference has no images
    for the classifier."""
    check_choice("--mode", mode, inception.MODES)
    ref_mode = ref_meta.get("mode", MODE)
    require(
        mode == ref_mode,
        f"--mode {mode} but --reference {reference} was made with mode {ref_mode}; FID compares features of one "
        f"protocol: score with --mode {ref_mode} (metrics.fid.mode) or rebuild the reference with --mode {mode}",
    )
    require(
        feature_net is None or ref_meta.get("source") != "statistics",
        f"--feature-net {feature_net} needs the reference's images, but --reference {reference} holds only published "
        "statistics (mu, sigma); build the reference from the dataset's images (reference.statistics: null)",
    )
    if mode == "legacy_pytorch" and feature_net is None:
        inception.check_legacy_weights(legacy_weights)


def _inception_for(reference, ref_meta: dict, device, mode: str, legacy_weights):
    """The Inception extractor the reference was made with -> (fn, info); refused on a sha256 mismatch."""
    key = ref_meta.get("feature_network_key", "auto")
    try:
        fn, info = inception.extractor(mode, key if key in FEATURE_NETWORKS else "auto", legacy_weights, device)
    except DuodiffError as error:
        raise DuodiffError(f"--reference {reference} was made with {ref_meta.get('feature_network')}: {error}") from None
    if info["feature_network_sha256"] != ref_meta.get("feature_network_sha256"):
        raise DuodiffError(
            f"--reference {reference} was made with a different feature network "
            f"({ref_meta.get('feature_network')}, sha256 {ref_meta.get('feature_network_sha256')}) than this one "
            f"({info['feature_network']} at {info['feature_network_path']}, sha256 {info['feature_network_sha256']}); "
            "rebuild the reference with `duodiff reference` so both sides use the same network"
        )
    return fn, info


def _check_feature_net_fits(feature_net, reference, ref_meta: dict) -> None:
    """A feature network scores only the dataset (and image size) it was trained on."""
    from duodiff.metrics.feature_net import require_feature_net

    net = read_json(require_feature_net(feature_net))
    for key in ("dataset", "image_size", "channels"):
        require(
            net.get(key) == ref_meta.get(key),
            f"--feature-net {feature_net} was trained on {key} {net.get(key)!r} but --reference {reference} has "
            f"{key} {ref_meta.get(key)!r}; train the feature network on the reference's dataset",
        )


def run_score(*, samples, reference, output_dir, feature_net, batch_size: int, device: str | None, num_workers: int,
              kid_subsets: int, kid_subset_size: int, seed: int, chunk_size: int, max_samples: int | None,
              intervals: bool, mode: str, legacy_weights, baseline) -> dict:
    """A set's scores against the reference, in one process -> DIR/fid.json (Inception FID/KID, on
    the first max_samples images) and, with feature_net, DIR/fd_classifier.json (FD/KD in the
    network's features, on every image: max_samples is Inception's budget). What two `duodiff fid`
    runs write; the workflow's one scoring job per set, since a job of its own spent ~7 s more
    starting Python, torch and clean-fid than the classifier needs to score a set.
    Both scorings are checked before either starts. baseline: the baseline set's scoring folder
    (its `duodiff score --output-dir`): each score gains its paired difference to that set's.
    -> {"fid": ..., "fd_classifier": ... | None}."""
    ref_meta, _ = load_reference(reference)
    _check_mode_fits(mode, reference, ref_meta, None, legacy_weights)
    if feature_net is not None:
        _check_mode_fits(mode, reference, ref_meta, feature_net, legacy_weights)
        _check_feature_net_fits(feature_net, reference, ref_meta)
    output_dir = Path(output_dir)
    outputs = {"fid": output_dir / FID_FILE, "fd_classifier": output_dir / FD_CLASSIFIER_FILE}
    baselines = dict.fromkeys(outputs)
    if baseline is not None:
        baselines = {name: features_path(Path(baseline) / path.name) for name, path in outputs.items()}
        for name in outputs if feature_net is not None else ["fid"]:
            require(baselines[name].is_file(), f"--baseline {baseline} has no {baselines[name].name}; score the "
                                                "baseline set first (duodiff score)")
            check_pairing(samples, read_pairing(samples), baseline, load_pairing(baselines[name]))
    shared = dict(samples=samples, reference=reference, batch_size=batch_size, device=device, num_workers=num_workers,
                  kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, seed=seed, chunk_size=chunk_size,
                  intervals=intervals, mode=mode, legacy_weights=legacy_weights)
    scored = {"fid": run_fid(**shared, output=outputs["fid"], feature_net=None, max_samples=max_samples,
                             baseline=baselines["fid"])}
    scored["fd_classifier"] = None if feature_net is None else run_fid(
        **shared, output=outputs["fd_classifier"], feature_net=feature_net, max_samples=None,
        baseline=baselines["fd_classifier"])
    return scored


def _add_scoring_flags(p) -> None:
    """The flags `duodiff fid` and `duodiff score` share: the set, the reference and how to score."""
    add_flag(p, "--samples", required=True, help="sample set folder (DIR/images/*.png)")
    add_flag(p, "--reference", required=True, help="folder written by `duodiff reference`")
    add_flag(p, "--batch-size", type=int, default=50)
    add_flag(p, "--device", default=None, help="cpu or cuda (default: cuda when available)")
    add_flag(p, "--num-workers", type=int, default=0, help="DataLoader workers for decoding and resizing")
    add_flag(p, "--kid-subsets", type=int, default=100)
    add_flag(p, "--kid-subset-size", type=int, default=1000)
    add_flag(p, "--seed", type=int, default=0, help="seed of the KID subsets")
    add_flag(p, "--chunk-size", type=int, default=1000, help=CHUNK_HELP)
    add_flag(p, "--no-intervals", dest="intervals", action="store_false",
             help="leave out the 95%% confidence intervals (jackknife over the set's images)")
    reference_stage.add_mode_flags(p)


def add_cli(subparsers):
    reference_stage.add_cli(subparsers)  # `duodiff reference` and `duodiff real-set`
    p = subparsers.add_parser("fid", help="FID and KID (clean-fid) of a sample folder against a reference")
    _add_scoring_flags(p)
    add_flag(p, "--output", required=True, help="FILE.json")
    add_flag(p, "--feature-net", default=None,
             help="model.pt of `duodiff feature-net`: its features instead of Inception's, on both sides")
    add_flag(p, "--max-samples", type=int, default=None, help="score only the first N images of the set")
    add_flag(p, "--baseline", default=None,
             help="another set's FILE_features.npz (same network): also the paired differences to its scores")
    p.set_defaults(func=lambda a: run_fid(
        samples=a.samples, reference=a.reference, output=a.output, batch_size=a.batch_size, device=a.device,
        num_workers=a.num_workers, kid_subsets=a.kid_subsets, kid_subset_size=a.kid_subset_size, seed=a.seed,
        chunk_size=a.chunk_size, feature_net=a.feature_net, max_samples=a.max_samples,
        intervals=a.intervals, mode=a.mode, legacy_weights=a.legacy_weights, baseline=a.baseline,
    ))  # fmt: skip

    p = subparsers.add_parser("score", help=f"a set's scores in one process: {FID_FILE} (Inception) and, with "
                                            f"--feature-net, {FD_CLASSIFIER_FILE}")
    _add_scoring_flags(p)
    add_flag(p, "--output-dir", required=True, help=f"DIR: DIR/{FID_FILE} and DIR/{FD_CLASSIFIER_FILE}")
    add_flag(p, "--feature-net", default=None,
             help=f"model.pt of `duodiff feature-net`: also its FD/KD, on every image, into DIR/{FD_CLASSIFIER_FILE}")
    add_flag(p, "--max-samples", type=int, default=None, help="Inception scores only the first N images of the set")
    add_flag(p, "--baseline", default=None,
             help="the baseline set's --output-dir (the full model's): each score gains its paired difference to it")
    p.set_defaults(func=lambda a: run_score(
        samples=a.samples, reference=a.reference, output_dir=a.output_dir, feature_net=a.feature_net,
        batch_size=a.batch_size, device=a.device, num_workers=a.num_workers, kid_subsets=a.kid_subsets,
        kid_subset_size=a.kid_subset_size, seed=a.seed, chunk_size=a.chunk_size, max_samples=a.max_samples,
        intervals=a.intervals, mode=a.mode, legacy_weights=a.legacy_weights, baseline=a.baseline,
    ))  # fmt: skip
