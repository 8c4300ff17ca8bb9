"""CMMD (Jayasumana et al., "Rethinking FID: Towards a Better Evaluation Metric for Image
Generation", CVPR 2024; reference code google-research/cmmd).

CMMD is the maximum mean discrepancy between CLIP embeddings of real and generated images:
- embeddings: CLIP ViT-L/14 at 336x336 (OpenAI weights, here through open_clip as
  `ViT-L-14-336` / `openai`), L2-normalised. Images are read with PIL, made RGB (grayscale
  channels repeated, as the reference's io_util does), resized bicubic to 336 and center-cropped
  (open_clip's preprocessing; the reference center-crops then resizes, the same for the square
  images here) and normalised with CLIP's mean/std;
- kernel: Gaussian RBF k(x, y) = exp(-||x - y||^2 / (2 sigma^2)) with sigma = 10;
- estimator: the biased (V-statistic, minimum-variance) one of the reference's `mmd`, diagonals
  included: CMMD = 1000 * (mean K_xx + mean K_yy - 2 mean K_xy), the 1000 making it readable.
Unlike the reference's TPU batching, which drops the last incomplete batch, every image is used.

The CLIP weights (1.7 GB) cannot be fetched on an offline machine. Then `duodiff cmmd` writes
{"cmmd": null, "available": false, "reason": ...} and exits 0, so the pipeline records CMMD as
unavailable instead of failing; it decides that in seconds (cache lookup, then one short
connection attempt) instead of waiting through the Hugging Face client's retries.

The reference side is embedded once per dataset: `duodiff cmmd-reference` writes the real images'
embeddings to an .npz (or, when CLIP is unavailable, the reason), and `duodiff cmmd --reference
FILE.npz` embeds only the samples. With 50k reference images at 336x336 through ViT-L/14 that
saves one full embedding pass per sample set. `--reference DIR` (images embedded on the spot)
still works for a one-off comparison.
"""

from __future__ import annotations

import functools
import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch

from duodiff.core.distributed import default_device
from duodiff.core.errors import DuodiffError, check_int, check_positive, require
from duodiff.core.flags import add_flag
from duodiff.core.io import atomic_path, file_sha256, write_json
from duodiff.metrics.feature_cache import cached_features, remove_cache

CLIP_MODEL = "ViT-L-14-336"
CLIP_PRETRAINED = "openai"
# The reference implementation's _SIGMA and _SCALE.
SIGMA = 10.0
SCALE = 1000.0
# Embedding chunks are kept here, beside the output, until it is written (feature_cache.py).
CMMD_CACHE = ".cmmd-embeddings-cache"
REFERENCE_CACHE = ".cmmd-reference-cache"
# Seconds to wait for the Hugging Face Hub before calling CMMD unavailable.
HUB_TIMEOUT_S = 5.0


class EmbeddingUnavailable(Exception):
    """The CLIP model cannot be loaded here; the message is the one-line reason."""


# ---------------------------------------------------------------------------------------------
# The metric


def mmd(x_emb: torch.Tensor, y_emb: torch.Tensor, sigma: float = SIGMA, scale: float = SCALE) -> float:
    """scale * (mean K_xx + mean K_yy - 2 mean K_xy), Gaussian RBF kernel, float64, diagonals in."""
    x = torch.as_tensor(x_emb, dtype=torch.float64)
    y = torch.as_tensor(y_emb, dtype=torch.float64)
    # run_cmmd hands embeddings of one model (checked against the reference file's).
    assert x.ndim == 2 and y.ndim == 2 and x.shape[1] == y.shape[1], (tuple(x.shape), tuple(y.shape))
    gamma = 1.0 / (2.0 * sigma**2)

    def mean_kernel(a, b):
        # ||a - b||^2 = |a|^2 + |b|^2 - 2 a.b, as the reference computes it (no n x m x d tensor).
        sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
        return torch.exp(-gamma * sq).mean()

    return float(scale * (mean_kernel(x, x) + mean_kernel(y, y) - 2.0 * mean_kernel(x, y)))


# ---------------------------------------------------------------------------------------------
# The CLIP embedding model


def embedding_model_name(model_name: str = CLIP_MODEL, pretrained: str = CLIP_PRETRAINED) -> str:
    """How outputs name the embedding model (a reference's embeddings are reused only under it)."""
    return f"open_clip {model_name} ({pretrained})"


def cached_clip_weights(model_name: str = CLIP_MODEL, pretrained: str = CLIP_PRETRAINED) -> str | None:
    """Path of the open_clip weights for (model, tag) in the Hugging Face cache, or None."""
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    hub = cfg.get("hf_hub", "")
    if not hub:
        return None
    # open_clip's convention: "org/repo/file" names a file, "org/repo/" its default file names.
    repo_id, filename = os.path.split(hub)
    filenames = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    for name in filenames:
        path = try_to_load_from_cache(repo_id, name)
        if isinstance(path, str) and os.path.isfile(path):
            return path
    return None


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def offline_mode() -> bool:
    return any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


@functools.lru_cache(maxsize=None)
def clip_embedder(model_name: str = CLIP_MODEL, pretrained: str = CLIP_PRETRAINED, device: str = "cpu"):
    """-> (embed(paths, batch_size) -> (n, d) float tensor, L2-normalised; model description; the
    sha256 of its weights (weights_sha256)). Raises EmbeddingUnavailable with a one-line reason.
    Cached per process."""
    try:
        import open_clip
    except ImportError as error:
        raise EmbeddingUnavailable(f"open_clip is not installed ({error})") from None
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        raise EmbeddingUnavailable(f"open_clip knows no pretrained weights {pretrained!r} for {model_name}")
    path = cached_clip_weights(model_name, pretrained)
    try:
        if path is not None:
            # Load the cached file itself: asking by tag would first query the Hub (with retries
            # when offline). The tag's own settings (QuickGELU, mean/std, resize) come with it.
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name,
                pretrained=path,
                force_quick_gelu=bool(cfg.get("quick_gelu", False)),
                image_mean=cfg.get("mean"),
                image_std=cfg.get("std"),
                image_interpolation=cfg.get("interpolation"),
                image_resize_mode=cfg.get("resize_mode"),
                device=device,
            )
        else:
            where = f"Hugging Face cache ({cfg.get('hf_hub', '').rstrip('/')})"
            if offline_mode():
                raise EmbeddingUnavailable(f"CLIP {model_name}/{pretrained} weights are not in the {where} and HF_HUB_OFFLINE is set")
            if not hub_reachable():
                raise EmbeddingUnavailable(
                    f"CLIP {model_name}/{pretrained} weights are not in the {where} and the Hub is unreachable (offline?)"
                )
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
    except EmbeddingUnavailable:
        raise
    except Exception as error:  # download or load failure of any kind: CMMD is then unavailable
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise EmbeddingUnavailable(f"loading CLIP {model_name}/{pretrained} failed: {type(error).__name__}: {message}") from None
    model.eval()
    sha256 = weights_sha256(path, model)

    @torch.no_grad()
    def embed(paths, batch_size: int = 32) -> torch.Tensor:
        from PIL import Image
        from tqdm import tqdm

        out = []
        for start in tqdm(range(0, len(paths), batch_size), desc="CLIP embeddings", unit="batch"):
            batch = []
            for p in paths[start : start + batch_size]:
                with Image.open(p) as image:
                    batch.append(preprocess(image.convert("RGB")))
            emb = model.encode_image(torch.stack(batch).to(device)).float()
            out.append(torch.nn.functional.normalize(emb, dim=-1).cpu())
        return torch.cat(out)

    return embed, embedding_model_name(model_name, pretrained), sha256


def weights_sha256(path, model) -> str:
    """What identifies the CLIP weights, not their name: the sha256 of the file they were loaded
    from (core/io.file_sha256, cached per process), or, loaded by tag, of the state dict's tensors
    (names, dtypes, shapes and bytes in key order). Embedding chunks and reference files are keyed
    by it, so weights replaced under the same name never reuse another model's embeddings."""
    if path is not None:
        return file_sha256(path)
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# duodiff cmmd-reference and duodiff cmmd


def image_list(folder, max_count: int | None) -> list[Path]:
    """Sorted PNG/JPEG files of a folder, the first max_count of them (the reference's order)."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    return files[:max_count] if max_count else files


def check_flags(batch_size, max_count, chunk_size) -> None:
    check_positive("--batch-size", batch_size)
    if max_count is not None:
        check_int("--max-count", max_count, 1)
    check_positive("--chunk-size", chunk_size)


def folder_images(flag: str, folder: Path, max_count: int | None) -> list[Path]:
    require((folder / "images").is_dir(), f"{flag} {folder}: no images/ folder there")
    files = image_list(folder / "images", max_count)
    require(len(files) > 0, f"{flag} {folder}: no PNG/JPEG images in {folder / 'images'}")
    return files


def load_embedder(device: str):
    """-> (embed, model description, weights' sha256, None), or (None, None, None, reason) when
    CLIP cannot be loaded."""
    try:
        embed, description, sha256 = clip_embedder(CLIP_MODEL, CLIP_PRETRAINED, device)
    except EmbeddingUnavailable as error:
        print(f"duodiff: CMMD unavailable: {error}")
        return None, None, None, str(error)
    return embed, description, sha256, None


def embed_files(files, embed, model_key: str, cache, batch_size: int, chunk_size: int) -> np.ndarray:
    """(n, d) embeddings of image files, chunk by chunk through the cache (feature_cache.py),
    keyed by `model_key` (the weights' sha256 and the model's name) and the images' bytes: the
    chunks a killed job finished are not embedded again, another model's never reused."""
    compute = lambda chunk, label: embed(chunk, batch_size=batch_size).numpy()  # noqa: E731
    return cached_features(files, compute, cache, model_key, chunk_size, "CLIP embeddings")


def model_key(description: str, sha256: str) -> str:
    return f"{sha256} {description}"


def load_reference_embeddings(path) -> tuple[dict, np.ndarray]:
    """-> (info, embeddings (n, d)) of an .npz written by `duodiff cmmd-reference`."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            info, embeddings = json.loads(str(stored["info"])), stored["embeddings"]
    except (OSError, ValueError, KeyError) as error:
        raise DuodiffError(f"--reference {path}: not an embeddings file of `duodiff cmmd-reference` ({error})") from None
    if info.get("available"):
        require(
            embeddings.ndim == 2 and len(embeddings) == info.get("n_reference"),
            f"--reference {path}: holds {tuple(embeddings.shape)} embeddings for n_reference={info.get('n_reference')}; rebuild it",
        )
    return info, embeddings


def run_cmmd_reference(*, reference, output, batch_size: int, max_count: int | None, device: str | None,
                       chunk_size: int) -> dict:
    """CLIP embeddings of REFDIR/images, once per dataset -> FILE.npz (`embeddings`, and `info`:
    a JSON string with available, reason, n_reference, max_count, embedding_model).
    When CLIP is unavailable the file holds the reason and no embeddings, and the exit status is 0."""
    check_flags(batch_size, max_count, chunk_size)
    reference = Path(reference)
    files = folder_images("--reference", reference, max_count)
    device = device or default_device()

    info = {
        "available": False,
        "reason": None,
        "n_reference": len(files),
        "max_count": max_count,
        "embedding_model": embedding_model_name(),
        "embedding_model_sha256": None,
        "reference": str(reference),
    }
    embeddings = np.zeros((0, 0), dtype=np.float32)
    cache = Path(output).parent / REFERENCE_CACHE
    embed, description, sha256, reason = load_embedder(device)
    if embed is None:
        info["reason"] = reason
    else:
        embeddings = embed_files(files, embed, model_key(description, sha256), cache, batch_size, chunk_size)
        info.update(available=True, embedding_model=description, embedding_model_sha256=sha256)
    with atomic_path(output) as tmp, open(tmp, "wb") as f:
        np.savez(f, embeddings=embeddings, info=np.array(json.dumps(info)))
    remove_cache(cache)
    return info


def reference_side(reference: Path, max_count: int | None) -> tuple[dict | None, np.ndarray | None, list[Path]]:
    """-> (info, embeddings, []) of an .npz of `duodiff cmmd-reference` (checked against
    --max-count), or (None, None, image files) of a reference folder, embedded with the samples."""
    if reference.suffix != ".npz":
        return None, None, folder_images("--reference", reference, max_count)
    require(reference.is_file(), f"--reference {reference}: no such file; write it with `duodiff cmmd-reference`")
    ref_info, ref_embeddings = load_reference_embeddings(reference)
    require(
        ref_info.get("max_count") == max_count,
        f"--max-count {max_count} differs from the {ref_info.get('max_count')} that {reference} was embedded with",
    )
    return ref_info, ref_embeddings, []


def run_cmmd(*, samples, reference, output, batch_size: int, max_count: int | None, device: str | None,
             chunk_size: int) -> dict:
    """CMMD of DIR/images against the reference -> FILE.json (cmmd null + reason when CLIP is
    unavailable). reference: the .npz of `duodiff cmmd-reference`, or a folder REFDIR/images.
    The kernel is the reference implementation's (SIGMA, SCALE)."""
    check_flags(batch_size, max_count, chunk_size)
    samples, reference = Path(samples), Path(reference)
    x_files = folder_images("--samples", samples, max_count)
    ref_info, ref_embeddings, y_files = reference_side(reference, max_count)
    device = device or default_device()

    result = {
        "cmmd": None,
        "available": False,
        "reason": None,
        "n_samples": len(x_files),
        "n_reference": len(y_files) if ref_info is None else ref_info["n_reference"],
        "embedding_model": embedding_model_name(),
        "embedding_model_sha256": None,
        "sigma": SIGMA,
        "scale": SCALE,
        "estimator": "biased MMD^2 (V-statistic), as google-research/cmmd",
    }
    cache = Path(output).parent / CMMD_CACHE
    if ref_info is not None and not ref_info["available"]:
        # No CLIP attempt: the reference job already found it unavailable.
        result["reason"] = ref_info["reason"]
        print(f"duodiff cmmd: CMMD unavailable ({reference} says): {result['reason']}; "
              "rebuild it with `duodiff cmmd-reference` once CLIP can be loaded")  # fmt: skip
    else:
        embed, description, sha256, reason = load_embedder(device)
        if embed is None:
            result["reason"] = reason
        else:
            if ref_info is not None:
                require(
                    ref_info["embedding_model"] == description,
                    f"--reference {reference} was embedded with {ref_info['embedding_model']}, not {description}; rebuild it",
                )
                # Files written before the weights' sha256 was recorded are checked by name only.
                theirs = ref_info.get("embedding_model_sha256")
                require(
                    theirs is None or theirs == sha256,
                    f"--reference {reference} was embedded with other weights of {description} (sha256 {theirs[:12]}..., "
                    f"now {sha256[:12]}...); rebuild it",
                )
            key = model_key(description, sha256)
            x_embeddings = embed_files(x_files, embed, key, cache, batch_size, chunk_size)
            if ref_info is None:
                ref_embeddings = embed_files(y_files, embed, key, cache, batch_size, chunk_size)
            result.update(cmmd=mmd(torch.from_numpy(x_embeddings), torch.from_numpy(ref_embeddings)),
                          available=True, embedding_model=description, embedding_model_sha256=sha256)
    write_json(output, result)
    remove_cache(cache)
    return result


def add_embedding_flags(p) -> None:
    add_flag(p, "--batch-size", "--cmmd_batch_size", "--cmmd-batch-size", type=int, default=32)
    add_flag(p, "--max-count", "--cmmd_max_count", "--cmmd-max-count", type=int, default=None,
             help="use only the first N images (sorted) of each folder")  # fmt: skip
    add_flag(p, "--device", default=None, help="cpu or cuda (default: cuda when available)")
    add_flag(p, "--chunk-size", type=int, default=1000,
             help="images per kept embedding chunk: a killed job's rerun embeds only the unfinished chunks")


def add_cli(subparsers):
    p = subparsers.add_parser("cmmd-reference", help="CLIP embeddings of the reference images, once per dataset (for CMMD)")
    add_flag(p, "--reference", required=True, help="reference folder (REFDIR/images/*.png)")
    add_flag(p, "--output", required=True, help="FILE.npz")
    add_embedding_flags(p)
    p.set_defaults(func=lambda a: run_cmmd_reference(
        reference=a.reference, output=a.output, batch_size=a.batch_size, max_count=a.max_count,
        device=a.device, chunk_size=a.chunk_size,
    ))  # fmt: skip

    p = subparsers.add_parser("cmmd", help="CMMD (CLIP ViT-L/14@336, RBF MMD) of a sample folder against a reference")
    add_flag(p, "--samples", required=True, help="sample set folder (DIR/images/*.png)")
    add_flag(p, "--reference", required=True,
             help="FILE.npz of `duodiff cmmd-reference`, or a reference folder (REFDIR/images/*.png) embedded now")
    add_flag(p, "--output", required=True, help="FILE.json")
    add_embedding_flags(p)
    p.set_defaults(func=lambda a: run_cmmd(
        samples=a.samples, reference=a.reference, output=a.output, batch_size=a.batch_size,
        max_count=a.max_count, device=a.device, chunk_size=a.chunk_size,
    ))  # fmt: skip
