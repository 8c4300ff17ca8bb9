"""Datasets: digits values and shapes, ImageFolder preprocessing, and clear errors for missing data."""

import numpy as np
import pytest
import torch
from PIL import Image

from duodiff.core.data import DATASETS, load_dataset
from duodiff.core.errors import DuodiffError


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


def test_digits_are_the_1797_sklearn_images_in_minus1_1(digits):
    from sklearn.datasets import load_digits

    reference = load_digits()
    assert len(digits) == 1797
    image, label = digits[0]
    assert image.shape == (1, 8, 8) and image.dtype == torch.float32
    assert isinstance(label, int)
    # sklearn's pixel values are integers 0..16: 0 -> -1, 8 -> 0, 16 -> 1.
    for index in (0, 5, 1796):
        image, label = digits[index]
        expected = torch.tensor(reference.images[index], dtype=torch.float32) / 8.0 - 1.0
        assert torch.equal(image[0], expected)
        assert label == reference.target[index]
    everything = torch.stack([digits[i][0] for i in range(len(digits))])
    assert everything.min() == -1.0 and everything.max() == 1.0
    assert digits.channels == 1 and digits.image_size == 8 and digits.num_classes == 10


def test_digits_are_never_flipped_but_cifar_and_celeba_are(digits):
    from duodiff.core.data import HFLIP

    assert digits.hflip is False  # a flipped digit is another symbol
    assert HFLIP["cifar10"] and HFLIP["celeba"]


def test_digits_resize_keeps_range_and_mean(digits):
    big = load_dataset("digits", image_size=16)
    assert len(big) == 1797
    image, label = big[3]
    assert image.shape == (1, 16, 16)
    assert label == digits[3][1]
    stacked = torch.stack([big[i][0] for i in range(0, 1797, 50)])
    small = torch.stack([digits[i][0] for i in range(0, 1797, 50)])
    assert stacked.min() >= -1.0 and stacked.max() <= 1.0
    # Bilinear upsampling by 2 redistributes intensity without creating or losing much of it.
    assert torch.allclose(stacked.mean(dim=(1, 2, 3)), small.mean(dim=(1, 2, 3)), atol=0.03)
    # Downsampling a constant image gives the same constant.
    assert load_dataset("digits", image_size=8)[3][0].equal(digits[3][0])


def test_digits_has_no_split(digits):
    evaluation = load_dataset("digits", train=False)
    assert len(evaluation) == len(digits)
    assert torch.equal(evaluation[7][0], digits[7][0])


def test_unknown_dataset_lists_the_choices():
    with pytest.raises(DuodiffError) as error:
        load_dataset("mnist")
    message = str(error.value)
    assert "mnist" in message
    for name in DATASETS:
        assert name in message


def test_missing_cifar10_gives_one_clear_message(tmp_path):
    root = tmp_path / "nothing_here"
    with pytest.raises(DuodiffError) as error:
        load_dataset("cifar10", root=root, download=False)
    message = str(error.value)
    assert str(root) in message
    assert "--download" in message and "cifar-10-batches-py" in message
    assert "\n" not in message
    assert "download=True" not in message  # torchvision's advice names its Python argument, not our flag


def test_missing_celeba_says_where_the_files_go(tmp_path):
    with pytest.raises(DuodiffError) as error:
        load_dataset("celeba", root=tmp_path)
    message = str(error.value)
    assert str(tmp_path / "celeba") in message
    assert "img_align_celeba" in message and "list_eval_partition.txt" in message


def test_missing_imagefolder_and_size(tmp_path):
    with pytest.raises(DuodiffError, match="--image-size"):
        load_dataset("imagefolder", root=tmp_path)
    with pytest.raises(DuodiffError) as error:
        load_dataset("imagefolder", root=tmp_path / "absent", image_size=8)
    assert str(tmp_path / "absent") in str(error.value)
    with pytest.raises(DuodiffError, match="cannot be downloaded"):
        load_dataset("imagenet64", root=tmp_path, download=True)


def test_imagefolder_resizes_crops_and_scales(tmp_path):
    (tmp_path / "black").mkdir()
    (tmp_path / "white").mkdir()
    # 20 wide x 12 high: resize the short side to 8 (13x8), then center-crop to 8x8.
    Image.fromarray(np.zeros((12, 20, 3), dtype=np.uint8)).save(tmp_path / "black" / "a.png")
    Image.fromarray(np.full((12, 20), 255, dtype=np.uint8)).save(tmp_path / "white" / "b.png")  # grey -> RGB
    left_half = np.zeros((12, 20, 3), dtype=np.uint8)
    left_half[:, :10] = 255
    Image.fromarray(left_half).save(tmp_path / "white" / "c.png")
    data = load_dataset("imagefolder", root=tmp_path, image_size=8)
    assert len(data) == 3 and data.num_classes == 2 and data.channels == 3
    black, label_black = data[0]
    white, label_white = data[1]
    half, _ = data[2]
    assert black.shape == white.shape == (3, 8, 8)
    assert torch.equal(black, torch.full((3, 8, 8), -1.0)) and label_black == 0
    assert torch.equal(white, torch.full((3, 8, 8), 1.0)) and label_white == 1
    # The center crop keeps the middle: white on the left half, black on the right half.
    assert torch.all(half[:, :, :3] > 0.9) and torch.all(half[:, :, -3:] < -0.9)


def adm_center_crop(image, size):
    """ADM's center_crop_arr (guided-diffusion image_datasets.py), which U-ViT's datasets.py uses
    for ImageNet, as written there: the reference for duodiff.core.data's imagenet256."""
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.array(image)
    crop_y, crop_x = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[crop_y : crop_y + size, crop_x : crop_x + size]


@pytest.mark.parametrize("width, height", [(1030, 700), (300, 420), (256, 256)])
def test_imagenet256_is_u_vits_center_crop(tmp_path, width, height):
    rng = np.random.default_rng(0)
    (tmp_path / "n01440764").mkdir()
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "n01440764" / "a.png")
    data = load_dataset("imagenet256", root=tmp_path)
    image, label = data[0]
    expected = adm_center_crop(Image.fromarray(pixels), 256)
    assert image.shape == (3, 256, 256) and label == 0 and data.hflip
    want = torch.from_numpy(expected).permute(2, 0, 1).float() / 127.5 - 1.0
    torch.testing.assert_close(image, want, rtol=0, atol=1e-6)
