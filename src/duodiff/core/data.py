"""Datasets as images in [-1, 1] (C, H, W) float32 with an integer label.

    digits       scikit-learn's bundled 8x8 handwritten digits (1,797 images, 1 channel, no download);
                 the embedded default. Optionally resized (bilinear, antialiased) to image_size.
    cifar10      torchvision CIFAR-10 32x32 (train: 50,000 images, test: 10,000).
    celeba       torchvision CelebA, center crop 178 then resize to 64: the U-ViT / DuoDiff
                 preprocessing of "CelebA 64x64".
    imagenet64   an ImageFolder tree (root/<class>/<image>) resized + center-cropped to 64
                 (ImageNet 64x64; U-ViT trains it class-conditional, num_classes: 1000).
    imagenet256  an ImageFolder tree of ImageNet at 256x256 (the latent models' images), with U-ViT's
                 preprocessing (its datasets.py, ADM's center_crop_arr): halve with a box filter
                 while the short side is >= 2 x 256, resize (bicubic) to a short side of 256,
                 center crop. Class-conditional (num_classes: 1001 with guidance's null class).
    imagefolder  any ImageFolder tree, resized + center-cropped to image_size.

Random horizontal flips are the papers' only augmentation (U-ViT flips CIFAR-10, CelebA and
ImageNet; never digits, where a flip changes the digit). `dataset.hflip` says whether training
should flip. The flip is NOT applied inside `__getitem__`: the training loop flips whole batches
with its per-step generator, so the data stream is a function of (seed, step) alone and a resumed
run sees exactly the images an uninterrupted one would, whatever the number of loader workers.

`load_dataset(name, train=False)` gives the evaluation split (digits: the same 1,797 images,
there is no split) and is what the metrics' reference set reuses; FID references in the U-ViT
papers use the *training* images, i.e. `load_dataset(name, train=True)`, unflipped.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from duodiff.core.errors import DuodiffError, check_choice, is_int, require

DATASETS = ("digits", "cifar10", "celeba", "imagenet64", "imagenet256", "imagefolder")

# Native resolution and channel count of each dataset (None: set by image_size / the images).
NATIVE_SIZE = {"digits": 8, "cifar10": 32, "celeba": 64, "imagenet64": 64, "imagenet256": 256, "imagefolder": None}
CHANNELS = {"digits": 1, "cifar10": 3, "celeba": 3, "imagenet64": 3, "imagenet256": 3, "imagefolder": 3}
NUM_CLASSES = {"digits": 10, "cifar10": 10, "celeba": 0, "imagenet64": None, "imagenet256": None, "imagefolder": None}
# Whether training flips horizontally (the papers' augmentation).
HFLIP = {"digits": False, "cifar10": True, "celeba": True, "imagenet64": True, "imagenet256": True, "imagefolder": True}
# CelebA's aligned faces are 178x218; U-ViT (and DuoDiff) center-crop 178 before resizing.
CELEBA_CROP = 178

# Where the files go when placed by hand (ROOT is --data-root).
MANUAL = {
    "cifar10": "put the extracted 'cifar-10-batches-py' folder from https://www.cs.toronto.edu/~kriz/cifar.html "
    "into ROOT",
    "celeba": "put 'img_align_celeba/' and list_attr_celeba.txt, identity_CelebA.txt, list_bbox_celeba.txt, "
    "list_landmarks_align_celeba.txt, list_eval_partition.txt from "
    "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html into ROOT/celeba/",
    "imagenet64": "put the images there as ROOT/<class>/<image>.png (an ImageFolder tree; e.g. the "
    "downsampled ImageNet 64x64 from https://image-net.org/download-images, one folder per class); "
    "it cannot be downloaded automatically",
    "imagenet256": "put ImageNet's training images there as ROOT/<class>/<image>.JPEG (an ImageFolder tree: "
    "ILSVRC2012_img_train from https://image-net.org/download-images, one folder per class); they are "
    "center-cropped to 256 when read; it cannot be downloaded automatically",
    "imagefolder": "put the images there as ROOT/<class>/<image>.png (an ImageFolder tree); "
    "it cannot be downloaded automatically",
}
DOWNLOADABLE = ("cifar10", "celeba")  # torchvision can fetch these (CelebA through gdown)


def how_to_get(name: str, root, download: bool) -> str:
    manual = MANUAL[name].replace("ROOT", str(root))
    if name not in DOWNLOADABLE:
        return manual
    if download:
        return f"check the internet connection{' and that gdown is installed' if name == 'celeba' else ''}, or {manual}"
    return f"pass --download to fetch it (needs internet), or {manual}"


class ImageDataset(Dataset):
    """(image in [-1, 1] (C, H, W) float32, label int) from a torchvision-style dataset or tensors."""

    def __init__(self, name, source, channels, image_size, num_classes, hflip):
        self.name = name
        self.source = source  # indexable -> (image tensor in [-1, 1], label)
        self.channels = channels
        self.image_size = image_size
        self.num_classes = num_classes  # 0: no usable class labels (label is always 0)
        self.hflip = hflip  # whether training should flip (the training loop does it per batch)

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        image, label = self.source[index]
        return image, int(label) if label is not None else 0


class TensorImages:
    """In-memory images (N, C, H, W) and labels (N,): digits is small enough to keep whole."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], self.labels[index]


def default_image_size(name: str) -> int | None:
    check_choice("--dataset", name, DATASETS)
    return NATIVE_SIZE[name]


def load_dataset(name, root=None, download=False, image_size=None, train=True) -> ImageDataset:
    """The dataset `name` as an ImageDataset of (image in [-1, 1], label).

    root: folder holding the data (default data/<name>; digits needs none). train: the training
    split, else the evaluation split. image_size: resize to this (default: the native size).
    """
    check_choice("--dataset", name, DATASETS)
    if image_size is None:
        image_size = NATIVE_SIZE[name]
        require(image_size is not None, f"--dataset {name} needs --image-size (the size images are resized to)")
    require(
        is_int(image_size) and image_size > 0,
        f"--image-size must be a positive integer; got {image_size!r}",
    )
    if name == "digits":
        images, labels = _digits(image_size)
        return ImageDataset(name, TensorImages(images, labels), 1, image_size, 10, HFLIP[name])

    root = Path(root) if root is not None else Path("data") / name
    import torchvision
    from torchvision import transforms as T

    # ToTensor gives [0, 1]; Normalize(0.5, 0.5) maps to [-1, 1] as in U-ViT.
    to_unit = [T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)]
    resize = [T.Resize(image_size, antialias=True), T.CenterCrop(image_size)]
    try:
        if name == "cifar10":
            transform = T.Compose((resize if image_size != 32 else []) + to_unit)
            source = torchvision.datasets.CIFAR10(root, train=train, transform=transform, download=download)
            num_classes = 10
        elif name == "celeba":
            transform = T.Compose([T.CenterCrop(CELEBA_CROP), T.Resize(image_size, antialias=True)] + to_unit)
            source = torchvision.datasets.CelebA(
                root, split="train" if train else "test", target_type=[], transform=transform, download=download
            )
            num_classes = 0
        else:  # imagenet64, imagenet256, imagefolder
            require(not download, f"--dataset {name} cannot be downloaded; {how_to_get(name, root, download)}")
            crop = [AdmCenterCrop(image_size)] if name == "imagenet256" else resize
            transform = T.Compose([T.Lambda(_to_rgb)] + crop + to_unit)
            source = torchvision.datasets.ImageFolder(root, transform=transform)
            num_classes = len(source.classes)
    except DuodiffError:
        raise
    except (RuntimeError, FileNotFoundError, OSError, ImportError) as error:
        # torchvision says "Dataset not found or corrupted" / "Couldn't find any class folder", a
        # download without internet raises URLError (an OSError): one line that says what to do.
        reason = "download failed" if download else "not found or incomplete"
        raise DuodiffError(
            f"--dataset {name}: {reason} at --data-root {root} ({type(error).__name__}: {_first_line(error)}); "
            + how_to_get(name, root, download)
        ) from None
    require(len(source) > 0, f"--dataset {name}: no images at --data-root {root}")
    return ImageDataset(name, source, 3, image_size, num_classes, HFLIP[name])


def dataset_digest(data: ImageDataset) -> tuple[str, str]:
    """(where, sha256) of the images `data` reads, for the resumable state made from them (train's
    checkpoint, encode's chunks; core/fingerprint.py), so a dataset changed in place is not
    resumed over. Data held in memory (digits, a latents file's tensors, CIFAR-10's arrays): the
    sha256 of the loaded images' and labels' bytes, exact. Data read file by file (an ImageFolder
    tree: imagenet64, imagenet256, imagefolder; CelebA's aligned images): the sha256 of the sorted
    list of files with their class, size and modification time (ns), not of their bytes, since
    reading ImageNet's 1.3M files at every start would cost minutes: an image rewritten in place
    is caught by its mtime, one whose bytes changed with size and mtime restored is not."""
    digest = hashlib.sha256()
    source = data.source
    if isinstance(source, TensorImages):
        arrays, where = (source.images, source.labels), f"--dataset {data.name}, loaded images and labels"
    elif hasattr(source, "samples"):  # torchvision ImageFolder
        root = Path(source.root)
        arrays, where = None, f"--dataset {data.name} at {root}, file list with sizes and mtimes"
        for path, label in sorted((Path(path), label) for path, label in source.samples):
            _digest_file(digest, path, root, label)
    elif data.name == "celeba":
        folder = Path(source.root) / source.base_folder / "img_align_celeba"
        arrays, where = None, f"--dataset celeba at {folder}, file list with sizes and mtimes"
        for name in sorted(source.filename):
            _digest_file(digest, folder / name, folder, 0)
    else:  # CIFAR-10: the decoded arrays in memory
        arrays, where = (source.data, source.targets), f"--dataset {data.name} at {source.root}, loaded images and labels"
    for array in arrays or ():
        array = np.ascontiguousarray(array.numpy() if isinstance(array, torch.Tensor) else np.asarray(array))
        digest.update(f"{array.dtype.str} {array.shape}\0".encode())
        digest.update(array.tobytes())
    return where, digest.hexdigest()


def _digest_file(digest, path: Path, root: Path, label) -> None:
    stat = path.stat()
    digest.update(f"{path.relative_to(root).as_posix()}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())


def _digits(image_size: int):
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are integers 0..16.
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0 * 2.0 - 1.0
    if image_size != images.shape[-1]:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
        images = images.clamp(-1.0, 1.0)
    return images.contiguous(), torch.as_tensor(digits.target, dtype=torch.long)


class AdmCenterCrop:
    """U-ViT's ImageNet preprocessing (ADM's center_crop_arr): box-filter halvings while the short
    side is at least twice `size` (a cheap, alias-free first reduction), a bicubic resize to a
    short side of `size`, then the central size x size square."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image):
        from PIL import Image

        while min(image.size) >= 2 * self.size:
            image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
        scale = self.size / min(image.size)
        image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
        left, top = (image.size[0] - self.size) // 2, (image.size[1] - self.size) // 2
        return image.crop((left, top, left + self.size, top + self.size))


def _to_rgb(image):
    # Module-level (not a lambda) so DataLoader workers started with "spawn" can pickle it.
    return image.convert("RGB")


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    # torchvision's own advice names its Python argument; the message above names our flag.
    text = text.replace(". You can use download=True to download it", "")
    return text.splitlines()[0] if text else ""


def dataset_labels(real: ImageDataset) -> torch.Tensor:
    """The class label of every image (N,) int64, read without decoding the images where the source
    keeps them apart (digits' tensor, torchvision's `targets`); a dataset without usable labels
    (num_classes 0, e.g. CelebA) is one class."""
    if real.num_classes == 0:
        return torch.zeros(len(real), dtype=torch.int64)
    labels = getattr(real.source, "labels", None)
    if labels is None:
        labels = getattr(real.source, "targets", None)
    if labels is None:
        labels = [real[i][1] for i in range(len(real))]
    return torch.as_tensor(labels, dtype=torch.int64).reshape(-1)


def _allocate(n: int, counts: torch.Tensor) -> torch.Tensor:
    """n split over classes in proportion to `counts` (largest remainder; ties to the lower class),
    never more than a class has."""
    n = min(n, int(counts.sum()))
    exact = counts.double() * n / counts.sum().double()
    quota = exact.floor().long()
    remainder = exact - quota
    for c in sorted(range(len(counts)), key=lambda c: (-float(remainder[c]), c)):
        if int(quota.sum()) >= n:
            break
        if quota[c] < counts[c]:
            quota[c] += 1
    return quota


def stratified_split(labels, n_reference: int, n_real: int, seed: int) -> tuple[list[int], list[int]]:
    """The reference and the real-data set as dataset indices: a seeded random draw within each class,
    each class in proportion to its share of the dataset, the two disjoint. The reference depends on
    (labels, n_reference, seed) only, so a different n_real leaves it unchanged. Both come back in a
    seeded random order, so any prefix (metrics.fid.max_reference, max_samples) is a random draw
    too, not the lowest indices. A split by dataset order is not a random one: the digits' first
    797 and last 1,000 differ measurably (KD 14.8 [4.1, 24.8] x 1e-3 between them, issue 23)."""
    labels = torch.as_tensor(labels, dtype=torch.int64)
    classes = torch.unique(labels)
    generator = torch.Generator().manual_seed(int(seed))
    members = [torch.nonzero(labels == c).flatten() for c in classes]
    members = [m[torch.randperm(len(m), generator=generator)] for m in members]
    counts = torch.tensor([len(m) for m in members])
    ref_quota = _allocate(n_reference, counts)
    real_quota = _allocate(n_real, counts - ref_quota)
    reference = torch.cat([m[:q] for m, q in zip(members, ref_quota)])
    real = torch.cat([m[q:q + r] for m, q, r in zip(members, ref_quota, real_quota)])
    reference = reference[torch.randperm(len(reference), generator=generator)]
    real = real[torch.randperm(len(real), generator=generator)]
    return reference.tolist(), real.tolist()
