"""Which real images the floor takes: `duodiff real-set` with a split seed draws a class-stratified
random sample of the training images, none of them in the reference, the same for the same seed.
The expectations come from scikit-learn's digits themselves (labels, pixels), not from the split
function."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _defaults import cli_args
from PIL import Image

from duodiff.metrics import reference

N_REFERENCE, N_REAL = 797, 1000  # the embedded default's: together every one of the 1,797 digits


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    loaded = load_digits()
    # The images as the pipeline writes them: [0, 16] -> [0, 255], rounded half up.
    return np.floor(loaded.images / 16 * 255 + 0.5).astype(np.uint8), loaded.target


def real_set(folder, seed, n_images=N_REAL):
    return reference.run_real_set(**cli_args("real-set", dataset="digits", n_reference=N_REFERENCE, n_images=n_images,
                                             output_folder=folder, batch_size=500, split_seed=seed))


@pytest.fixture(scope="module")
def split(tmp_path_factory, digits):
    """The default study's reference and real set, seed 0 (Inception features of 2 reference images
    only: the images are what is tested)."""
    root = tmp_path_factory.mktemp("split")
    ref = reference.run_reference(**cli_args("reference", dataset="digits", n_reference=N_REFERENCE, max_reference=2,
                                             output_folder=root / "reference", batch_size=500, device="cpu",
                                             split_seed=0))
    real = real_set(root / "real", 0)
    return root, ref, real


def written_images(folder):
    files = sorted((folder / "images").iterdir())
    return np.stack([np.asarray(Image.open(f)) for f in files])


def test_each_written_image_is_the_digit_its_index_names(split, digits):
    root, ref, real = split
    images, _ = digits
    for name, meta in (("reference", ref), ("real", real)):
        written = written_images(root / name)
        assert len(written) == len(meta["indices"]) == len(set(meta["indices"]))
        assert np.array_equal(written, images[meta["indices"]]), name


def test_the_floor_is_disjoint_from_the_reference_and_not_dataset_order(split):
    _, ref, real = split
    assert len(ref["indices"]) == N_REFERENCE and real["n_samples"] == len(real["indices"]) == N_REAL
    assert not set(ref["indices"]) & set(real["indices"])
    # A random draw, not the first 797 / the last 1,000 in dataset order (the order-split's halves differ).
    assert set(ref["indices"]) != set(range(N_REFERENCE))
    assert sorted(real["indices"]) != real["indices"], "the order is shuffled too, so any prefix is a random draw"


@pytest.mark.parametrize("side", ["reference", "real"])
def test_each_class_in_proportion_to_its_share(split, digits, side):
    _, ref, real = split
    _, labels = digits
    indices = (ref if side == "reference" else real)["indices"]
    counts = np.bincount(labels[indices], minlength=10)
    expected = np.bincount(labels, minlength=10) * len(indices) / len(labels)
    assert np.all(np.abs(counts - expected) <= 1.0), (counts, expected)


def test_same_seed_same_images_other_seed_other_images(split, tmp_path, digits):
    _, _, real = split
    again = real_set(tmp_path / "again", 0, n_images=300)
    other = real_set(tmp_path / "other", 1, n_images=300)
    assert again["indices"] == real_set(tmp_path / "third", 0, n_images=300)["indices"]
    assert set(again["indices"]) != set(other["indices"])
    # A smaller floor with the same seed comes from the same held-out pool: never a reference image.
    assert set(again["indices"]) <= set(real["indices"])
    assert np.bincount(digits[1][again["indices"]], minlength=10).min() >= 29


def test_stats_say_how_the_floor_was_drawn_and_that_the_models_saw_it(split):
    root, _, real = split
    stored = json.loads((root / "real" / "stats.json").read_text())
    assert stored == real and stored["split_seed"] == 0 and stored["seen_in_training"] is True
    assert "at random within each class" in stored["selection"] and "none of them in the 797" in stored["selection"]


def test_there_is_no_draw_by_dataset_order(tmp_path):
    # One way of drawing for every dataset: a null seed (the former by-order draw) is refused.
    from duodiff.core.errors import DuodiffError

    assert cli_args("real-set")["split_seed"] == cli_args("reference")["split_seed"] == 0
    with pytest.raises(DuodiffError, match="--split-seed is required"):
        reference.run_real_set(**cli_args("real-set", dataset="digits", n_reference=1790, n_images=10,
                                          output_folder=tmp_path, batch_size=10, split_seed=None))
