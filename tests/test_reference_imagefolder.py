"""The FID reference of a class-sorted ImageFolder tree (ImageNet's layout) is the whole training
distribution: a seeded draw over every class in proportion to its share, or the whole set, never
the first n in dataset (= class) order. A fake tree, 5 classes x 20 images, each image a flat colour
that names its class and number, so the written PNGs say which images were taken."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _defaults import cli_args
from PIL import Image

from duodiff.metrics import reference

CLASSES, PER_CLASS, SIZE = 5, 20, 8


def colour(c: int, i: int) -> tuple[int, int, int]:
    return (40 * c + 10, 10 * i + 5, 128)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    for c in range(CLASSES):
        (root / f"class{c}").mkdir()
        for i in range(PER_CLASS):
            Image.new("RGB", (SIZE, SIZE), colour(c, i)).save(root / f"class{c}" / f"{i:03d}.png")
    return root


def build(tree, folder, n_reference, seed=0):
    return reference.run_reference(**cli_args("reference", dataset="imagefolder", data_root=str(tree), image_size=SIZE,
                                              n_reference=n_reference, max_reference=2, output_folder=folder,
                                              batch_size=50, device="cpu", split_seed=seed))


def written(folder) -> list[tuple[int, int]]:
    """(class, number) of each written reference image, read back from its colour."""
    out = []
    for f in sorted((folder / "images").iterdir()):
        r, g, _ = np.asarray(Image.open(f))[0, 0]
        out.append((int(round((r - 10) / 40)), int(round((g - 5) / 10))))
    return out


@pytest.fixture(scope="module")
def half(tree, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ref")
    return folder, build(tree, folder, 50)


def test_every_class_in_proportion_not_dataset_order(half):
    folder, meta = half
    taken = written(folder)
    assert len(taken) == len(set(taken)) == 50
    counts = np.bincount([c for c, _ in taken], minlength=CLASSES)
    assert counts.tolist() == [10] * CLASSES  # the first 50 in order would be classes 0-2 only
    assert sorted(meta["indices"]) != meta["indices"] and set(meta["indices"]) != set(range(50))
    # Within each class a random draw, not its first ten images either.
    assert any(sorted(i for c2, i in taken if c2 == c) != list(range(10)) for c in range(CLASSES))
    stored = json.loads((folder / "reference.json").read_text())
    assert stored["coverage"] == "seeded class-stratified sample of the training set"
    assert stored["n_train"] == 100 and stored["n_classes"] == stored["classes_covered"] == CLASSES
    assert stored["per_class"] == {"min": 10, "max": 10} and stored["split_seed"] == 0
    assert "within each class in proportion" in stored["selection"]


def test_same_seed_same_images_other_seed_other_images(tree, half, tmp_path):
    folder, meta = half
    again = build(tree, tmp_path / "again", 50)
    assert again["indices"] == meta["indices"] and written(tmp_path / "again") == written(folder)
    other = build(tree, tmp_path / "other", 50, seed=1)
    assert set(other["indices"]) != set(meta["indices"])


def test_the_whole_training_set(tree, tmp_path):
    meta = build(tree, tmp_path, CLASSES * PER_CLASS)
    assert sorted(written(tmp_path)) == [(c, i) for c in range(CLASSES) for i in range(PER_CLASS)]
    assert meta["coverage"] == "whole training set" and "whole training set" in meta["selection"]
    assert sorted(meta["indices"]) != meta["indices"], "seeded order, so a --max-reference prefix is random"
