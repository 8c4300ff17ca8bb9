"""A feature network made for the dataset: a small image classifier whose penultimate activations
replace Inception's pool features in the Fréchet distance and KID.

Why: Inception features of 8x8 digits upscaled to 299 px hardly tell a clean digit from a
speckled one (held-out real digits score FID 44-47 against a 500-image reference, the models
68-75, and the ranking of clean and speckled samples came out reversed). A classifier trained on
the dataset itself sees what makes a digit a digit, as Inception does for ImageNet-like photos:
its features separate the methods with far less noise per sample.

`duodiff feature-net` trains it once per dataset (its own rule), deterministically: a fixed
split (`holdout_fraction` of the images, chosen by a seeded permutation, never seen in
training), fixed initial weights and batch order from `seed`, single-threaded deterministic CPU
kernels. The held-out accuracy goes into feature_net.json beside model.pt, with the weights'
sha256, which every score made with it records.

The network plugs into clean-fid as its custom feature extractor
(`cleanfid.fid.get_files_features(..., model=fn, custom_fn_resize=...)`): clean-fid reads each PNG
with PIL as RGB uint8, our resizer keeps the native resolution (the network was trained at it),
and `fn` maps the (B, 3, H, W) float tensor in [0, 255] back to the dataset's channels in
[-1, 1], the range the diffusion models and the classifier work in.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from duodiff.core.errors import DuodiffError, check_int, check_positive, require
from duodiff.core.flags import add_flag
from duodiff.core.io import file_sha256, read_json, torch_save, write_json

FORMAT = "duodiff-feature-net-v2"  # v2: features divided by their training RMS
MODEL_NAME = "model.pt"
INFO_NAME = "feature_net.json"
MAX_IMAGE_SIZE = 32  # a few conv layers on full-resolution images: small images only


class ClassifierNet(nn.Module):
    """conv3x3(32) ReLU, conv3x3(64) ReLU, maxpool 2, conv3x3(64) ReLU, Linear(feature_dim) ReLU
    -> features; Linear(num_classes) on top for training. Small images only (digits: 8x8)."""

    def __init__(self, in_chans: int, image_size: int, num_classes: int, feature_dim: int, width: int = 32):
        super().__init__()
        self.in_chans, self.image_size = in_chans, image_size
        self.num_classes, self.feature_dim, self.width = num_classes, feature_dim, width
        self.conv = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),
        )  # fmt: skip
        self.fc = nn.Linear(2 * width * (image_size // 2) ** 2, feature_dim)
        self.classify = nn.Linear(feature_dim, num_classes)
        # Set once after training (set_feature_scale): the features' root mean square on the
        # training images, so that features are O(1) like Inception's and KID's cubic kernel
        # (x.y / d + 1)^3 stays in its intended range instead of reaching 1e7.
        self.register_buffer("feature_scale", torch.ones(()))

    def config(self) -> dict:
        return {
            "in_chans": self.in_chans, "image_size": self.image_size, "num_classes": self.num_classes,
            "feature_dim": self.feature_dim, "width": self.width,
        }  # fmt: skip

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, C, H, W) -> (B, feature_dim), the activations FD and KID use."""
        return self.hidden(x) / self.feature_scale

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.hidden(x))

    @torch.no_grad()
    def set_feature_scale(self, images: torch.Tensor) -> None:
        self.feature_scale.fill_(float(self.hidden(images).square().mean().sqrt()))


def split_indices(n: int, holdout_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) indices: a seeded permutation, the last round(n * fraction) held out."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_held = max(1, round(n * holdout_fraction))
    return order[: n - n_held].sort().values, order[n - n_held :].sort().values


def accuracy(model: ClassifierNet, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(images).argmax(1) == labels).float().mean())


def _check_settings(dataset: str, image_size: int | None, *, epochs: int, batch_size: int, lr: float,
                    weight_decay: float, feature_dim: int, holdout_fraction: float) -> None:
    """The flags of `duodiff feature-net`, checked before the data is read (a missing CelebA folder
    is not the first thing to hear)."""
    from duodiff.core import data

    for name, value in (("--epochs", epochs), ("--batch-size", batch_size), ("--feature-dim", feature_dim)):
        check_int(name, value, 1)
    check_positive("--lr", lr)
    require(weight_decay >= 0, f"--weight-decay must be >= 0; got {weight_decay!r}")
    require(0 < holdout_fraction < 1, f"--holdout-fraction must be in (0, 1); got {holdout_fraction!r}")
    require(
        data.NUM_CLASSES.get(dataset) != 0,
        f"--dataset {dataset} has no class labels; a feature network needs a labelled dataset (use the Inception "
        "features for it: metrics.headline: inception)",
    )
    size = image_size or data.NATIVE_SIZE.get(dataset)
    require(
        size is None or size <= MAX_IMAGE_SIZE,
        f"--dataset {dataset} gives {size}px images; this small classifier is for images up to {MAX_IMAGE_SIZE}px "
        "(use the Inception features for larger ones: metrics.headline: inception)",
    )


def train_classifier(real, images: torch.Tensor, labels: torch.Tensor, split: tuple[torch.Tensor, torch.Tensor], *,
                     feature_dim: int, epochs: int, batch_size: int, lr: float, weight_decay: float,
                     seed: int) -> tuple[ClassifierNet, float, float]:
    """A ClassifierNet for the dataset `real`, trained by AdamW on the cross-entropy of the images
    split[0], its feature scale set from them, in eval mode -> (model, train accuracy, held-out
    accuracy on split[1]). Deterministic: same seed, same weights, whatever the machine's thread count."""
    from tqdm import tqdm

    train_idx, held_idx = split
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        model = ClassifierNet(real.channels, real.image_size, real.num_classes, feature_dim)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        order_gen = torch.Generator().manual_seed(seed + 1)
        x_train, y_train = images[train_idx], labels[train_idx]
        for _ in tqdm(range(epochs), desc="feature net", unit="epoch"):
            model.train()
            for batch in torch.randperm(len(x_train), generator=order_gen).split(batch_size):
                loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        model.eval()
        model.set_feature_scale(x_train)
        return model, accuracy(model, x_train, y_train), accuracy(model, images[held_idx], labels[held_idx])
    finally:
        torch.set_num_threads(threads)


def run_feature_net(
    *,
    dataset: str,
    output_folder,
    data_root,
    download: bool,
    image_size: int | None,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    feature_dim: int,
    holdout_fraction: float,
    seed: int,
) -> dict:
    """Train the classifier on the dataset -> DIR/model.pt, DIR/feature_net.json (held-out accuracy)."""
    from duodiff.core import data

    _check_settings(dataset, image_size, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                    feature_dim=feature_dim, holdout_fraction=holdout_fraction)
    output_folder = Path(output_folder)
    real = data.load_dataset(dataset, root=data_root, download=download, image_size=image_size, train=True)
    require(
        real.num_classes > 1 and real.image_size <= MAX_IMAGE_SIZE,
        f"--dataset {dataset}: {real.num_classes} classes of {real.image_size}px images; a feature network needs "
        f"at least 2 classes and images up to {MAX_IMAGE_SIZE}px",
    )
    images = torch.stack([real[i][0] for i in range(len(real))])
    labels = torch.tensor([real[i][1] for i in range(len(real))])
    train_idx, held_idx = split_indices(len(real), holdout_fraction, seed)

    model, train_acc, held_acc = train_classifier(
        real, images, labels, (train_idx, held_idx), feature_dim=feature_dim, epochs=epochs, batch_size=batch_size,
        lr=lr, weight_decay=weight_decay, seed=seed,
    )  # fmt: skip

    model_path = output_folder / MODEL_NAME
    torch_save({"format": FORMAT, "config": model.config(), "state_dict": model.state_dict()}, model_path)
    info = {
        "dataset": dataset,
        "image_size": real.image_size,
        "channels": real.channels,
        "num_classes": real.num_classes,
        "feature_dim": feature_dim,
        "n_train": len(train_idx),
        "n_heldout": len(held_idx),
        "train_accuracy": train_acc,
        "heldout_accuracy": held_acc,
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
        "holdout_fraction": holdout_fraction, "seed": seed,
        "sha256": file_sha256(str(model_path)),
    }  # fmt: skip
    write_json(output_folder / INFO_NAME, info)
    print(f"feature net: held-out accuracy {held_acc:.4f} on {len(held_idx)} images (train {train_acc:.4f})")
    return info


def require_feature_net(path) -> Path:
    """model.pt of `duodiff feature-net` -> the feature_net.json beside it; the one message when
    either is missing (scoring checks it before any image is read)."""
    path = Path(path)
    info_path = path.parent / INFO_NAME
    require(
        path.is_file() and info_path.is_file(),
        f"feature network {path}: no {MODEL_NAME} and {INFO_NAME} there; train it with `duodiff feature-net`",
    )
    return info_path


def load_feature_net(path) -> tuple[ClassifierNet, dict]:
    """model.pt of `duodiff feature-net` -> (network in eval mode, its feature_net.json)."""
    path = Path(path)
    info_path = require_feature_net(path)
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same one line
        raise DuodiffError(f"feature network {path} cannot be read ({type(error).__name__}); retrain it") from None
    require(
        isinstance(stored, dict) and stored.get("format") == FORMAT,
        f"feature network {path} is not a `duodiff feature-net` model ({FORMAT})",
    )
    model = ClassifierNet(**stored["config"])
    model.load_state_dict(stored["state_dict"])
    return model.eval(), read_json(info_path)


def feature_extractor(path: str, device: str = "cpu"):
    """-> (fn, resize, info) for clean-fid: fn maps clean-fid's (B, 3, H, W) float batch in
    [0, 255] to (B, feature_dim); resize keeps the native size (clean-fid's resizer would make
    299 px); info names the network and its sha256 like the Inception extractor's. Loaded once
    per process per network *content*: a network retrained at the same path is loaded again, and
    its sha256 keys other feature chunks (feature_cache.py)."""
    return _feature_extractor(str(path), device, file_sha256(str(path)))


@functools.lru_cache(maxsize=None)
def _feature_extractor(path: str, device: str, sha256: str):
    model, meta = load_feature_net(path)
    model = model.to(device)
    channels = meta["channels"]

    def fn(x):
        # clean-fid hands RGB; a grayscale PNG has three equal channels, so the first is the image.
        x = x[:, :channels] / 127.5 - 1.0
        with torch.no_grad():
            return model.features(x.to(device))

    def resize(image: np.ndarray) -> np.ndarray:
        # run_fid checked the samples' and the reference's size against the network's.
        assert image.shape[:2] == (meta["image_size"], meta["image_size"]), image.shape
        return image.astype(np.float32)

    info = {
        "feature_network": f"digits classifier ({meta['dataset']}, held-out accuracy {meta['heldout_accuracy']:.4f})",
        "feature_network_key": "classifier",
        "feature_network_path": str(path),
        "feature_network_sha256": sha256,
        "heldout_accuracy": meta["heldout_accuracy"],
    }
    return fn, resize, info


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("feature-net", help="train the dataset's feature network (a small classifier) once")
    add_flag(p, "--dataset", required=True)
    add_flag(p, "--data-root", default=None)
    add_flag(p, "--download", action="store_true")
    add_flag(p, "--image-size", type=int, default=None)
    add_flag(p, "--output-folder", required=True, help="DIR: model.pt and feature_net.json")
    add_flag(p, "--epochs", type=int, default=30)
    add_flag(p, "--batch-size", type=int, default=64)
    add_flag(p, "--lr", type=float, default=1e-3)
    add_flag(p, "--weight-decay", type=float, default=1e-4)
    add_flag(p, "--feature-dim", type=int, default=128, help="width of the feature layer FD and KID use")
    add_flag(p, "--holdout-fraction", type=float, default=0.2, help="share of images never trained on")
    add_flag(p, "--seed", type=int, default=0)
    p.set_defaults(func=lambda a: run_feature_net(
        dataset=a.dataset, output_folder=a.output_folder, data_root=a.data_root, download=a.download,
        image_size=a.image_size, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, weight_decay=a.weight_decay,
        feature_dim=a.feature_dim, holdout_fraction=a.holdout_fraction, seed=a.seed,
    ))  # fmt: skip
