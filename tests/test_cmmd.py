"""CMMD: the RBF-kernel MMD against hand-computed values, and `duodiff cmmd-reference` / `duodiff
cmmd` with a fake embedder and on the CLIP-unavailable path (no CLIP weights can be downloaded in
tests)."""

import argparse
import hashlib
import json
import math

import numpy as np
import pytest
import torch
from _defaults import cli_args
from PIL import Image

from duodiff.core.errors import DuodiffError
from duodiff.metrics import cmmd


def test_mmd_hand_computed_sigma_10():
    # x = {(0,0), (3,4)}, y = {(0,0)}; sigma 10 -> gamma = 1/200, ||(3,4)||^2 = 25.
    e = math.exp(-25 / 200)
    k_xx = (1 + 1 + 2 * e) / 4
    k_yy = 1.0
    k_xy = (1 + e) / 2
    expected = 1000 * (k_xx + k_yy - 2 * k_xy)  # = 500 (1 - e)
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    y = torch.tensor([[0.0, 0.0]])
    assert cmmd.mmd(x, y) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(500 * (1 - e))


def test_mmd_hand_computed_other_sigma_and_scale():
    # (1,0) vs (0,1): distance^2 2; sigma 1 -> k_xy = exp(-1); diagonals are 1.
    x, y = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert cmmd.mmd(x, y, sigma=1.0, scale=1.0) == pytest.approx(2 - 2 * math.exp(-1), rel=1e-12)
    assert cmmd.mmd(x, y, sigma=1.0) == pytest.approx(1000 * (2 - 2 * math.exp(-1)), rel=1e-12)


def test_mmd_identical_zero_symmetric_and_grows_with_shift():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(20, 8, generator=g), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(15, 8, generator=g), dim=-1)
    assert cmmd.mmd(x, x) == pytest.approx(0.0, abs=1e-9)
    assert cmmd.mmd(x, y) == pytest.approx(cmmd.mmd(y, x), rel=1e-12)
    direction = torch.zeros(8)
    direction[0] = 1.0
    values = [cmmd.mmd(x, x + s * direction) for s in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert values[0] == pytest.approx(0.0, abs=1e-9)
    assert all(a < b for a, b in zip(values, values[1:]))


def write_pngs(folder, colors, mode="RGB"):
    folder.mkdir(parents=True, exist_ok=True)
    for i, color in enumerate(colors):
        Image.new(mode, (8, 8), color).save(folder / f"{i:06d}.png")


def fake_embedder(paths, batch_size=32):
    """Mean RGB of each image, L2-normalised (a stand-in for CLIP)."""
    rows = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float64).mean(axis=(0, 1)) for p in paths]
    return torch.nn.functional.normalize(torch.tensor(np.array(rows)), dim=-1)


def test_run_cmmd_with_fake_embedder(tmp_path, monkeypatch):
    write_pngs(tmp_path / "s" / "images", [(255, 0, 0), (250, 10, 0), (0, 255, 0)])
    write_pngs(tmp_path / "r" / "images", [(0, 0, 255), (0, 255, 0)])
    monkeypatch.setattr(cmmd, "clip_embedder", lambda *a, **k: (fake_embedder, "fake mean-RGB", "fake-sha256"))
    out = cmmd.run_cmmd(**cli_args("cmmd", samples=tmp_path / "s", reference=tmp_path / "r",
                                   output=tmp_path / "cmmd.json", batch_size=2))
    stored = json.loads((tmp_path / "cmmd.json").read_text())
    assert stored == json.loads(json.dumps(out))
    assert stored["available"] is True and stored["reason"] is None
    assert stored["n_samples"] == 3 and stored["embedding_model"] == "fake mean-RGB"

    # Independently: mean-RGB unit vectors, Gaussian kernel sigma 10, biased estimator x 1000.
    def unit(c):
        v = np.array(c, dtype=float)
        return v / np.linalg.norm(v)

    x = [unit(c) for c in [(255, 0, 0), (250, 10, 0), (0, 255, 0)]]
    y = [unit(c) for c in [(0, 0, 255), (0, 255, 0)]]

    def k(a, b):
        return math.exp(-np.sum((a - b) ** 2) / 200)

    def mean_k(a, b):
        return np.mean([[k(u, v) for v in b] for u in a])

    expected = 1000 * (mean_k(x, x) + mean_k(y, y) - 2 * mean_k(x, y))
    assert stored["cmmd"] == pytest.approx(expected, rel=1e-9)

    # --max-count: the first N (sorted) of each folder.
    out = cmmd.run_cmmd(**cli_args("cmmd", samples=tmp_path / "s", reference=tmp_path / "r",
                                   output=tmp_path / "cmmd2.json", max_count=1))
    assert out["n_samples"] == 1 and out["n_reference"] == 1
    assert out["cmmd"] == pytest.approx(1000 * (2 - 2 * k(x[0], y[0])), rel=1e-9)


def counting_embedder(calls):
    def embed(paths, batch_size=32):
        calls.append([p.name for p in paths])
        return fake_embedder(paths, batch_size)

    return embed


def test_reference_embedded_once_gives_the_same_cmmd_for_every_set(tmp_path, monkeypatch):
    sets = {"a": [(255, 0, 0), (250, 10, 0), (0, 255, 0)], "b": [(9, 9, 200), (0, 255, 0)]}
    for name, colours in sets.items():
        write_pngs(tmp_path / name / "images", colours)
    write_pngs(tmp_path / "ref" / "images", [(0, 0, 255), (0, 255, 0), (30, 30, 30)])
    calls = []
    monkeypatch.setattr(cmmd, "clip_embedder", lambda *a, **k: (counting_embedder(calls), "fake mean-RGB", "fake-sha256"))

    info = cmmd.run_cmmd_reference(**cli_args("cmmd-reference", reference=tmp_path / "ref",
                                              output=tmp_path / "ref" / "clip.npz", batch_size=2))
    assert info["available"] is True and info["n_reference"] == 3 and info["embedding_model"] == "fake mean-RGB"
    assert calls == [["000000.png", "000001.png", "000002.png"]]
    assert not (tmp_path / "ref" / cmmd.REFERENCE_CACHE).exists()
    with np.load(tmp_path / "ref" / "clip.npz") as stored:
        assert stored["embeddings"].shape == (3, 3)

    for name in sets:
        calls.clear()
        from_file = cmmd.run_cmmd(**cli_args("cmmd", samples=tmp_path / name, reference=tmp_path / "ref" / "clip.npz",
                                             output=tmp_path / f"{name}.json"))
        assert calls == [[f"{i:06d}.png" for i in range(len(sets[name]))]]  # only the samples
        from_folder = cmmd.run_cmmd(**cli_args("cmmd", samples=tmp_path / name, reference=tmp_path / "ref",
                                               output=tmp_path / f"{name}_folder.json"))
        assert from_file["available"] and from_file["n_reference"] == 3
        assert from_file["cmmd"] == pytest.approx(from_folder["cmmd"], rel=1e-6)  # float32 storage


def test_reference_embeddings_must_match_max_count_and_model(tmp_path, monkeypatch):
    write_pngs(tmp_path / "s" / "images", [(255, 0, 0), (0, 255, 0)])
    write_pngs(tmp_path / "ref" / "images", [(0, 0, 255), (0, 255, 0)])
    monkeypatch.setattr(cmmd, "clip_embedder", lambda *a, **k: (fake_embedder, "fake mean-RGB", "fake-sha256"))
    cmmd.run_cmmd_reference(**cli_args("cmmd-reference", reference=tmp_path / "ref", output=tmp_path / "clip.npz",
                                       max_count=1))
    with pytest.raises(DuodiffError, match=r"--max-count None differs from the 1 that .*clip.npz was embedded with"):
        cmmd.run_cmmd(**cli_args("cmmd", samples=tmp_path / "s", reference=tmp_path / "clip.npz",
                                 output=tmp_path / "o.json"))
    assert cmmd.run_cmmd(**cli_args("cmmd", samples=tmp_path / "s", reference=tmp_path / "clip.npz",
                                    output=tmp_path / "o.json", max_count=1))["n_reference"] == 1

    monkeypatch.setattr(cmmd, "clip_embedder", lambda *a, **k: (fake_embedder, "another model", "fake-sha256"))
    with pytest.raises(DuodiffError, match="was embedded with fake mean-RGB, not another model; rebuild it"):
        cmmd.run_cmmd(**cli_args("cmmd", samples=tmp_path / "s", reference=tmp_path / "clip.npz",
                                 output=tmp_path / "o2.json", max_count=1))
    assert not (tmp_path / "o2.json").exists()

    (tmp_path / "other.npz").write_bytes(b"not a numpy file")
    with pytest.raises(DuodiffError, match="not an embeddings file of `duodiff cmmd-reference`"):
        cmmd.run_cmmd(**cli_args("cmmd", samples=tmp_path / "s", reference=tmp_path / "other.npz",
                                 output=tmp_path / "o3.json"))
    with pytest.raises(DuodiffError, match="no such file; write it with `duodiff cmmd-reference`"):
        cmmd.run_cmmd(**cli_args("cmmd", samples=tmp_path / "s", reference=tmp_path / "missing.npz",
                                 output=tmp_path / "o3.json"))


def test_unavailable_reference_makes_every_set_unavailable_without_loading_clip(tmp_path, monkeypatch, no_cached_clip):
    write_pngs(tmp_path / "s" / "images", [(1, 2, 3)])
    write_pngs(tmp_path / "ref" / "images", [(4, 5, 6)])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    info = cmmd.run_cmmd_reference(**cli_args("cmmd-reference", reference=tmp_path / "ref",
                                              output=tmp_path / "clip.npz"))
    assert info["available"] is False and "HF_HUB_OFFLINE" in info["reason"]

    def must_not_load(*args, **kwargs):
        raise AssertionError("CLIP was loaded although the reference says it is unavailable")

    monkeypatch.setattr(cmmd, "load_embedder", must_not_load)
    out = cmmd.run_cmmd(**cli_args("cmmd", samples=tmp_path / "s", reference=tmp_path / "clip.npz",
                                   output=tmp_path / "cmmd.json"))
    assert out["cmmd"] is None and out["available"] is False and out["reason"] == info["reason"]
    assert json.loads((tmp_path / "cmmd.json").read_text())["reason"] == info["reason"]


def test_grayscale_images_are_embedded_as_rgb(tmp_path):
    write_pngs(tmp_path / "g", [100], mode="L")
    write_pngs(tmp_path / "c", [(100, 100, 100)])
    gray = cmmd.image_list(tmp_path / "g", None)
    rgb = cmmd.image_list(tmp_path / "c", None)
    assert torch.equal(fake_embedder(gray), fake_embedder(rgb))


@pytest.fixture
def no_cached_clip(monkeypatch):
    cmmd.clip_embedder.cache_clear()
    monkeypatch.setattr(cmmd, "cached_clip_weights", lambda *a, **k: None)
    yield
    cmmd.clip_embedder.cache_clear()


def test_unavailable_offline_writes_reason_and_exits_zero(tmp_path, monkeypatch, no_cached_clip):
    write_pngs(tmp_path / "s" / "images", [(1, 2, 3)])
    write_pngs(tmp_path / "r" / "images", [(4, 5, 6)])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser()
    cmmd.add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["cmmd", "--samples", str(tmp_path / "s"), "--reference", str(tmp_path / "r"),
         "--output", str(tmp_path / "cmmd.json"), "--cmmd_batch_size", "4", "--cmmd_max_count", "7"]
    )  # fmt: skip
    assert (args.batch_size, args.max_count) == (4, 7)
    args.func(args)  # returns normally: the CLI then exits 0
    stored = json.loads((tmp_path / "cmmd.json").read_text())
    assert stored["cmmd"] is None and stored["available"] is False
    assert "HF_HUB_OFFLINE" in stored["reason"] and "\n" not in stored["reason"]
    assert stored["n_samples"] == 1 and stored["embedding_model"].startswith("open_clip ViT-L-14-336")


def test_unavailable_when_hub_unreachable(tmp_path, monkeypatch, no_cached_clip):
    write_pngs(tmp_path / "s" / "images", [(1, 2, 3)])
    write_pngs(tmp_path / "r" / "images", [(4, 5, 6)])
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(cmmd, "hub_reachable", lambda *a, **k: False)
    out = cmmd.run_cmmd(**cli_args("cmmd", samples=tmp_path / "s", reference=tmp_path / "r",
                                   output=tmp_path / "cmmd.json"))
    assert out["available"] is False and "unreachable" in out["reason"]


def test_hub_reachable_false_for_a_closed_port(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port, not listening
    assert cmmd.hub_reachable(timeout=1.0) is False


def test_unavailable_when_loading_fails(tmp_path, monkeypatch):
    cmmd.clip_embedder.cache_clear()
    # A cache entry that is not a weights file: open_clip refuses it, CMMD becomes unavailable.
    monkeypatch.setattr(cmmd, "cached_clip_weights", lambda *a, **k: str(tmp_path / "missing.safetensors"))
    with pytest.raises(cmmd.EmbeddingUnavailable, match="loading CLIP"):
        cmmd.clip_embedder(cmmd.CLIP_MODEL, cmmd.CLIP_PRETRAINED, "cpu")
    cmmd.clip_embedder.cache_clear()


def test_bad_input(tmp_path):
    write_pngs(tmp_path / "s" / "images", [(1, 2, 3)])
    with pytest.raises(DuodiffError, match="--batch-size"):
        cmmd.run_cmmd(**cli_args("cmmd", samples=tmp_path / "s", reference=tmp_path / "s", output=tmp_path / "o.json",
                                 batch_size=0))
    with pytest.raises(DuodiffError, match="--reference"):
        cmmd.run_cmmd(**cli_args("cmmd", samples=tmp_path / "s", reference=tmp_path / "nowhere",
                                 output=tmp_path / "o.json"))
    with pytest.raises(DuodiffError, match="--max-count"):
        cmmd.run_cmmd(**cli_args("cmmd", samples=tmp_path / "s", reference=tmp_path / "s", output=tmp_path / "o.json",
                                 max_count=-3))
    assert not (tmp_path / "o.json").exists()


def test_a_killed_cmmd_job_resumes_from_its_finished_chunks(tmp_path, monkeypatch):
    colours = [(255, 0, 0), (250, 10, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9)]
    write_pngs(tmp_path / "s" / "images", colours)
    write_pngs(tmp_path / "r" / "images", colours[::-1][:4])
    calls, die_after = [], [None]

    def recording_embedder(paths, batch_size=32):
        if len(calls) == die_after[0]:
            raise KeyboardInterrupt  # as SIGTERM in the middle of the job
        calls.append([p.name for p in paths])
        return fake_embedder(paths, batch_size)

    monkeypatch.setattr(cmmd, "clip_embedder", lambda *a, **k: (recording_embedder, "fake mean-RGB", "fake-sha256"))
    whole = cmmd.run_cmmd(**cli_args("cmmd", samples=tmp_path / "s", reference=tmp_path / "r",
                                     output=tmp_path / "whole.json", chunk_size=2))
    assert len(calls) == 3 + 2  # samples in chunks of 2, 2, 1; reference in 2, 2

    calls.clear()
    die_after[0] = 3
    output = tmp_path / "metrics" / "cmmd.json"
    with pytest.raises(KeyboardInterrupt):
        cmmd.run_cmmd(**cli_args("cmmd", samples=tmp_path / "s", reference=tmp_path / "r", output=output, chunk_size=2))
    assert not output.exists() and len(list((tmp_path / "metrics" / cmmd.CMMD_CACHE).glob("*.npy"))) == 3
    calls.clear()
    die_after[0] = None
    resumed = cmmd.run_cmmd(**cli_args("cmmd", samples=tmp_path / "s", reference=tmp_path / "r", output=output,
                                       chunk_size=2))
    names = [p.name for p in sorted((tmp_path / "r" / "images").iterdir())]
    assert calls == [names[0:2], names[2:4]]  # the sample chunks were kept; only the reference is left
    assert resumed["cmmd"] == whole["cmmd"]
    assert not (tmp_path / "metrics" / cmmd.CMMD_CACHE).exists()


# ---- the open_clip loading and embedding path, with a tiny stand-in for ViT-L/14@336 -------------

TINY_CLIP = "duodiff-test-tiny-clip-336"


@pytest.fixture
def tiny_clip(tmp_path, monkeypatch):
    """A 2-layer CLIP of open_clip's own ViT kind at 336x336, its random weights saved as the
    'cached' weights file, and the real ViT-L-14-336/openai settings (QuickGELU, mean/std,
    bicubic shortest-side resize): clip_embedder then runs exactly its cached-weights path."""
    import open_clip

    config = {"embed_dim": 16,  # no quick_gelu here: as for ViT-L-14-336, the openai tag brings it
              "vision_cfg": {"image_size": 336, "layers": 2, "width": 32, "head_width": 16, "patch_size": 112},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}  # fmt: skip
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / f"{TINY_CLIP}.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "configs")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP, force_quick_gelu=True).eval()
    weights = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), weights)

    openai_cfg = open_clip.get_pretrained_cfg(cmmd.CLIP_MODEL, cmmd.CLIP_PRETRAINED)
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda name, tag: dict(openai_cfg))
    monkeypatch.setattr(cmmd, "cached_clip_weights", lambda *a, **k: str(weights))
    cmmd.clip_embedder.cache_clear()
    yield model, openai_cfg
    cmmd.clip_embedder.cache_clear()


def test_clip_embeddings_follow_clips_own_preprocessing(tmp_path, tiny_clip):
    import torchvision.transforms.functional as TF

    model, cfg = tiny_clip
    write_pngs(tmp_path / "rgb", [(255, 0, 0), (10, 200, 30), (0, 0, 0)])
    rng = np.random.default_rng(0)
    (tmp_path / "gray").mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L").save(tmp_path / "gray" / f"{i:06d}.png")
    files = cmmd.image_list(tmp_path / "rgb", None) + cmmd.image_list(tmp_path / "gray", None)

    embed, description, sha256 = cmmd.clip_embedder(TINY_CLIP, cmmd.CLIP_PRETRAINED, "cpu")
    assert description == f"open_clip {TINY_CLIP} ({cmmd.CLIP_PRETRAINED})"
    assert sha256 == hashlib.sha256((tmp_path / "open_clip_pytorch_model.bin").read_bytes()).hexdigest()
    got = embed(files, batch_size=4)  # batches of 4 and 2
    assert got.shape == (6, 16) and torch.allclose(got.norm(dim=1), torch.ones(6), atol=1e-6)
    assert torch.allclose(embed(files, batch_size=6), got, atol=1e-6)

    # By hand, as CLIP's reference preprocessing: RGB, bicubic resize of the shorter side to 336,
    # centre crop, [0, 1], OpenAI mean/std; the saved weights; L2 normalisation.
    def by_hand(path):
        image = Image.open(path).convert("RGB").resize((336, 336), Image.BICUBIC)
        x = TF.normalize(TF.to_tensor(image), cfg["mean"], cfg["std"])
        with torch.no_grad():
            return torch.nn.functional.normalize(model.encode_image(x[None]), dim=-1)[0]

    expected = torch.stack([by_hand(p) for p in files])
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_clip_chunks_and_references_are_keyed_by_the_weights_not_the_name(tmp_path, tiny_clip, monkeypatch):
    """Two random inits of the same tiny CLIP under one name (weights replaced at the same path):
    the chunks a killed job of the first left are not reused by the second, and a reference file
    embedded by the first is refused by the second."""
    import open_clip

    monkeypatch.setattr(cmmd, "CLIP_MODEL", TINY_CLIP)  # run_cmmd's model: the tiny one, by its name
    write_pngs(tmp_path / "s" / "images", [(255, 0, 0), (10, 200, 30), (0, 0, 90), (7, 7, 7)])
    write_pngs(tmp_path / "r" / "images", [(0, 0, 255), (0, 255, 0), (30, 30, 30)])
    args = dict(samples=tmp_path / "s", reference=tmp_path / "r", chunk_size=2)
    cmmd.run_cmmd_reference(**cli_args("cmmd-reference", reference=tmp_path / "r", output=tmp_path / "ref.npz"))
    # What a killed job of the first weights leaves: its sample chunks, beside the output.
    embed, description, first = cmmd.clip_embedder(TINY_CLIP, cmmd.CLIP_PRETRAINED, "cpu")
    cache = tmp_path / "metrics" / cmmd.CMMD_CACHE
    old = cmmd.embed_files(cmmd.image_list(tmp_path / "s" / "images", None), embed, cmmd.model_key(description, first),
                           cache, 4, 2)  # fmt: skip
    assert len(list(cache.glob("*.npy"))) == 2

    torch.manual_seed(1)  # the same name and class, other weights, at the same path
    torch.save(open_clip.create_model(TINY_CLIP, force_quick_gelu=True).state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    cmmd.clip_embedder.cache_clear()
    resumed = cmmd.run_cmmd(**cli_args("cmmd", **args, output=tmp_path / "metrics" / "cmmd.json"))
    fresh = cmmd.run_cmmd(**cli_args("cmmd", **args, output=tmp_path / "fresh" / "cmmd.json"))
    assert resumed["embedding_model_sha256"] == fresh["embedding_model_sha256"] != first
    assert resumed["cmmd"] == fresh["cmmd"]
    new, _, _ = cmmd.clip_embedder(TINY_CLIP, cmmd.CLIP_PRETRAINED, "cpu")
    assert not np.allclose(new(cmmd.image_list(tmp_path / "s" / "images", None)).numpy(), old)
    with pytest.raises(DuodiffError, match=rf"--reference {tmp_path / 'ref.npz'} was embedded with other weights of .*rebuild it"):
        cmmd.run_cmmd(**cli_args("cmmd", samples=tmp_path / "s", reference=tmp_path / "ref.npz",
                                 output=tmp_path / "o.json"))  # fmt: skip
