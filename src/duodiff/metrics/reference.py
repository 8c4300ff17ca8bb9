"""The real images every score is read against, written once per dataset.

`duodiff reference` writes n training images (as PNGs, so they go through the very same
PNG -> clean-fid path as the samples), their Inception features and mu/sigma; `duodiff real-set`
writes other real images, none of them in the reference, scored like a sample set: the floor, what
real images of the same distribution score. Both are one seeded, class-stratified random split of
the training images (data.stratified_split, --split-seed, the pipeline's reference.split_seed), for
every dataset alike: never the first n in dataset order, which for a class-sorted ImageFolder tree
(ImageNet) is a few classes (the first 50,000 of ImageNet's are about 39 of its 1,000). With
n_reference = the training set's size the reference is the whole training set; reference.json's
`coverage` says which it is. `load_reference` reads a reference back for `duodiff fid`.

`duodiff reference --statistics FILE` writes the same folder from published statistics instead
of images (e.g. U-ViT's fid_stats_cifar10_train_pytorch.npz, pytorch-fid's format, or clean-fid's
stats npz: both hold mu and sigma): mu and sigma only, no features and no images, so FID can be
scored against it but not KID (which needs the reference's features) nor the classifier FD. The
file does not say which network and resize made it: --mode states it, and reference.json records
that it was stated, not measured.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from duodiff.core.distributed import default_device
from duodiff.core.errors import DuodiffError, check_choice, check_int, check_positive, require
from duodiff.core.flags import add_flag
from duodiff.core.images import save_png, to_uint8
from duodiff.core.io import atomic_path, file_sha256, read_json, write_json
from duodiff.metrics import inception
from duodiff.metrics.distances import psd_sqrt
from duodiff.metrics.feature_cache import remove_cache
from duodiff.metrics.inception import FEATURE_DIM, FEATURE_NETWORKS, FeatureRun, cached_image_features, image_files

# Where a job keeps the feature chunks it has finished until its output is written
# (feature_cache.py): inside the reference folder, beside a set's fid.json.
REFERENCE_CACHE = ".features-cache"


def run_reference(*, dataset: str, n_reference: int, max_reference: int | None, output_folder, data_root, download: bool,
                  image_size: int | None, batch_size: int, device: str | None, num_workers: int, feature_network: str,
                  chunk_size: int, mode: str, legacy_weights, statistics, split_seed: int) -> dict:
    """n_reference training images -> DIR/images/*.png, DIR/features.npz, DIR/reference.json: the
    reference side of data.stratified_split with split_seed (all of them when n_reference is the
    training set's size).
    max_reference: Inception features (features.npz) of only the first N of them, a time budget
    (Inception is ~0.26 s an image on one CPU core); None = all. The images stay whole: the
    classifier FD (`duodiff fid --feature-net`) reads every one of them.
    statistics: a mu/sigma npz instead of the images (run_statistics_reference)."""
    from duodiff.core import data

    check_choice("--dataset", dataset, data.DATASETS)
    check_choice("--mode", mode, inception.MODES)
    check_split_seed(split_seed)
    if max_reference is not None:
        require(statistics is None, "--max-reference limits the images a reference is built from; a --statistics "
                                    "reference has no images: leave --max-reference out")
        check_int("--max-reference", max_reference, 2)
    if statistics is not None:
        return run_statistics_reference(dataset=dataset, image_size=image_size, output_folder=output_folder, mode=mode,
                                        feature_network=feature_network, legacy_weights=legacy_weights,
                                        statistics=statistics)
    require(
        isinstance(n_reference, int) and n_reference >= 2,
        f"--n-reference must be an integer >= 2 (a covariance needs two images); got {n_reference!r}",
    )
    require(
        max_reference is None or max_reference <= n_reference,
        f"--max-reference {max_reference} is more than the {n_reference} reference images (--n-reference)",
    )
    output_folder = Path(output_folder)
    run = FeatureRun(batch_size=batch_size, device=device or default_device(), num_workers=num_workers,
                     chunk_size=chunk_size, cache=output_folder / REFERENCE_CACHE, mode=mode)
    check_choice("--feature-network", feature_network, FEATURE_NETWORKS)
    if mode == "legacy_pytorch":
        inception.check_legacy_weights(legacy_weights)  # before the dataset is read

    real = data.load_dataset(dataset, root=data_root, download=download, image_size=image_size, train=True)
    require(
        len(real) >= n_reference,
        f"--n-reference {n_reference} is more than the {len(real)} training images of --dataset {dataset}",
    )
    n_features = n_reference if max_reference is None else max_reference
    fn, info = inception.extractor(mode, feature_network, legacy_weights, run.device)

    # reference.json marks a finished reference: remove it first so a half-rewritten folder never
    # looks complete. Deterministic either way: the same images for every run.
    indices, selection = split_side(real, n_reference, 0, split_seed, "reference")
    coverage = reference_coverage(data.dataset_labels(real), indices)
    output_folder.mkdir(parents=True, exist_ok=True)
    (output_folder / "reference.json").unlink(missing_ok=True)
    final_images = write_dataset_images(real, indices, output_folder, batch_size, num_workers, "reference images")
    features = cached_image_features(image_files(final_images)[:n_features], fn, info, run, "reference features")
    write_statistics(output_folder / "features.npz", features)
    meta = {
        "n": n_reference,
        "dataset": dataset,
        "split": "train",
        "image_size": real.image_size,
        "channels": real.channels,
        "data_root": None if data_root is None else str(data_root),
        "selection": selection,
        "split_seed": split_seed,
        **coverage,
        "indices": indices,  # images/00000i.png is training image indices[i]
        # features.npz (Inception) holds the first n_features of them (--max-reference).
        "n_features": n_features,
        "mode": mode,
        **{k: info[k] for k in ("feature_network", "feature_network_key", "feature_network_sha256")},
        "feature_dim": int(features.shape[1]),
        "source": "images",
    }
    write_json(output_folder / "reference.json", meta)
    remove_cache(run.cache)
    return meta


def read_statistics(path) -> tuple[np.ndarray, np.ndarray]:
    """mu (d,), sigma (d, d) of a statistics npz (pytorch-fid / U-ViT / clean-fid: keys mu and sigma),
    as float64; DuodiffError naming the file and what is wrong with it."""
    path = Path(path)
    require(path.is_file(), f"--statistics {path}: no such file (an npz with mu and sigma, e.g. U-ViT's fid_stats)")
    try:
        with np.load(path, allow_pickle=False) as stored:
            missing = [key for key in ("mu", "sigma") if key not in stored.files]
            require(not missing, f"--statistics {path}: no {' or '.join(missing)} in it (keys: {', '.join(stored.files)}); "
                                 "expected an npz with mu (d,) and sigma (d, d)")
            mu, sigma = stored["mu"].astype(np.float64), stored["sigma"].astype(np.float64)
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise DuodiffError(f"--statistics {path}: not a readable npz ({error})") from None
    require(
        mu.shape == (FEATURE_DIM,) and sigma.shape == (FEATURE_DIM, FEATURE_DIM),
        f"--statistics {path}: mu has shape {mu.shape} and sigma {sigma.shape}; Inception statistics are "
        f"({FEATURE_DIM},) and ({FEATURE_DIM}, {FEATURE_DIM})",
    )
    check_statistics(mu, sigma, f"--statistics {path}")
    return mu, sigma


# A covariance's eigenvalues are >= 0; round-off leaves the smallest of a singular one a little below
# 0: refused only below -PSD_TOLERANCE x the largest.
PSD_TOLERANCE = 1e-6


def check_statistics(mu: np.ndarray, sigma: np.ndarray, source: str) -> None:
    """mu and sigma finite, sigma a covariance: symmetric and positive semi-definite up to round-off
    (a sigma with a clearly negative eigenvalue gives FIDs below 0, e.g. -20288, with an interval).
    DuodiffError naming `source` (the file) and what is wrong."""
    require(np.isfinite(mu).all() and np.isfinite(sigma).all(), f"{source}: mu or sigma has NaN or inf entries")
    require(np.allclose(sigma, sigma.T, rtol=1e-5, atol=1e-8), f"{source}: sigma is not symmetric, so not a covariance")
    eigenvalues = np.linalg.eigvalsh(sigma)
    smallest, largest = float(eigenvalues[0]), float(eigenvalues[-1])
    require(
        smallest >= -PSD_TOLERANCE * max(largest, 0.0),
        f"{source}: sigma has the eigenvalue {smallest:.6g} (largest {largest:.6g}), so it is not a covariance; a "
        f"covariance is positive semi-definite (every eigenvalue >= -{PSD_TOLERANCE:g} x the largest, for round-off): "
        "use the statistics file as published, or build the reference from the dataset's images",
    )


def run_statistics_reference(*, dataset: str, image_size: int | None, output_folder, mode: str, feature_network: str,
                             legacy_weights, statistics) -> dict:
    """A statistics file (mu, sigma) -> DIR/features.npz (mu, sigma, sigma_sqrt; no features) and
    DIR/reference.json, whose network is the one of the stated --mode on this machine (the file
    cannot tell, so this is stated, not checked): samples are scored with that network."""
    from duodiff.core import data

    check_choice("--feature-network", feature_network, FEATURE_NETWORKS)
    mu, sigma = read_statistics(statistics)
    if mode == "legacy_pytorch":
        inception.check_legacy_weights(legacy_weights)
    _, info = inception.extractor(mode, feature_network, legacy_weights, "cpu")
    output_folder = Path(output_folder)
    output_folder.mkdir(parents=True, exist_ok=True)
    (output_folder / "reference.json").unlink(missing_ok=True)  # marks a finished reference
    with atomic_path(output_folder / "features.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma, sigma_sqrt=psd_sqrt(sigma))
    meta = {
        "n": None,
        "dataset": dataset,
        "split": "train",
        "image_size": image_size or data.default_image_size(dataset),
        "channels": data.CHANNELS[dataset],
        "selection": f"published statistics {statistics} (mu, sigma); the images behind them are not here",
        "mode": mode,
        **{k: info[k] for k in ("feature_network", "feature_network_key", "feature_network_sha256")},
        "feature_dim": FEATURE_DIM,
        "source": "statistics",
        "statistics": {"path": str(statistics), "sha256": file_sha256(str(statistics)),
                       "network": "stated by --mode, not recorded in the file"},
    }
    write_json(output_folder / "reference.json", meta)
    return meta


def write_statistics(path: Path, features: np.ndarray) -> None:
    """features.npz: the reference's features, their mean, covariance and the covariance's square
    root, computed once per dataset for every `duodiff fid` to reuse."""
    mu = np.mean(features, axis=0, dtype=np.float64)
    sigma = np.cov(features, rowvar=False)
    sigma_sqrt = psd_sqrt(sigma)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, features=features, mu=mu, sigma=sigma, sigma_sqrt=sigma_sqrt)


def write_dataset_images(real, indices, folder: Path, batch_size: int, num_workers: int, description: str) -> Path:
    """Dataset images `indices` -> folder/images/000000.png, ... through the samples' own
    quantisation and PNG writer, so real and generated images take one path to the scores. The
    images go to a temporary folder that replaces images/ at once."""
    from tqdm import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    tmp_images = Path(tempfile.mkdtemp(prefix=".tmp-images-", dir=folder))
    try:
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(real, list(indices)), batch_size=batch_size, shuffle=False, num_workers=num_workers
        )
        index = 0
        for images, _ in tqdm(loader, desc=description, unit="batch"):
            for image in to_uint8(images):
                save_png(image, tmp_images / f"{index:06d}.png")
                index += 1
        final_images = folder / "images"
        if final_images.exists():
            shutil.rmtree(final_images)
        os.replace(tmp_images, final_images)
    finally:
        if tmp_images.exists():
            shutil.rmtree(tmp_images)
    return final_images


def check_split_seed(split_seed) -> None:
    """One way of drawing for every dataset: a seed, never dataset order (null), which for a
    class-sorted tree would be a few classes."""
    require(split_seed is not None, "--split-seed is required (an integer >= 0): the reference and the real set are a "
                                    "seeded class-stratified draw; dataset order (a few classes of a class-sorted "
                                    "ImageFolder tree) is not offered")
    check_int("--split-seed", split_seed, 0)


def reference_coverage(labels, indices) -> dict:
    """reference.json's record of what the reference covers: `coverage` ("whole training set" or "seeded
    class-stratified sample of the training set"), the training set's size, its classes and how many of
    them the reference holds, and the fewest and most images it takes from one class."""
    labels = torch.as_tensor(labels, dtype=torch.int64)
    counts = torch.bincount(labels[torch.as_tensor(indices, dtype=torch.int64)], minlength=int(labels.max()) + 1)
    present = torch.bincount(labels) > 0
    counts = counts[present]
    whole = len(indices) == len(labels)
    return {
        "coverage": "whole training set" if whole else "seeded class-stratified sample of the training set",
        "n_train": len(labels),
        "n_classes": int(present.sum()),
        "classes_covered": int((counts > 0).sum()),
        "per_class": {"min": int(counts.min()), "max": int(counts.max())},
    }


def split_side(real, n_reference: int, n_real: int, split_seed: int, side: str) -> tuple[list[int], str]:
    """The dataset indices of one side ("reference" or "real") of the split, and the sentence that
    says how they were drawn (reference.json's and stats.json's `selection`)."""
    from duodiff.core import data

    check_split_seed(split_seed)
    if side == "reference" and n_reference == len(real):
        # The whole training set, in the draw's seeded order (so a --max-reference prefix is random).
        reference, _ = data.stratified_split(data.dataset_labels(real), n_reference, 0, split_seed)
        return reference, f"all {n_reference} training images (the whole training set, split seed {split_seed}), unflipped"
    reference, held_out = data.stratified_split(data.dataset_labels(real), n_reference, n_real, split_seed)
    if side == "reference":
        return reference, (f"{n_reference} training images drawn at random within each class in proportion to "
                           f"its share (split seed {split_seed}), unflipped")
    return held_out, (f"{len(held_out)} training images drawn at random within each class in proportion to its "
                      f"share (split seed {split_seed}), none of them in the {n_reference} of the reference, "
                      "unflipped")


def run_real_set(*, dataset: str, n_reference: int, n_images: int, output_folder, data_root, download: bool,
                 image_size: int | None, batch_size: int, num_workers: int, mode: str, split_seed: int) -> dict:
    """Real images that are not in the reference (the real side of data.stratified_split with
    split_seed, the reference's seed) ->
    DIR/images/*.png and DIR/stats.json (method "real"): scored against the reference like any
    sample set, they give the floor every method's score is read against. When the dataset has
    fewer than n_reference + n_images images, all that are left are used and stats.json says so.
    mode: the FID protocol the set is meant for, recorded (the set holds images, no features)."""
    from duodiff.core import data

    check_choice("--dataset", dataset, data.DATASETS)
    check_choice("--mode", mode, inception.MODES)
    check_int("--n-reference", n_reference, 2)
    check_int("--n-images", n_images, 2)
    check_positive("--batch-size", batch_size)
    check_split_seed(split_seed)
    output_folder = Path(output_folder)
    real = data.load_dataset(dataset, root=data_root, download=download, image_size=image_size, train=True)
    available = len(real) - n_reference
    require(
        available >= 2,
        f"--dataset {dataset} has {len(real)} training images: none are left for a real-data set after the "
        f"{n_reference} of the reference (--n-reference); lower reference.n_reference",
    )
    count = min(n_images, available)
    indices, selection = split_side(real, n_reference, count, split_seed, "real")
    (output_folder / "stats.json").unlink(missing_ok=True)  # stats.json marks a finished set
    write_dataset_images(real, indices, output_folder, batch_size, num_workers, "real images")
    stats = {
        "method": "real",
        "dataset": dataset,
        "n_samples": count,
        "n_requested": n_images,
        "image_size": real.image_size,
        "channels": real.channels,
        "selection": selection,
        "split_seed": split_seed,
        "indices": indices,  # images/00000i.png is training image indices[i]
        # Every training job reads the whole training split (train/loop.py, feature_net.py), so the
        # models and the feature network have seen these images: the floor is what real images the
        # models were fitted to score, not what unseen ones would.
        "seen_in_training": True,
        "mode": mode,
        "notes": [] if count == n_images else [
            f"real-data row from {count} images, not {n_images}: {dataset} has only {len(real)}, "
            f"{n_reference} of which are the reference"
        ],
    }  # fmt: skip
    write_json(output_folder / "stats.json", stats)
    return stats


def load_reference(folder) -> tuple[dict, np.ndarray | None]:
    """-> (reference.json, features (n, 2048), None for a statistics reference); DuodiffError when
    unfinished or inconsistent."""
    folder = Path(folder)
    meta_path, features_path = folder / "reference.json", folder / "features.npz"
    require(
        meta_path.is_file() and features_path.is_file(),
        f"--reference {folder}: no reference.json / features.npz there; build it with `duodiff reference`",
    )
    meta = read_json(meta_path)
    if meta.get("source") == "statistics":
        load_reference_statistics(folder)  # checked now, before any image is scored against them
        return meta, None
    with np.load(features_path) as stored:
        features = stored["features"]
    # n_features: the images Inception saw (--max-reference); a reference from before it has n.
    n_features = meta.get("n_features", meta.get("n"))
    require(
        features.ndim == 2 and list(features.shape) == [n_features, meta.get("feature_dim")],
        f"--reference {folder}: features.npz holds {features.shape}, reference.json says "
        f"n_features={n_features}, feature_dim={meta.get('feature_dim')}; rebuild it",
    )
    return meta, features


def load_reference_statistics(folder) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """mu, sigma, sigma_sqrt of a statistics reference (float64), checked as a `--statistics` file
    is (check_statistics): a reference written before that check may hold any sigma."""
    path = Path(folder) / "features.npz"
    try:
        with np.load(path, allow_pickle=False) as stored:
            missing = [key for key in ("mu", "sigma", "sigma_sqrt") if key not in stored.files]
            require(not missing, f"--reference {folder}: features.npz lacks {', '.join(missing)}; rebuild the reference")
            mu, sigma, sigma_sqrt = (stored[key].astype(np.float64) for key in ("mu", "sigma", "sigma_sqrt"))
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise DuodiffError(f"--reference {folder}: features.npz is not a readable npz ({error}); rebuild the reference") from None
    require(
        mu.ndim == 1 and sigma.shape == (len(mu), len(mu)) and sigma_sqrt.shape == sigma.shape,
        f"--reference {folder}: features.npz holds mu {mu.shape}, sigma {sigma.shape} and sigma_sqrt "
        f"{sigma_sqrt.shape}; expected (d,), (d, d), (d, d): rebuild the reference",
    )
    check_statistics(mu, sigma, f"--reference {folder}: features.npz")
    return mu, sigma, sigma_sqrt


def load_reference_sigma_sqrt(folder, ref_sigma) -> np.ndarray:
    with np.load(Path(folder) / "features.npz") as stored:
        if "sigma_sqrt" in stored:
            return stored["sigma_sqrt"].astype(np.float64)
    return psd_sqrt(ref_sigma)  # a reference written before sigma_sqrt was stored

CHUNK_HELP = "images per kept feature chunk: a killed job's rerun recomputes only the unfinished chunks"


def add_mode_flags(p, weights: bool = True) -> None:
    """--mode (`duodiff reference`, `real-set` and `fid`) and --legacy-weights (those that run the network)."""
    add_flag(p, "--mode", default=inception.MODE,
             help="FID protocol: clean (clean-fid's) or legacy_pytorch (pytorch-fid's, the papers')")
    if weights:
        add_flag(p, "--legacy-weights", default=None,
                 help=f"{inception.LEGACY_WEIGHTS_FILE} for --mode legacy_pytorch (default: torch's hub cache)")


SPLIT_SEED_HELP = ("the seed of the one seeded, class-stratified random split of the training images into the "
                   "reference and the real set, disjoint (give both commands the same seed; default 0); never "
                   "dataset order, which for a class-sorted ImageFolder tree is a few classes")


def add_cli(subparsers):
    """`duodiff reference` and `duodiff real-set` (registered by duodiff.metrics.fid's add_cli)."""
    p = subparsers.add_parser("reference", help="real images + their Inception features, once per dataset")
    add_flag(p, "--dataset", required=True)
    add_flag(p, "--data-root", default=None)
    add_flag(p, "--download", action="store_true")
    add_flag(p, "--image-size", type=int, default=None)
    add_flag(p, "--n-reference", type=int, required=True)
    add_flag(p, "--split-seed", type=int, default=0, help=SPLIT_SEED_HELP)
    add_flag(p, "--max-reference", type=int, default=None,
             help="Inception features of only the first N reference images (default: all; the images stay whole)")
    add_flag(p, "--output-folder", required=True)
    add_flag(p, "--batch-size", type=int, default=50)
    add_flag(p, "--device", default=None, help="cpu or cuda (default: cuda when available)")
    add_flag(p, "--num-workers", type=int, default=0, help="DataLoader workers for decoding and resizing")
    add_flag(p, "--feature-network", default="auto", help="auto | clean-fid | fid-helper (auto: clean-fid's file if present)")
    add_flag(p, "--chunk-size", type=int, default=1000, help=CHUNK_HELP)
    add_mode_flags(p)
    add_flag(p, "--statistics", default=None,
             help="npz with mu and sigma (U-ViT / pytorch-fid / clean-fid stats) instead of the dataset's images; "
                  "--mode states the protocol that made it")
    p.set_defaults(func=lambda a: run_reference(
        dataset=a.dataset, n_reference=a.n_reference, max_reference=a.max_reference, output_folder=a.output_folder, data_root=a.data_root,
        download=a.download, image_size=a.image_size, batch_size=a.batch_size, device=a.device,
        num_workers=a.num_workers, feature_network=a.feature_network, chunk_size=a.chunk_size, mode=a.mode,
        legacy_weights=a.legacy_weights, statistics=a.statistics, split_seed=a.split_seed,
    ))  # fmt: skip

    p = subparsers.add_parser("real-set", help="real images not in the reference, scored like a sample set: the floor")
    add_flag(p, "--dataset", required=True)
    add_flag(p, "--data-root", default=None)
    add_flag(p, "--download", action="store_true")
    add_flag(p, "--image-size", type=int, default=None)
    add_flag(p, "--n-reference", type=int, required=True, help="the reference's size: its images are never taken")
    add_flag(p, "--split-seed", type=int, default=0, help=SPLIT_SEED_HELP)
    add_flag(p, "--n-images", type=int, required=True, help="real images in the set (at most what is left)")
    add_flag(p, "--output-folder", required=True, help="DIR: images/*.png and stats.json")
    add_flag(p, "--batch-size", type=int, default=50)
    add_flag(p, "--num-workers", type=int, default=0)
    add_mode_flags(p, weights=False)
    p.set_defaults(func=lambda a: run_real_set(
        dataset=a.dataset, n_reference=a.n_reference, n_images=a.n_images, output_folder=a.output_folder,
        data_root=a.data_root, download=a.download, image_size=a.image_size, batch_size=a.batch_size,
        num_workers=a.num_workers, mode=a.mode, split_seed=a.split_seed,
    ))  # fmt: skip
