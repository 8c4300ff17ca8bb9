"""The two FID protocols (clean-fid's "clean" and pytorch-fid's "legacy_pytorch") and references
made from published statistics (mu, sigma) instead of images.

pytorch-fid's FID Inception weights cannot be downloaded here, so the legacy path runs clean-fid's
own InceptionV3 class with random weights, saved to a file as the real ones would be.
"""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from _defaults import cli_args
from PIL import Image
from test_fid import FakeData, fake_network, independent_fid, make_samples  # noqa: F401 (fixture)

import duodiff.core.data
from duodiff.core.errors import DuodiffError
from duodiff.metrics import distances, fid, inception, reference


@pytest.fixture(scope="session")
def random_legacy_weights(tmp_path_factory):
    """clean-fid's pytorch-fid InceptionV3 (fid_inception_v3) with random weights -> a .pth file."""
    from cleanfid import inception_pytorch

    built = []
    patches = [(inception_pytorch, "load_state_dict_from_url", lambda url, **kw: None),
               (torchvision.models.Inception3, "load_state_dict", lambda self, state: built.append(self))]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, value in patches:
        setattr(owner, name, value)
    try:
        torch.manual_seed(0)
        inception_pytorch.fid_inception_v3()
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
    path = tmp_path_factory.mktemp("weights") / inception.LEGACY_WEIGHTS_FILE
    torch.save(built[0].state_dict(), path)
    inception.legacy_feature_extractor.cache_clear()
    yield path
    inception.legacy_feature_extractor.cache_clear()


def close(a, b) -> bool:
    """Equal up to float32 rounding, relative to the largest feature (random weights give tiny ones)."""
    scale = np.abs(b).max()
    return scale > 0 and np.abs(a - b).max() <= 1e-4 * scale


def test_legacy_weights_file_is_the_one_cleanfid_fetches():
    from cleanfid.inception_pytorch import FID_WEIGHTS_URL

    assert FID_WEIGHTS_URL.rsplit("/", 1)[1] == inception.LEGACY_WEIGHTS_FILE
    # torch.hub's load_state_dict_from_url keeps it there (what pytorch-fid and clean-fid read when online).
    assert inception.legacy_weights_path() == Path(torch.hub.get_dir()) / "checkpoints" / inception.LEGACY_WEIGHTS_FILE


def test_legacy_mode_uses_pytorch_fids_network_and_bilinear_resize(tmp_path, monkeypatch, random_legacy_weights):
    monkeypatch.setattr(duodiff.core.data, "load_dataset", lambda name, **kw: FakeData(3, seed=11))
    meta = reference.run_reference(**cli_args("reference", dataset="cifar10", n_reference=3, output_folder=tmp_path / "ref",
                                              device="cpu", mode="legacy_pytorch", legacy_weights=random_legacy_weights))
    assert meta["mode"] == "legacy_pytorch" and meta["feature_network_key"] == "pytorch-fid"
    assert json.loads((tmp_path / "ref" / "reference.json").read_text())["mode"] == "legacy_pytorch"
    with np.load(tmp_path / "ref" / "features.npz") as npz:
        ours = npz["features"]
    files = sorted((tmp_path / "ref" / "images").glob("*.png"))

    # Independently: PIL -> RGB -> torch bilinear to 299 (align_corners=False) -> [0, 1] -> the same network.
    from cleanfid.inception_pytorch import InceptionV3

    monkeypatch.setattr("cleanfid.inception_pytorch.load_state_dict_from_url",
                        lambda url, **kw: torch.load(random_legacy_weights, map_location="cpu"))
    net = InceptionV3(output_blocks=[3], resize_input=False).eval()
    batch = torch.stack([torch.tensor(np.array(Image.open(f).convert("RGB")), dtype=torch.float32).permute(2, 0, 1)
                         for f in files])
    resized = torch.nn.functional.interpolate(batch, size=(299, 299), mode="bilinear", align_corners=False).clamp(0, 255)
    with torch.no_grad():
        expected = net(resized / 255)[0].flatten(1).numpy()
    assert close(ours, expected)

    # clean-fid's own legacy_pytorch loader on the same network gives the same features; its clean
    # resizer (PIL bicubic) gives others, so the resize that ran is the legacy one.
    from cleanfid.fid import get_files_features

    fn, _ = inception.legacy_feature_extractor(str(random_legacy_weights), "cpu")
    for mode, same in (("legacy_pytorch", True), ("clean", False)):
        theirs = get_files_features([str(f) for f in files], model=fn, num_workers=0, batch_size=2,
                                    device=torch.device("cpu"), mode=mode, verbose=False)
        assert close(ours, theirs) == same

    make_samples(tmp_path / "s", 3, seed=12)
    out = fid.run_fid(**cli_args("fid", samples=tmp_path / "s", reference=tmp_path / "ref", output=tmp_path / "fid.json",
                                 device="cpu", mode="legacy_pytorch", legacy_weights=random_legacy_weights))
    assert out["mode"] == "legacy_pytorch" and json.loads((tmp_path / "fid.json").read_text())["mode"] == "legacy_pytorch"
    assert out["feature_network_key"] == "pytorch-fid"

    with pytest.raises(DuodiffError, match="--mode clean but --reference .* was made with mode legacy_pytorch"):
        fid.run_fid(**cli_args("fid", samples=tmp_path / "s", reference=tmp_path / "ref", output=tmp_path / "x.json",
                               device="cpu"))


def test_missing_legacy_weights_are_named_before_any_work(tmp_path, monkeypatch):
    def no_dataset(*args, **kwargs):
        raise AssertionError("the dataset was read before the weights were checked")

    monkeypatch.setattr(duodiff.core.data, "load_dataset", no_dataset)
    missing = tmp_path / "nowhere" / inception.LEGACY_WEIGHTS_FILE
    with pytest.raises(DuodiffError, match=f"{inception.LEGACY_WEIGHTS_FILE}, not found at {missing}.*metrics.fid.legacy_weights"):
        reference.run_reference(**cli_args("reference", dataset="cifar10", n_reference=3, output_folder=tmp_path / "ref",
                                           device="cpu", mode="legacy_pytorch", legacy_weights=missing))
    assert not (tmp_path / "ref").exists()
    with pytest.raises(DuodiffError, match="--mode must be one of clean, legacy_pytorch; got 'legacy'"):
        reference.run_reference(**cli_args("reference", dataset="cifar10", n_reference=3, output_folder=tmp_path / "ref",
                                           mode="legacy"))


def write_stats(path, mu, sigma, **extra):
    np.savez(path, mu=mu, sigma=sigma, **extra)
    return path


def test_statistics_reference_gives_the_images_references_fid_and_no_kid(tmp_path, monkeypatch, fake_network):
    # The fake network's features are 6-d: statistics of that size stand in for Inception's 2048.
    monkeypatch.setattr(reference, "FEATURE_DIM", 6)
    monkeypatch.setattr(duodiff.core.data, "load_dataset", lambda name, **kw: FakeData(8, seed=1))
    reference.run_reference(**cli_args("reference", dataset="cifar10", n_reference=8, output_folder=tmp_path / "images",
                                       device="cpu"))
    ref_features = np.concatenate(fake_network)
    mu, sigma = ref_features.mean(0), np.cov(ref_features, rowvar=False)
    stats = write_stats(tmp_path / "fid_stats.npz", mu.astype(np.float32), sigma.astype(np.float32))
    meta = reference.run_reference(**cli_args("reference", dataset="cifar10", n_reference=8, statistics=stats,
                                              image_size=8, output_folder=tmp_path / "stats"))
    assert (meta["source"], meta["mode"], meta["n"], meta["image_size"], meta["channels"]) == ("statistics", "clean", None, 8, 3)
    assert not (tmp_path / "stats" / "images").exists()
    with np.load(tmp_path / "stats" / "features.npz") as npz:
        assert "features" not in npz.files and np.allclose(npz["mu"], mu, rtol=1e-6)

    make_samples(tmp_path / "s", 8, seed=2)
    monkeypatch.setattr(duodiff.core.data, "load_dataset", lambda name, **kw: FakeData(8, seed=2))  # no dataset for the samples
    fake_network.clear()
    from_images = fid.run_fid(**cli_args("fid", samples=tmp_path / "s", reference=tmp_path / "images",
                                         output=tmp_path / "a.json", device="cpu"))
    features = np.concatenate(fake_network)
    from_stats = fid.run_fid(**cli_args("fid", samples=tmp_path / "s", reference=tmp_path / "stats",
                                        output=tmp_path / "b.json", device="cpu"))
    sigma32 = sigma.astype(np.float32).astype(np.float64)
    closed = distances.frechet_distance(features, mu.astype(np.float32).astype(np.float64), sigma32,
                                        distances.psd_sqrt(sigma32))
    assert from_stats["fid"] == pytest.approx(closed, rel=1e-9)
    assert from_stats["fid"] == pytest.approx(from_images["fid"], rel=1e-5)
    assert from_stats["fid"] == pytest.approx(independent_fid(features, ref_features), rel=1e-5)
    assert from_stats["fid_ci_low"] < from_stats["fid"] < from_stats["fid_ci_high"]
    stored = json.loads((tmp_path / "b.json").read_text())
    assert stored["kid"] is None and stored["kid_std"] is None and stored["n_reference"] is None
    assert stored["reference_source"] == "statistics" and stored["mode"] == "clean"
    assert any("no KID against it" in note for note in stored["notes"])

    with pytest.raises(DuodiffError, match="needs the reference's images"):
        fid.run_fid(**cli_args("fid", samples=tmp_path / "s", reference=tmp_path / "stats", output=tmp_path / "c.json",
                               feature_net=tmp_path / "model.pt"))


@pytest.mark.parametrize("contents, message", [
    (dict(mu=np.zeros(6)), "no sigma in it"),
    (dict(mean=np.zeros(6), cov=np.eye(6)), "no mu or sigma in it"),
    (dict(mu=np.zeros(5), sigma=np.eye(6)), r"mu has shape \(5,\) and sigma \(6, 6\)"),
    (dict(mu=np.zeros(6), sigma=np.triu(np.ones((6, 6)))), "sigma is not symmetric"),
    (dict(mu=np.full(6, np.nan), sigma=np.eye(6)), "mu or sigma has NaN or inf"),
])
def test_bad_statistics_files_are_refused_with_one_message(tmp_path, monkeypatch, fake_network, contents, message):
    monkeypatch.setattr(reference, "FEATURE_DIM", 6)
    path = tmp_path / "stats.npz"
    np.savez(path, **contents)
    with pytest.raises(DuodiffError, match=f"--statistics {path}: {message}"):
        reference.run_reference(**cli_args("reference", dataset="cifar10", n_reference=8, statistics=path,
                                           output_folder=tmp_path / "ref"))
    assert not (tmp_path / "ref").exists()


def test_unreadable_statistics_file_is_refused(tmp_path):
    path = tmp_path / "stats.npz"
    path.write_text("not an npz")
    with pytest.raises(DuodiffError, match="not a readable npz"):
        reference.read_statistics(path)
    with pytest.raises(DuodiffError, match="no such file"):
        reference.read_statistics(tmp_path / "missing.npz")


def rewrite_fid_json(root, names, **changes):
    for name in names:
        path = root / "metrics" / name / "fid.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_tables_name_the_mode_and_leave_out_kid_against_statistics(tmp_path):
    from test_tables import ORDER, markdown_rows, tables, write_study

    write_study(tmp_path)
    rewrite_fid_json(tmp_path, ORDER, mode="legacy_pytorch", reference_source="statistics", kid=None, kid_std=None,
                     kid_ci_low=None, kid_ci_high=None, n_reference=None, notes=[fid.STATISTICS_NOTE])
    tables(tmp_path)
    out = tmp_path / "tables"
    page = (out / "summary.md").read_text()
    header, rows = markdown_rows(page)
    assert "KID×10³ ↓" not in header and "nan" not in page
    assert "FID (Inception; no KID): clean-fid, mode legacy_pytorch (pytorch-fid's" in page
    assert "FID caveat (all sets): reference from published statistics (mu, sigma) without its features: no KID" in page
    frame = pd.read_csv(out / "fid.csv")
    assert (frame["fid_mode"] == "legacy_pytorch").all() and (frame["reference_source"] == "statistics").all()
    assert pd.read_csv(out / "kid.csv")["kid"].isna().all()
    for name in ("summary.tex", "summary.html"):
        assert "nan" not in (out / name).read_text().lower().replace("nanmean", ""), name


def test_tables_refuse_mixed_modes_with_one_message(tmp_path):
    from test_tables import ORDER, tables, write_study

    write_study(tmp_path)
    rewrite_fid_json(tmp_path, ORDER[:2], mode="legacy_pytorch")
    with pytest.raises(DuodiffError, match=r"FID modes are mixed, so the scores cannot share a table: mode legacy_pytorch: "
                                           r"full, shallow_d3; mode clean: ee_attention_probe_thr0.05, "):
        tables(tmp_path)
    assert not (tmp_path / "tables").exists()


def test_tables_refuse_a_real_set_made_for_another_mode(tmp_path):
    import shutil

    from test_tables import ORDER, tables, write_study

    write_study(tmp_path)
    shutil.copytree(tmp_path / "metrics" / "full", tmp_path / "metrics" / "real")
    (tmp_path / "samples" / "real").mkdir()
    (tmp_path / "samples" / "real" / "stats.json").write_text(json.dumps(
        {"method": "real", "n_samples": 5, "notes": [], "mode": "legacy_pytorch"}))
    with pytest.raises(DuodiffError, match="real-data set was made for FID mode legacy_pytorch but scored against a "
                                           "mode clean reference"):
        tables(tmp_path, ["real"] + ORDER)


def workflow_run(tmp_path, edit, *args):
    """snakemake on the tiny config with `edit` applied (test_workflow's helpers)."""
    import yaml
    from test_workflow import TINY, load, make_workdir, modified, snakemake

    workdir = make_workdir(tmp_path)
    path = workdir / "protocol.yaml"
    path.write_text(yaml.safe_dump(modified(load(TINY), edit)))
    return workdir, snakemake(workdir, "--configfile", path, *args)


def uvit_protocol(cfg, stats):
    cfg["reference"]["statistics"] = str(stats)
    cfg["metrics"].update(headline="inception", cmmd={"enabled": False})
    cfg["metrics"]["fid"].update(mode="legacy_pytorch", legacy_weights="weights/pt_inception.pth")


def test_workflow_passes_the_statistics_file_and_mode_to_every_fid_command(tmp_path):
    from test_workflow import planned_commands

    stats = write_stats(tmp_path / "fid_stats.npz", np.zeros(2048), np.eye(2048))
    _, result = workflow_run(tmp_path, lambda c: uvit_protocol(c, stats), "-n", "-p")
    assert result.returncode == 0, result.stderr
    commands = planned_commands(result.stdout)
    (reference_flags,) = [flags for command, flags in commands if command == "reference"]
    assert reference_flags["--statistics"] == str(stats) and reference_flags["--mode"] == "legacy_pytorch"
    assert reference_flags["--legacy-weights"] == "weights/pt_inception.pth"
    fids = [flags for command, flags in commands if command == "score"]
    assert fids and all(f["--mode"] == "legacy_pytorch" and f["--legacy-weights"] == "weights/pt_inception.pth"
                        and "--feature-net" not in f for f in fids)
    (real_flags,) = [flags for command, flags in commands if command == "real-set"]
    assert real_flags["--mode"] == "legacy_pytorch"
    assert not [command for command, _ in commands if command in ("cmmd-reference", "feature-net")]


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["metrics"].update(cmmd={"enabled": False}),  # the tiny config's headline: classifier
     "holds only mu and sigma, but metrics.headline classifier scores the reference's images"),
    (lambda c: c["metrics"].update(headline="inception"),  # CMMD on
     "holds no images, which CMMD's reference embeds: set metrics.cmmd.enabled: false"),
    (lambda c: c["metrics"]["fid"].update(mode="legacy"), "metrics.fid.mode: 'legacy' is not one of ['clean', 'legacy_pytorch']"),
])
def test_workflow_refuses_a_statistics_reference_it_cannot_use(tmp_path, edit, message):
    stats = write_stats(tmp_path / "fid_stats.npz", np.zeros(2048), np.eye(2048))

    def both(c):
        c["reference"]["statistics"] = str(stats)
        edit(c)

    workdir, result = workflow_run(tmp_path, both, "--cores", "1")
    assert result.returncode != 0 and message in result.stderr
    assert not (workdir / "results").exists()


def test_workflow_gives_the_inception_reference_budget_to_the_reference_job_only(tmp_path):
    from test_workflow import planned_commands

    _, result = workflow_run(tmp_path, lambda c: c["metrics"]["fid"].update(max_reference=4), "-n", "-p")
    assert result.returncode == 0, result.stderr
    commands = planned_commands(result.stdout)
    (reference_flags,) = [flags for command, flags in commands if command == "reference"]
    assert reference_flags["--max-reference"] == "4" and reference_flags["--n-reference"] == "16"
    fids = [flags for command, flags in commands if command == "score"]
    assert fids and not [f for f in fids if "--max-reference" in f]


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["metrics"]["fid"].update(max_reference=17),
     "invalid config: metrics.fid.max_reference 17 is more than reference.n_reference 16, the reference's images"),
    (lambda c: (c["metrics"]["fid"].update(max_reference=4), uvit_protocol(c, "stats.npz")),
     "invalid config: metrics.fid.max_reference 4 limits the reference images Inception sees, but "
     "reference.statistics stats.npz has no images: set metrics.fid.max_reference: null"),
    (lambda c: c["metrics"]["fid"].update(max_reference=1), "metrics.fid.max_reference: 1 is less than the minimum of 2"),
])
def test_workflow_refuses_an_inception_reference_budget_it_cannot_keep(tmp_path, edit, message):
    workdir, result = workflow_run(tmp_path, edit, "--cores", "1")
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert not (workdir / "results").exists()


def test_fid_in_legacy_mode_without_weights_stops_before_reading_images(tmp_path, monkeypatch, fake_network):
    monkeypatch.setattr(duodiff.core.data, "load_dataset", lambda name, **kw: FakeData(3, seed=5))
    reference.run_reference(**cli_args("reference", dataset="cifar10", n_reference=3, output_folder=tmp_path / "ref"))
    meta = json.loads((tmp_path / "ref" / "reference.json").read_text())
    (tmp_path / "ref" / "reference.json").write_text(json.dumps({**meta, "mode": "legacy_pytorch"}))
    make_samples(tmp_path / "s", 3, seed=6)

    def no_images(*args, **kwargs):
        raise AssertionError("an image was read before the weights were checked")

    monkeypatch.setattr(fid, "check_samples_fit_reference", no_images)
    monkeypatch.setattr(inception, "image_features", no_images)
    with pytest.raises(DuodiffError, match=f"{inception.LEGACY_WEIGHTS_FILE}, not found at {tmp_path / 'none.pth'}"):
        fid.run_fid(**cli_args("fid", samples=tmp_path / "s", reference=tmp_path / "ref", output=tmp_path / "fid.json",
                               mode="legacy_pytorch", legacy_weights=tmp_path / "none.pth"))
    assert not (tmp_path / "fid.json").exists()


def test_tables_say_how_the_reference_was_drawn(tmp_path):
    # fid.json carries reference.json's selection; the samples note names it (issue 24: a reference
    # of a few classes must not pass unsaid).
    from test_tables import ORDER, tables, write_study

    write_study(tmp_path)
    drawn = "all 100 training images (the whole training set, split seed 0), unflipped"
    rewrite_fid_json(tmp_path, ORDER, reference_selection=drawn)
    tables(tmp_path)
    assert f"against 70 real images ({drawn})" in (tmp_path / "tables" / "summary.md").read_text()
