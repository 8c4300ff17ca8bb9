"""Latent diffusion (Rombach et al. 2022), as U-ViT's ImageNet 256 models: the networks work in the
4 x 32 x 32 latent space of Stable Diffusion's KL-f8 autoencoder, loaded through diffusers'
`AutoencoderKL`.

    z = scale_factor * E(x)        (encode, once per dataset: `duodiff encode`)
    x = D(z / scale_factor)        (decode, once per sample before it is saved)

scale_factor makes the latents' spread about 1 (U-ViT's ImageNet models: 0.18215 with its autoencoder_kl.pth, libs/autoencoder.py;
Stable Diffusion: 0.18215); it is a config value.

The autoencoder comes from a local diffusers folder (config.json + weights) or from one
checkpoint file: diffusers' own key names, or the LDM format of U-ViT's autoencoder_kl.pth and of
Stable Diffusion's checkpoints (keys encoder.down.0.block.0..., optionally under
first_stage_model.), which needs the architecture as a diffusers config file
(config/autoencoders/sd-kl-f8.json). Nothing is downloaded.

Departure from U-ViT, with its reason: U-ViT stores the encoder's moments and draws a new latent
from the posterior at every training step; `duodiff encode` stores the posterior mean. The
KL-f8 posterior's standard deviation is about 1% of the latents' spread, and a stored latent keeps
the training data a function of (seed, step) alone, which resumed runs rely on. Horizontal flips,
U-ViT's augmentation, cannot be applied to latents: like U-ViT's feature extraction, `encode`
stores the latents of the flipped images beside the others.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from duodiff.core.errors import DuodiffError, require
from duodiff.core.fingerprint import RESTART_HELP, check_state, remove_files
from duodiff.core.fingerprint import fingerprint as state_fingerprint
from duodiff.core.flags import add_flag
from duodiff.core.io import atomic_path, file_sha256

LDM_PREFIX = "first_stage_model."  # a whole LDM / Stable Diffusion checkpoint keeps the VAE here


def load_autoencoder(path, config_path=None):
    """diffusers' AutoencoderKL from a local folder or a single checkpoint file (see the module
    docstring), in eval mode with frozen weights."""
    from diffusers import AutoencoderKL

    path = Path(path)
    require(path.exists(), f"--autoencoder {path} does not exist (a diffusers folder or a checkpoint file)")
    if path.is_dir():
        try:
            vae = AutoencoderKL.from_pretrained(path, local_files_only=True, low_cpu_mem_usage=False)
        except (OSError, ValueError, EnvironmentError) as error:
            raise DuodiffError(f"--autoencoder {path}: not a diffusers AutoencoderKL folder ({error})") from None
        return vae.eval().requires_grad_(False)

    require(config_path is not None, f"--autoencoder {path} is a single file: --autoencoder-config must name its architecture")
    with open(config_path) as f:
        vae = AutoencoderKL.from_config(json.load(f))
    state = _read_state_dict(path)
    if any(key.startswith("encoder.down.") for key in state):
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        state = convert_ldm_vae_checkpoint(state, vae.config)
    misfit = f"--autoencoder {path} does not fit --autoencoder-config {config_path}"
    try:
        missing, unexpected = vae.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shapes that differ
        raise DuodiffError(f"{misfit}: {str(error).splitlines()[1].strip()}") from None
    if missing or unexpected:
        raise DuodiffError(
            f"{misfit}: {len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    return vae.eval().requires_grad_(False)


def _read_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # pickle, zip and format errors all mean the same to the user
            raise DuodiffError(f"--autoencoder {path}: not a PyTorch checkpoint ({type(error).__name__}: {error})") from None
    state = state.get("state_dict", state)
    if any(key.startswith(LDM_PREFIX) for key in state):
        state = {key[len(LDM_PREFIX) :]: value for key, value in state.items() if key.startswith(LDM_PREFIX)}
    # LDM checkpoints carry the discriminator of the autoencoder's training loss: not part of the model.
    return {key: value for key, value in state.items() if not key.startswith("loss.")}


class LatentCodec:
    """Images in [-1, 1] <-> scaled latents, through a frozen AutoencoderKL."""

    def __init__(self, vae, scale_factor: float):
        self.vae = vae
        self.scale_factor = float(scale_factor)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Scaled posterior means (B, latent_channels, H / f, W / f)."""
        return self.vae.encode(images).latent_dist.mean * self.scale_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from scaled latents."""
        return self.vae.decode(latents / self.scale_factor).sample.clamp(-1.0, 1.0)


def autoencoder_record(autoencoder, autoencoder_config, scale_factor) -> dict | None:
    """What a sample set records of the autoencoder that decoded it (None: pixel space), after
    checking the flags; the sha256 identifies it whatever its path."""
    if autoencoder is None:
        require(autoencoder_config is None, "--autoencoder-config applies with --autoencoder only")
        require(scale_factor is None, "--scale-factor applies with --autoencoder only")
        return None
    require(
        scale_factor is not None and scale_factor > 0,
        f"--autoencoder needs --scale-factor > 0 (the latents' scale it was trained with, U-ViT's ImageNet: 0.18215); got {scale_factor}",
    )
    require(Path(autoencoder).exists(), f"--autoencoder {autoencoder} does not exist (a diffusers folder or a checkpoint file)")
    return {
        "path": str(autoencoder),
        "config": None if autoencoder_config is None else str(autoencoder_config),
        "sha256": file_sha256(autoencoder),
        "scale_factor": float(scale_factor),
    }


def check_model_autoencoder(meta: dict, record: dict | None, checkpoint_path) -> None:
    """A model trained on `duodiff encode` latents decodes through the autoencoder (and scale)
    that made them; its model.pt records them (train_args.latents_fingerprint)."""
    made = (meta.get("train_args") or {}).get("latents_fingerprint")
    if made is None:
        return
    require(
        record is not None,
        f"{checkpoint_path} was trained on latents (scale {made['scale_factor']}): pass --autoencoder and "
        "--scale-factor to decode its samples",
    )
    require(
        made["autoencoder_sha256"] == record["sha256"] and made["scale_factor"] == record["scale_factor"],
        f"{checkpoint_path} was trained on latents of another autoencoder or scale (sha256 "
        f"{made['autoencoder_sha256'][:12]}..., scale {made['scale_factor']}) than --autoencoder {record['path']} "
        f"(sha256 {record['sha256'][:12]}..., --scale-factor {record['scale_factor']})",
    )


def load_codec(record: dict | None, config, device) -> LatentCodec | None:
    """The decoder of a sample set (autoencoder_record) for a network of UViTConfig `config`, on
    `device`; None in pixel space."""
    if record is None:
        return None
    codec = LatentCodec(load_autoencoder(record["path"], record["config"]).to(device), record["scale_factor"])
    require(
        codec.latent_channels == config.in_chans,
        f"--autoencoder {record['path']} decodes {codec.latent_channels}-channel latents, but the model has in_chans "
        f"{config.in_chans}; a pixel-space model is sampled without --autoencoder",
    )
    return codec


def decoding_stats(settings: dict, parts: list, config, image_shape) -> dict:
    """A sample set's stats.json entries: its images' size and channels (the decoder's in latent
    diffusion, the network's being the latents'), and the decoder's time, kept out of the
    network's throughput: the papers' speed-ups count the network only."""
    record = settings.get("autoencoder")
    out = {"img_size": image_shape[-1], "in_chans": image_shape[0], "autoencoder": record}
    if record is not None:
        out.update(latent_size=config.img_size, latent_chans=config.in_chans,
                   decode_time_s=sum(part["decode_time_s"] for part in parts))  # fmt: skip
    return out


def run_encode(
    *, dataset, data_root, download, image_size, autoencoder, autoencoder_config, scale_factor, output,
    batch_size, chunk_size, device, progress=True, restart=False,
):
    """Encode the training split of `dataset` (and its mirror images where the dataset is flipped
    in training) into `output`, an .npz with latents (N, C, h, w) float32 and labels (N,).

    Resumable: chunks of `chunk_size` images are kept in `<output>.chunks/` until the .npz is
    written; a rerun after a kill encodes only the chunks it does not find. The chunks belong to
    one fingerprint (core/fingerprint.py: the autoencoder's bytes, the dataset's images
    (core/data.dataset_digest), scale factor, dataset, image size, chunk size): chunks of another
    one are refused in one line naming what changed, or with `restart` discarded.
    """
    from duodiff.core.data import dataset_digest, load_dataset

    # The autoencoder first: a wrong path fails in a second, before an ImageNet folder is scanned.
    codec = LatentCodec(load_autoencoder(autoencoder, autoencoder_config).to(device), scale_factor)
    data = load_dataset(dataset, root=data_root, download=download, image_size=image_size, train=True)
    takes = codec.vae.config.in_channels
    require(
        takes == data.channels,
        f"--autoencoder {autoencoder} takes {takes}-channel images but --dataset {dataset} has {data.channels}-channel "
        f"ones; use an autoencoder with in_channels {data.channels}",
    )
    views = (False, True) if data.hflip else (False,)
    where, images_sha256 = dataset_digest(data)
    fingerprint = {  # the latents' record in the .npz: what `train --latents` and `sample` check
        "autoencoder_sha256": file_sha256(autoencoder),
        "scale_factor": codec.scale_factor,
        "dataset": dataset,
        "image_size": data.image_size,
        "images": len(data),
        "num_classes": data.num_classes,
        "views": ["image", "flipped"][: len(views)],
        "dataset_sha256": images_sha256,
    }
    settings = {k: v for k, v in fingerprint.items() if k not in ("autoencoder_sha256", "dataset_sha256")}
    state = state_fingerprint({"autoencoder weights": autoencoder}, {**settings, "chunk_size": chunk_size},
                              {"dataset images": (where, images_sha256)})  # fmt: skip
    chunks = _chunk_folder(Path(str(output) + ".chunks"), state, restart)
    starts = range(0, len(data), chunk_size)
    iterator = starts
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(starts, desc=f"encode {dataset}", unit="chunk")
    latents, labels = [], []
    for start in iterator:
        indices = range(start, min(start + chunk_size, len(data)))
        path = chunks / f"{start:09d}.npz"
        if not path.exists():
            z, y = _encode_chunk(codec, data, indices, views, batch_size, device)
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.savez(f, latents=z, labels=y)
        with np.load(path) as part:
            latents.append(part["latents"])
            labels.append(part["labels"])
    # Every view of the whole set, in order: all images first, then all flipped ones.
    latents = np.concatenate([part[v::len(views)] for v in range(len(views)) for part in latents])
    labels = np.concatenate([part[v::len(views)] for v in range(len(views)) for part in labels])
    with atomic_path(output) as tmp, open(tmp, "wb") as f:
        np.savez(f, latents=latents, labels=labels, fingerprint=json.dumps(fingerprint))
    shutil.rmtree(chunks, ignore_errors=True)
    return Path(output)


def _chunk_folder(folder: Path, fingerprint: dict, restart: bool) -> Path:
    """The chunk folder, its chunks kept only when its fingerprint.json is `fingerprint`: chunks of
    another autoencoder, dataset or chunk size are never mixed in (core/fingerprint.check_state)."""
    stamp = folder / "fingerprint.json"
    if folder.exists() and (stamp.exists() or any(folder.glob("*.npz"))):  # (a kill before the stamp: nothing kept)
        try:
            old = json.loads(stamp.read_text())
        except (OSError, ValueError):
            old = None  # no record: not resumable (changes() says so)
        check_state(old, fingerprint, f"the chunks in {folder}", restart, remove_files(folder))
    folder.mkdir(parents=True, exist_ok=True)
    if not stamp.exists():
        with atomic_path(stamp) as tmp:
            Path(tmp).write_text(json.dumps(fingerprint, sort_keys=True))
    return folder


def _encode_chunk(codec, data, indices, views, batch_size, device):
    """Latents of the chunk's images, interleaved by view: (image 0, flipped 0, image 1, ...)."""
    out, labels = [], []
    for start in range(0, len(indices), batch_size):
        items = [data[i] for i in indices[start : start + batch_size]]
        images = torch.stack([image for image, _ in items]).to(device)
        per_view = [codec.encode(images.flip(-1) if flipped else images).float().cpu() for flipped in views]
        out.append(torch.stack(per_view, dim=1).flatten(0, 1))
        labels.append(torch.tensor([label for _, label in items]).repeat_interleave(len(views)))
    return torch.cat(out).numpy(), torch.cat(labels).numpy()


def load_latents(path) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents (N, C, h, w) float32, labels (N,) long) as `duodiff encode` wrote them."""
    path = Path(path)
    require(path.exists(), f"latents file {path} does not exist: run `duodiff encode` first")
    with np.load(path) as f:
        return torch.from_numpy(f["latents"]).float(), torch.from_numpy(f["labels"]).long()


def read_latents_info(path) -> tuple[tuple, dict]:
    """(shape of the latents array, the fingerprint `encode` stored) of a latents .npz, read from
    the file's headers: the check pass learns the shape without loading ImageNet's 40 GB."""
    import zipfile

    path = Path(path)
    require(path.is_file(), f"--latents {path} does not exist: run `duodiff encode` first")
    try:
        with zipfile.ZipFile(path) as archive:
            arrays = [name.removesuffix(".npy") for name in archive.namelist()]
            missing = [name for name in ("latents", "labels", "fingerprint") if name not in arrays]
            require(not missing, f"--latents {path}: no {', '.join(missing)} array in it (it holds {', '.join(arrays)}); "
                                 "expected the .npz of `duodiff encode` (latents, labels, fingerprint)")
            shape, labels_shape = (_npy_shape(archive, name) for name in ("latents", "labels"))
            with archive.open("fingerprint.npy") as f:
                fingerprint = json.loads(str(np.lib.format.read_array(f)))
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as error:
        raise DuodiffError(f"--latents {path}: not a latents file of `duodiff encode` ({error})") from None
    require(len(shape) == 4, f"--latents {path}: expected latents of shape (N, C, h, w); found {shape}")
    require(shape[0] > 0, f"--latents {path} holds no latents (shape {shape}): encode a dataset with images")
    require(
        tuple(labels_shape) == (shape[0],),
        f"--latents {path} holds {shape[0]} latents but labels of shape {tuple(labels_shape)}; expected one label per "
        f"latent, ({shape[0]},): encode the dataset again",
    )
    return tuple(shape), fingerprint


def _npy_shape(archive, name: str) -> tuple:
    """The shape of array `name` of an open .npz, from its header alone."""
    with archive.open(f"{name}.npy") as f:
        major, _ = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        return read_header(f)[0]


def latent_dataset(path, name: str, fingerprint: dict):
    """The latents and labels of `path` as the training data (duodiff.core.data.ImageDataset): never
    flipped, `encode` stored the mirror images' latents already. Its class count is the one
    `encode` recorded in the fingerprint (files without it: the labels' largest + 1)."""
    from duodiff.core.data import ImageDataset, TensorImages

    latents, labels = load_latents(path)
    num_classes = fingerprint.get("num_classes", int(labels.max()) + 1 if len(labels) else 0)
    return ImageDataset(name, TensorImages(latents, labels), latents.shape[1], latents.shape[-1], num_classes, False)


def add_cli(subparsers):
    p = subparsers.add_parser(
        "encode", help="encode a dataset's training images into autoencoder latents (latent diffusion)"
    )
    add_flag(p, "--dataset", required=True, help="dataset name (duodiff.core.data.DATASETS)")
    add_flag(p, "--data-root", default=None, help="folder holding the data (default data/<dataset>)")
    add_flag(p, "--download", action="store_true", help="let torchvision download the dataset")
    add_flag(p, "--image-size", type=int, default=None, help="resize to this (default: native size)")
    add_flag(p, "--autoencoder", required=True, help="diffusers AutoencoderKL folder or a checkpoint file")
    add_flag(p, "--autoencoder-config", default=None, help="diffusers config.json of a single-file autoencoder")
    add_flag(p, "--scale-factor", type=float, required=True, help="latent scale (U-ViT's ImageNet and SD: 0.18215)")
    add_flag(p, "--output", required=True, help="the .npz of latents and labels to write")
    add_flag(p, "--batch-size", type=int, default=64, help="images per encoder call")
    add_flag(p, "--chunk-size", type=int, default=4096, help="images per resumable chunk")
    add_flag(p, "--device", default="cpu", help="cpu | cuda")
    add_flag(p, "--restart", action="store_true", help=RESTART_HELP)
    p.set_defaults(func=_cli)


def _cli(args):
    require(args.scale_factor > 0, f"--scale-factor must be > 0; got {args.scale_factor}")
    for flag in ("batch_size", "chunk_size"):
        require(getattr(args, flag) >= 1, f"--{flag.replace('_', '-')} must be >= 1; got {getattr(args, flag)}")
    values = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    run_encode(**values)
