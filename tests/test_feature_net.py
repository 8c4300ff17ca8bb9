"""The embedded study's feature network (`duodiff feature-net`) and its path through clean-fid."""

import json

import numpy as np
import pytest
import torch
from _defaults import cli_args
from PIL import Image

import duodiff.core.data
from duodiff.core.errors import DuodiffError
from duodiff.core.images import save_png, to_uint8
from duodiff.metrics import feature_net, fid, inception
from duodiff.metrics import reference as reference_stage

SETTINGS = dict(epochs=4, batch_size=64, lr=1e-3, weight_decay=1e-4, feature_dim=32, holdout_fraction=0.2, seed=0)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fnet")
    info = feature_net.run_feature_net(**cli_args("feature-net", dataset="digits", output_folder=folder, **SETTINGS))
    return folder, info


def digits_split(part: int):
    """(images, labels) of the feature net's training (part 0) or held-out (part 1) digits."""
    real = duodiff.core.data.load_dataset("digits")
    indices = feature_net.split_indices(len(real), SETTINGS["holdout_fraction"], seed=SETTINGS["seed"])[part]
    return torch.stack([real[int(i)][0] for i in indices]), torch.tensor([real[int(i)][1] for i in indices])


def test_split_is_disjoint_and_covers_the_dataset():
    train, held = feature_net.split_indices(1797, 0.2, seed=0)
    assert len(held) == round(1797 * 0.2) and len(train) + len(held) == 1797
    assert not set(train.tolist()) & set(held.tolist())
    assert sorted(train.tolist() + held.tolist()) == list(range(1797))


def test_training_is_deterministic_and_records_its_heldout_accuracy(trained, tmp_path):
    folder, info = trained
    stored = json.loads((folder / "feature_net.json").read_text())
    assert stored == info
    assert (stored["n_train"], stored["n_heldout"]) == (1438, 359)
    # A small CNN on 8x8 digits: 4 epochs are enough for > 90% on images it never saw.
    assert 0.9 < stored["heldout_accuracy"] <= 1.0
    again = feature_net.run_feature_net(**cli_args("feature-net", dataset="digits", output_folder=tmp_path, **SETTINGS))
    assert again["sha256"] == info["sha256"]  # same seed, same weights, byte for byte


def test_accuracy_is_measured_on_the_heldout_images(trained):
    folder, info = trained
    model, _ = feature_net.load_feature_net(folder / "model.pt")
    images, labels = digits_split(1)
    with torch.no_grad():
        correct = (model(images).argmax(1) == labels).float().mean().item()
    assert correct == pytest.approx(info["heldout_accuracy"])


def test_classifier_fd_and_kid_equal_closed_forms_on_the_networks_own_features(trained, tmp_path, monkeypatch):
    """Samples and reference go through clean-fid's loader with the network as custom extractor;
    the scores must equal the Fréchet distance and unbiased KID of features computed by hand
    (PIL -> [-1, 1] -> model.features), and the interval must hold the score."""
    folder, _ = trained
    real = duodiff.core.data.load_dataset("digits")
    monkeypatch.setattr(inception, "feature_extractor", lambda *a, **k: pytest.fail("Inception must not load"))
    reference = tmp_path / "ref"
    # The reference folder as `duodiff reference` leaves it, without running Inception.
    reference_stage.write_dataset_images(real, range(40), reference, 16, 0, "reference")
    (reference / "reference.json").write_text(json.dumps({
        "n": 40, "dataset": "digits", "image_size": 8, "channels": 1, "feature_dim": 2, "feature_network_key": "x",
        "feature_network": "x", "feature_network_sha256": "x"}))
    np.savez(reference / "features.npz", features=np.zeros((40, 2)))
    samples = tmp_path / "s"
    (samples / "images").mkdir(parents=True)
    noise = torch.Generator().manual_seed(0)
    for i in range(30):  # real digits 100.. with noise: a set that differs from the reference
        image = (real[100 + i][0] + 0.3 * torch.randn(real[100 + i][0].shape, generator=noise)).clamp(-1, 1)
        save_png(to_uint8(image[None])[0], samples / "images" / f"{i:06d}.png")

    out = fid.run_fid(**cli_args("fid", samples=samples, reference=reference, output=tmp_path / "fd.json", batch_size=7,
                                 device="cpu", feature_net=folder / "model.pt"))

    model, _ = feature_net.load_feature_net(folder / "model.pt")

    def by_hand(paths):
        x = torch.stack([torch.from_numpy(np.asarray(Image.open(p), dtype=np.float32)) for p in paths])
        with torch.no_grad():
            return model.features((x / 127.5 - 1.0)[:, None]).double().numpy()

    a = by_hand(sorted((samples / "images").iterdir()))
    b = by_hand(sorted((reference / "images").iterdir()))
    from scipy import linalg

    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert out["fid"] == pytest.approx(expected, rel=1e-4)
    assert out["feature_network_key"] == "classifier" and out["n_reference"] == 40 and out["n_samples"] == 30
    assert out["fid_ci_low"] < out["fid"] < out["fid_ci_high"]
    assert out["kid_ci_low"] < out["kid_ci_high"]


def cifar10_reference(folder):
    """A reference folder of another dataset than the feature network's (digits)."""
    folder.mkdir()
    (folder / "reference.json").write_text(json.dumps({
        "n": 2, "dataset": "cifar10", "image_size": 32, "channels": 3, "feature_dim": 2}))
    np.savez(folder / "features.npz", features=np.zeros((2, 2)))
    return folder


def test_a_feature_net_of_another_dataset_is_refused(trained, tmp_path):
    folder, _ = trained
    reference = cifar10_reference(tmp_path / "ref")
    samples = tmp_path / "s" / "images"
    samples.mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(samples / f"{i:06d}.png")
    with pytest.raises(DuodiffError, match="was trained on dataset 'digits' but --reference .* has dataset 'cifar10'"):
        fid.run_fid(**cli_args("fid", samples=tmp_path / "s", reference=reference, output=tmp_path / "o.json",
                               feature_net=folder / "model.pt"))
    assert not (tmp_path / "o.json").exists()


def test_a_dataset_without_labels_is_refused(tmp_path):
    with pytest.raises(DuodiffError, match="celeba has no class labels"):
        feature_net.run_feature_net(**cli_args("feature-net", dataset="celeba", output_folder=tmp_path,
                                               data_root=tmp_path, **SETTINGS))


def test_features_are_scaled_to_unit_rms_on_the_training_images(trained):
    folder, _ = trained
    model, _ = feature_net.load_feature_net(folder / "model.pt")
    images, _ = digits_split(0)
    with torch.no_grad():
        features = model.features(images)
    assert float(features.square().mean().sqrt()) == pytest.approx(1.0, rel=1e-5)
    assert float(model.feature_scale) > 1.0  # raw ReLU activations are larger: they were rescaled


def test_score_writes_what_two_fid_runs_write(trained, tmp_path):
    # `duodiff score`, the workflow's scoring job: Inception on the first max_samples images into
    # fid.json, the classifier on every image into fd_classifier.json; each equal to its own
    # `duodiff fid` run, and the Inception budget never reaches the classifier.
    folder, _ = trained
    reference = tmp_path / "ref"
    reference_stage.run_reference(**cli_args("reference", dataset="digits", n_reference=12, max_reference=6,
                                             output_folder=reference, batch_size=6, device="cpu"))
    real = duodiff.core.data.load_dataset("digits")
    samples = tmp_path / "s"
    reference_stage.write_dataset_images(real, range(100, 108), samples, 8, 0, "samples")
    common = dict(samples=samples, reference=reference, batch_size=8, device="cpu", kid_subset_size=3)
    scored = fid.run_score(**cli_args("score", **common, output_dir=tmp_path / "m", feature_net=folder / "model.pt",
                                      max_samples=4))
    alone_inception = fid.run_fid(**cli_args("fid", **common, output=tmp_path / "i.json", max_samples=4))
    alone_classifier = fid.run_fid(**cli_args("fid", **common, output=tmp_path / "c.json", feature_net=folder / "model.pt"))
    written = {name: json.loads((tmp_path / "m" / f"{name}.json").read_text()) for name in ("fid", "fd_classifier")}
    for name, alone in (("fid", alone_inception), ("fd_classifier", alone_classifier)):
        assert written[name] == json.loads(json.dumps(scored[name]))
        assert {k: v for k, v in written[name].items() if k != "notes"} == pytest.approx(
            {k: v for k, v in json.loads(json.dumps(alone)).items() if k != "notes"})
    assert (written["fid"]["n_samples"], written["fid"]["n_reference"]) == (4, 6)
    assert (written["fd_classifier"]["n_samples"], written["fd_classifier"]["n_reference"]) == (8, 12)
    # Without a feature network: Inception only.
    assert fid.run_score(**cli_args("score", **common, output_dir=tmp_path / "i"))["fd_classifier"] is None
    assert sorted(p.name for p in (tmp_path / "i").iterdir()) == ["fid.json", "fid_features.npz"]


def write_paired_set(real, indices, folder, **pairing):
    reference_stage.write_dataset_images(real, indices, folder, 8, 0, "samples")
    record = {"seed": 0, "n_samples": len(indices), "batch_size": 4, "shape": [1, 8, 8], "label_classes": 0, **pairing}
    (folder / "stats.json").write_text(json.dumps({"pairing": record}))


def test_a_baseline_pairs_the_sets_sample_by_sample(trained, tmp_path):
    """The set shares its first five images with the baseline and differs in the last three: its
    paired difference is the difference of the two scores, inside its paired interval; the same
    set against itself differs by exactly 0; a set of another seed is refused before an image is
    read."""
    folder, _ = trained
    reference = tmp_path / "ref"
    reference_stage.run_reference(**cli_args("reference", dataset="digits", n_reference=40, max_reference=2,
                                             output_folder=reference, batch_size=8, device="cpu"))
    real = duodiff.core.data.load_dataset("digits")
    write_paired_set(real, range(100, 108), tmp_path / "full")
    write_paired_set(real, [*range(100, 105), 300, 301, 302], tmp_path / "s")
    common = dict(reference=reference, batch_size=8, device="cpu", kid_subset_size=3, feature_net=folder / "model.pt")
    base = fid.run_fid(**cli_args("fid", **common, samples=tmp_path / "full", output=tmp_path / "full" / "fd.json"))
    baseline = tmp_path / "full" / "fd_features.npz"
    assert base["paired"] is None and baseline.is_file()
    scored = fid.run_fid(**cli_args("fid", **common, samples=tmp_path / "s", output=tmp_path / "s" / "fd.json",
                                    baseline=baseline))
    paired = scored["paired"]
    assert paired["fid_diff"] == pytest.approx(scored["fid"] - base["fid"], rel=1e-6)
    assert paired["kid_diff_ci_low"] < paired["kid_diff"] < paired["kid_diff_ci_high"]
    assert paired["fid_diff_ci_low"] < paired["fid_diff"] < paired["fid_diff_ci_high"]
    assert (paired["n_paired"], paired["baseline"], paired["pairing"]["seed"]) == (8, str(baseline), 0)
    itself = fid.run_fid(**cli_args("fid", **common, samples=tmp_path / "full", output=tmp_path / "again.json",
                                    baseline=baseline))["paired"]
    assert (itself["fid_diff"], itself["fid_diff_ci_low"], itself["fid_diff_ci_high"]) == (0, 0, 0)
    write_paired_set(real, range(100, 108), tmp_path / "seed1", seed=1)
    with pytest.raises(DuodiffError, match=r"cannot be paired .* different noise and labels \(seed 1 vs 0\)"):
        fid.run_fid(**cli_args("fid", **common, samples=tmp_path / "seed1", output=tmp_path / "seed1" / "fd.json",
                               baseline=baseline))
    assert not (tmp_path / "seed1" / "fd.json").exists()


def test_score_checks_the_feature_net_before_inception_runs(trained, tmp_path, monkeypatch):
    folder, _ = trained
    reference = cifar10_reference(tmp_path / "ref")
    monkeypatch.setattr(inception, "feature_extractor", lambda *a, **k: pytest.fail("Inception must not load"))
    with pytest.raises(DuodiffError, match="was trained on dataset 'digits' but --reference .* has dataset 'cifar10'"):
        fid.run_score(**cli_args("score", samples=tmp_path / "s", reference=reference, output_dir=tmp_path / "m",
                                 feature_net=folder / "model.pt"))
    with pytest.raises(DuodiffError, match=r"^feature network .*none\.pt: no model\.pt and feature_net\.json there; "
                                           r"train it with `duodiff feature-net`$"):
        fid.run_score(**cli_args("score", samples=tmp_path / "s", reference=reference, output_dir=tmp_path / "m",
                                 feature_net=tmp_path / "none.pt"))
    assert not (tmp_path / "m").exists()
