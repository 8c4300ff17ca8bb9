"""`duodiff train`: train a U-ViT (full or shallow) or an early-exit U-ViT (DeeDiff / AdaDiff).

The recipe is U-ViT's (Bao et al., configs/cifar10_uvit_small.py): AdamW with lr 2e-4, betas
(0.99, 0.999), weight decay 0.03, linear warm-up, an EMA of the weights (0.9999 for the published
FIDs), batch 128; the learning-rate shape (linear warm-up, then cosine decay to 0 at n_steps) and
gradient clipping at 1.0 are the early-exit seed repository's.

Losses, with target = the noise (predict_noise) or the clean image (predict_original):
  uvit        MSE(model(x_t, t), target)                                  (DDPM's L_simple)
  early_exit  outputs g_0..g_depth (g_depth: the backbone's own head), uncertainties u_0..u_{depth-1}
              L_simple = MSE(g_depth, target)
              û_i      = mean_pixels tanh|g_i - target|     (detached: the probes' fixed target)
              L_u      = sum_i mean_b (u_i - û_i)^2
              L_UAL    = sum_i mean_b (1 - û_i) mean_pixels (g_i - target)^2
              total    = L_simple + L_u + L_UAL  [+ sum_i mean_b mean_pixels (g_i - target)^2]
  (DeeDiff, Tang et al. 2309.17074; all terms are batch means so the scale does not grow with the
  batch size, unlike the seed's sum-reduced L_u.)

Reproducibility: every random draw of a step (its batch indices, timesteps, noise and flips) is
a function of (seed, step) alone, so a run resumed from checkpoint.pt gives bit-identical weights
to an uninterrupted one on CPU. Under torchrun each rank draws the same global batch and takes its
slice, so N processes match one process at the same global batch (up to the order of float sums).

Files in --log-path: checkpoint.pt (every save_every_n_steps, at the end, and on SIGTERM),
loss.csv (rewritten with each checkpoint from the history kept in it) and, at the end, model.pt.
"""

from __future__ import annotations

import copy
import hashlib
import math
import random
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from duodiff import checkpoints, distributed
from duodiff.data import CHANNELS, DATASETS, NUM_CLASSES, load_dataset
from duodiff.diffusion import GaussianDiffusion
from duodiff.errors import DuodiffError, check_choice, require
from duodiff.flags import add_flag
from duodiff.io import write_csv

CHECKPOINT_NAME = "checkpoint.pt"
MODEL_NAME = "model.pt"
LOSS_NAME = "loss.csv"

# Settings that may change between a run and its resumption: where things are and how often the
# run reports, never what it computes.
RESUMABLE_CHANGES = (
    "config_path", "log_path", "data_root", "download", "log_every_n_steps", "save_every_n_steps",
    "num_workers", "device",
)
EARLY_EXIT_PARTS = ("loss_simple", "loss_u", "loss_ual", "loss_unweighted")


class TrainingStopped(DuodiffError):
    """SIGTERM / Ctrl-C: the state is checkpointed; rerunning the same command resumes.

    The CLI exits with `exit_code`, 128 + the signal's number (143 for SIGTERM, 130 for SIGINT), as
    shells and Slurm report a process stopped by that signal."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


def run_train(
    model="uvit",
    config_path=None,
    log_path=None,
    dataset="digits",
    data_root=None,
    download=False,
    image_size=None,
    num_timesteps=1000,
    beta_start=1e-4,
    beta_end=0.02,
    parametrization="predict_noise",
    n_steps=500_000,
    batch_size=128,
    lr=2e-4,
    weight_decay=0.03,
    beta1=0.99,
    beta2=0.999,
    warmup_steps=5000,
    grad_clip=1.0,
    ema_decay=0.9999,
    use_amp=False,
    seed=0,
    log_every_n_steps=100,
    save_every_n_steps=5000,
    num_workers=0,
    device=None,
    classifier_type=None,
    load_backbone=None,
    freeze_backbone=False,
    use_unweighted_loss=False,
    loss_weighting="uniform",
    min_snr_gamma=5.0,
) -> dict:
    """Train, resuming from log_path/checkpoint.pt if present. Returns a summary dict."""
    args = dict(locals())
    dist_info = distributed.from_env()
    cfg = validate(args, dist_info.world_size)  # raises DuodiffError before any work
    log_path = Path(log_path)
    checkpoint_path = log_path / CHECKPOINT_NAME

    resume = None
    if checkpoint_path.exists():
        resume = checkpoints.load(checkpoint_path, checkpoints.TRAIN_STATE_FORMAT)
        check_same_settings(resume, cfg["settings"], checkpoint_path)

    device = distributed.setup(dist_info, cfg["device"])
    try:
        if device.type == "cuda":
            # TF32 matmuls: the usual speed/precision trade for training (bf16 autocast goes further).
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        data = load_training_data(dataset, data_root, download, cfg["image_size"], dist_info, device)
        check_data_fits(data, cfg["config"], config_path)
        return _train(args, cfg, data, device, dist_info, resume, log_path)
    finally:
        distributed.cleanup()


def _train(args, cfg, data, device, dist_info, resume, log_path):
    from duodiff.models import build_model

    kind, model_config, diffusion, settings = cfg["kind"], cfg["model_config"], cfg["diffusion"], cfg["settings"]
    n_steps, batch_size, seed = args["n_steps"], args["batch_size"], args["seed"]
    ema_decay, grad_clip, use_amp = args["ema_decay"], args["grad_clip"], args["use_amp"]
    rank, world_size = dist_info.rank, dist_info.world_size
    local_batch = batch_size // world_size
    conditional = cfg["config"].num_classes > 0

    # ---- model, EMA, optimizer, schedule ------------------------------------------------------
    torch.manual_seed(seed)  # the initial weights (identical on every rank)
    net = build_model(kind, cfg["config"], num_timesteps=diffusion.num_timesteps, classifier_type=args["classifier_type"])
    if cfg["backbone_state"] is not None:
        net.backbone.load_state_dict(cfg["backbone_state"])
    if args["freeze_backbone"]:
        net.freeze_backbone()
    net.to(device).train()
    ema = copy.deepcopy(net).requires_grad_(False).eval() if ema_decay > 0 else None
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args["lr"], betas=(args["beta1"], args["beta2"]), weight_decay=args["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args["warmup_steps"], n_steps))

    start_step, history = 0, []
    interval = new_interval()  # loss sums since the last loss.csv row
    if resume is not None:
        net.load_state_dict(resume["model"])
        if ema is not None:
            ema.load_state_dict(resume["ema"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        set_rng_states(resume["rng"])
        start_step, history, interval = resume["step"], resume["history"], resume["interval"]
    model = net
    if dist_info.enabled:
        # Every trainable parameter takes part in every step (the early-exit forward runs all
        # exits; per-timestep probe banks are gathered from one tensor), so no unused-parameter scan.
        model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

    def save_state(step):
        state = {
            "settings": settings, "train_args": cfg["train_args"], "kind": kind,
            "classifier_type": args["classifier_type"], "model_config": model_config, "diffusion": diffusion.config(),
            "model": cpu_state(net), "ema": cpu_state(ema) if ema is not None else None,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "step": step, "rng": get_rng_states(), "history": history, "interval": interval,
        }
        checkpoints.save(state, log_path / CHECKPOINT_NAME, checkpoints.TRAIN_STATE_FORMAT)
        write_loss_csv(log_path / LOSS_NAME, history, kind)

    # ---- data: this rank's slice of each step's global batch ----------------------------------
    sampler = StepBatchSampler(len(data), batch_size, seed, start_step, n_steps, rank, world_size)
    loader = DataLoader(
        data, batch_sampler=sampler, num_workers=args["num_workers"], pin_memory=device.type == "cuda",
        worker_init_fn=ignore_stop_signals, generator=torch.Generator(),  # keep the global RNG untouched
    )
    batches = iter(loader)
    lo, hi = rank * local_batch, (rank + 1) * local_batch
    T = diffusion.num_timesteps
    weights = loss_weights(diffusion, args["loss_weighting"], args["min_snr_gamma"]).to(device)
    weight_of = weights.__getitem__  # t (B,) -> the per-sample loss weights (B,)

    # ---- the loop -----------------------------------------------------------------------------
    interactive = sys.stderr.isatty()
    pbar = tqdm(
        total=n_steps, initial=start_step, desc="train", disable=not dist_info.is_main, dynamic_ncols=True,
        mininterval=0.5 if interactive else 60,  # a Slurm log gets a bar line a minute, not ten a second
    )
    step, tick, ticked = start_step, time.perf_counter(), 0
    saved_step = start_step if resume is not None else None
    with pbar, StopRequest() as stop:
        while step < n_steps:
            x0, y = next(batches)
            x0 = x0.to(device, non_blocking=True)
            y = y.to(device) if conditional else None
            # The step's randomness, drawn for the global batch so every rank agrees.
            g = torch.Generator(device).manual_seed(derive_seed(seed, "step", step))
            t = torch.randint(0, T, (batch_size,), generator=g, device=device)[lo:hi]
            noise = torch.randn((batch_size, *x0.shape[1:]), generator=g, device=device)[lo:hi]
            if data.hflip:
                flip = (torch.rand(batch_size, generator=g, device=device) < 0.5)[lo:hi]
                x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(-1), x0)
            x_t = diffusion.q_sample(x0, t, noise)
            target = diffusion.target(x0, noise)

            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                output = model(x_t, t, y)
            if kind == "early_exit":
                loss, parts = early_exit_loss(*output, target, args["use_unweighted_loss"], weight_of(t))
            else:
                per_sample = (output.float() - target.float()).square().flatten(1).mean(1)
                loss, parts = (per_sample * weight_of(t)).mean(), {}

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            lr_now = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema_update(ema, net, ema_decay)
            step += 1
            ticked += 1
            pbar.update(1)

            # One collective per step: the losses (for the log and the NaN check) and whether
            # any rank was asked to stop, so all ranks stop after the same step.
            stats = torch.stack([loss.detach(), *(v.detach() for v in parts.values())]).float()
            stats = torch.cat([stats, torch.tensor([float(stop.requested)], device=stats.device)])
            stats = distributed.all_reduce_sum(stats).tolist()
            values, stop_now = [v / world_size for v in stats[:-1]], stats[-1] > 0
            if not all(math.isfinite(v) for v in values):
                kept = (
                    f"the last good checkpoint {log_path / CHECKPOINT_NAME} (step {saved_step}) is kept"
                    if saved_step is not None
                    else "no checkpoint was written yet"
                )
                raise DuodiffError(
                    f"loss became {values[0]} at step {step}; stopped without saving ({kept}); "
                    "lower --lr or check the data"
                )
            interval["n"] += 1
            interval["sums"] = [a + b for a, b in zip(interval["sums"], values)] if interval["sums"] else values

            if step % args["log_every_n_steps"] == 0 or step == n_steps:
                now = time.perf_counter()
                row = {"step": step, "lr": lr_now, "steps_per_s": ticked / max(now - tick, 1e-9)}
                names = ["loss", *parts]
                row.update({name: s / interval["n"] for name, s in zip(names, interval["sums"])})
                history.append(row)
                interval = new_interval()
                tick, ticked = now, 0
                pbar.set_postfix(loss=f"{row['loss']:.4f}", steps_per_s=f"{row['steps_per_s']:.2f}", lr=f"{lr_now:.2e}")
                if not interactive and dist_info.is_main:  # batch jobs: one plain line per log step
                    pbar.write(", ".join(f"{k} {v:.6g}" for k, v in row.items()), file=sys.stderr)

            if step % args["save_every_n_steps"] == 0 or step == n_steps or stop_now:
                if dist_info.is_main:
                    save_state(step)
                saved_step = step
                distributed.barrier()
            if stop_now and step < n_steps:
                raise TrainingStopped(
                    f"stopped by {stop.name or 'a signal to another rank'} after step {step} of {n_steps}; checkpoint written to "
                    f"{log_path / CHECKPOINT_NAME}; rerun the same command to resume",
                    # A rank stopped by another rank's signal: Slurm and torchrun send SIGTERM.
                    stop.signum or signal.SIGTERM,
                )

    if start_step == n_steps and dist_info.is_main:
        write_loss_csv(log_path / LOSS_NAME, history, kind)  # a finished run rerun: rewrite its outputs
    if dist_info.is_main:
        checkpoints.save_model(
            log_path / MODEL_NAME, kind=kind, classifier_type=args["classifier_type"], model_config=model_config,
            diffusion=diffusion.config(), state_dict=cpu_state(net),
            ema_state_dict=cpu_state(ema) if ema is not None else None, step=step, train_args=cfg["train_args"],
        )
    distributed.barrier()
    return {
        "step": step, "resumed_from": start_step if resume is not None else None,
        "final_loss": history[-1]["loss"] if history else None,
        "model": str(log_path / MODEL_NAME), "loss_csv": str(log_path / LOSS_NAME),
    }


# ---- losses, EMA, schedule ------------------------------------------------------------------------

LOSS_WEIGHTINGS = ("uniform", "min_snr")


def loss_weights(diffusion: GaussianDiffusion, weighting: str, gamma: float) -> torch.Tensor:
    """Per-timestep weights (T,) of the MSE: uniform = DDPM's L_simple (1 everywhere); min_snr =
    Min-SNR-gamma (Hang et al., ICCV 2023, 2303.09556), which caps the weight that the
    parametrization implicitly gives the nearly clean timesteps. In terms of the x0 error, the
    noise MSE weighs timestep t by SNR_t = abar_t / (1 - abar_t), up to 1e4 near t = 0, so a small
    model spends its capacity on noise it cannot see; min_snr weighs the x0 error by
    min(SNR_t, gamma) instead: the noise MSE times min(SNR_t, gamma) / SNR_t, the x0 MSE times
    min(SNR_t, gamma)."""
    if weighting == "uniform":
        return torch.ones(diffusion.num_timesteps)
    abar = diffusion._float64["alphas_cumprod"]
    snr = abar / (1 - abar)
    capped = snr.clamp(max=gamma)
    weights = capped / snr if diffusion.parametrization == "predict_noise" else capped
    return weights.float()



def early_exit_loss(outputs, uncertainties, target, use_unweighted_loss=False, weights=None):
    """DeeDiff's loss (see the module docstring) -> (total, {part name: value}).

    weights (B,): per-sample weights of the image losses (loss_weights: Min-SNR-gamma); the
    probes' L_u stays unweighted, since its target is the error the probe must predict."""
    target = target.float()
    exits = [g.float() for g in outputs[:-1]]  # g_0 .. g_{depth-1}
    u = uncertainties.float()  # (B, depth)
    w = torch.ones(target.shape[0], device=target.device) if weights is None else weights.float()
    error = torch.stack([(g - target).square().flatten(1).mean(1) for g in exits], dim=1)  # (B, depth)
    with torch.no_grad():
        u_hat = torch.stack([torch.tanh((g - target).abs()).flatten(1).mean(1) for g in exits], dim=1)
    loss_simple = ((outputs[-1].float() - target).square().flatten(1).mean(1) * w).mean()
    loss_u = (u - u_hat).square().mean(0).sum()
    loss_ual = ((1 - u_hat) * error * w[:, None]).mean(0).sum()
    loss_unweighted = (error * w[:, None]).mean(0).sum()
    total = loss_simple + loss_u + loss_ual
    if use_unweighted_loss:
        total = total + loss_unweighted
    parts = dict(zip(EARLY_EXIT_PARTS, (loss_simple, loss_u, loss_ual, loss_unweighted)))
    return total, parts


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, as U-ViT's `ema()` (buffers are copied).

    Frozen parameters are skipped: they never change, and decay * w + (1 - decay) * w is not
    exactly w in floating point, so a frozen backbone's EMA stays bit-equal to the backbone."""
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        if p.requires_grad:
            p_ema.mul_(decay).add_((1 - decay) * p.detach())
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def warmup_cosine(warmup_steps, n_steps):
    """LR factor for optimizer step s: linear warm-up s / warmup, then cosine decay to 0 at n_steps
    (diffusers' get_cosine_schedule_with_warmup, as in the early-exit seed)."""

    def factor(s):
        if s < warmup_steps:
            return s / warmup_steps
        progress = (s - warmup_steps) / max(1, n_steps - warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return factor


# ---- reproducible randomness ----------------------------------------------------------------------


def derive_seed(*parts) -> int:
    """A 63-bit seed from (seed, purpose, index): distinct purposes never share a stream."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def epoch_permutation(n_items, seed, epoch) -> torch.Tensor:
    generator = torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch))
    return torch.randperm(n_items, generator=generator)


class StepBatchSampler(Sampler):
    """For step = start..n_steps-1: this rank's slice of the step's global batch indices.

    The data stream is the concatenation of per-epoch permutations (each a function of the seed
    and the epoch); step s takes positions [s * B, (s + 1) * B) of it. No state to save: a
    resumed run starts at its step and sees exactly the batches an uninterrupted one would.
    """

    def __init__(self, n_items, batch_size, seed, start_step, n_steps, rank=0, world_size=1):
        self.n_items, self.batch_size, self.seed = n_items, batch_size, seed
        self.start_step, self.n_steps = start_step, n_steps
        local = batch_size // world_size
        self.lo, self.hi = rank * local, (rank + 1) * local
        self._perms = {}

    def global_batch(self, step) -> torch.Tensor:
        positions = torch.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epochs, offsets = positions // self.n_items, positions % self.n_items
        # Keep only the epochs this batch touches (steps move forward, so memory stays flat).
        self._perms = {
            e: self._perms[e] if e in self._perms else epoch_permutation(self.n_items, self.seed, e)
            for e in epochs.unique().tolist()
        }
        return torch.stack([self._perms[e][o] for e, o in zip(epochs.tolist(), offsets.tolist())])

    def __iter__(self):
        for step in range(self.start_step, self.n_steps):
            yield self.global_batch(step)[self.lo : self.hi].tolist()

    def __len__(self):
        return self.n_steps - self.start_step


def get_rng_states() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])


# ---- stopping on SIGTERM ------------------------------------------------------------------------


class StopRequest:
    """SIGTERM (Slurm time limit, preemption) or Ctrl-C: finish the step, checkpoint, then stop.

    A second Ctrl-C stops at once (KeyboardInterrupt).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self):
        self.requested, self.name, self.signum, self._previous = False, None, None, {}
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested, self.name, self.signum = True, signal.Signals(signum).name, signum

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False


def ignore_stop_signals(worker_id):
    """DataLoader workers get Slurm's SIGTERM too; they must live until the step is finished."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ---- settings, files ----------------------------------------------------------------------------


def new_interval() -> dict:
    return {"n": 0, "sums": []}


def cpu_state(module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def write_loss_csv(path, history, kind):
    names = ["step", "loss", "lr", "steps_per_s", *(EARLY_EXIT_PARTS if kind == "early_exit" else ())]
    write_csv(path, history, fieldnames=names)


def check_same_settings(checkpoint: dict, settings: dict, path) -> None:
    old = checkpoint.get("settings")
    require(isinstance(old, dict), f"{path}: checkpoint has no training settings; remove it or choose another --log-path")
    for key, value in settings.items():
        if old.get(key) == value:
            continue
        if key == "model_config":
            keys = sorted(set(old.get(key) or {}) | set(value))
            diff = [f"{k}: {old[key].get(k)!r} -> {value.get(k)!r}" for k in keys if old[key].get(k) != value.get(k)]
            what = f"a different model config ({', '.join(diff)})"
        else:
            what = f"--{key.replace('_', '-')} {old.get(key)!r} (this run: {value!r})"
        raise DuodiffError(
            f"{path} was made with {what}; rerun with the checkpoint's settings to resume it, "
            "or choose another --log-path to start afresh"
        )


def load_training_data(dataset, data_root, download, image_size, dist_info, device):
    """The training split; under torchrun with --download, rank 0 downloads while the others wait."""
    if not (download and dist_info.enabled):
        return load_dataset(dataset, root=data_root, download=download, image_size=image_size, train=True)
    error = None
    if dist_info.is_main:
        try:
            load_dataset(dataset, root=data_root, download=True, image_size=image_size, train=True)
        except DuodiffError as e:
            error = e
    # Every rank learns whether rank 0 succeeded, so none waits forever for a failed download.
    failed = distributed.all_reduce_sum(torch.tensor([float(error is not None)], device=device)).item() > 0
    if failed:
        raise error or DuodiffError(f"--download of --dataset {dataset} failed on rank 0 (see its message)")
    return load_dataset(dataset, root=data_root, download=False, image_size=image_size, train=True)


def check_data_fits(data, config, config_path) -> None:
    """config: the run's UViTConfig."""
    require(
        config.img_size == data.image_size and config.in_chans == data.channels,
        f"--dataset {data.name} gives {data.channels}x{data.image_size}x{data.image_size} images but "
        f"{config_path} expects in_chans {config.in_chans}, img_size {config.img_size}",
    )
    num_classes = config.num_classes
    if num_classes > 0:
        require(
            data.num_classes == num_classes,
            f"{config_path} has num_classes {num_classes} but --dataset {data.name} has "
            f"{data.num_classes or 'no'} class labels",
        )


def _int(name, value, minimum):
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    require(ok, f"{name} must be an integer >= {minimum}; got {value!r}")


def _number(name, value, low, high, low_open=False, high_open=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    require(ok, f"{name} must be a number in {interval}; got {value!r}")


def validate(args: dict, world_size: int) -> dict:
    """Check every argument (DuodiffError naming the value and what is allowed) and resolve them."""
    from duodiff.config import load_yaml
    from duodiff.models import CLASSIFIER_TYPES, KIND_ALIASES, MODEL_KINDS, UViTConfig

    check_choice("--model", args["model"], [*MODEL_KINDS, *KIND_ALIASES])
    kind = KIND_ALIASES.get(args["model"], args["model"])
    require(args["config_path"] is not None, "--config-path is required (a model YAML such as config/models/digits.yaml)")
    require(args["log_path"] is not None, "--log-path is required (the folder for model.pt, loss.csv, checkpoint.pt)")
    require(not Path(args["log_path"]).is_file(), f"--log-path {args['log_path']} is a file; it must be a folder")
    check_choice("--dataset", args["dataset"], DATASETS)
    for name in ("n_steps", "batch_size", "log_every_n_steps", "save_every_n_steps"):
        _int(f"--{name.replace('_', '-')}", args[name], 1)
    for name in ("warmup_steps", "num_workers", "seed"):
        _int(f"--{name.replace('_', '-')}", args[name], 0)
    _number("--lr", args["lr"], 0, math.inf, low_open=True, high_open=True)
    _number("--weight-decay", args["weight_decay"], 0, math.inf, high_open=True)
    _number("--beta1", args["beta1"], 0, 1, high_open=True)
    _number("--beta2", args["beta2"], 0, 1, high_open=True)
    _number("--grad-clip", args["grad_clip"], 0, math.inf, high_open=True)
    _number("--ema-decay", args["ema_decay"], 0, 1, high_open=True)
    check_choice("--loss-weighting", args["loss_weighting"], LOSS_WEIGHTINGS)
    _number("--min-snr-gamma", args["min_snr_gamma"], 0, math.inf, low_open=True, high_open=True)
    require(
        args["batch_size"] % world_size == 0,
        f"--batch-size {args['batch_size']} must be divisible by the number of processes ({world_size}); "
        "it is the global batch, split evenly across ranks",
    )
    device = args["device"] or distributed.default_device()
    check_choice("--device", device, ("cpu", "cuda"))
    require(device == "cpu" or torch.cuda.is_available(), "--device cuda: no CUDA device is available; use --device cpu")
    diffusion = GaussianDiffusion(args["num_timesteps"], args["beta_start"], args["beta_end"], args["parametrization"])

    if kind == "early_exit":
        require(
            args["classifier_type"] is not None,
            f"--model {args['model']} needs --classifier-type (one of {', '.join(CLASSIFIER_TYPES)})",
        )
        check_choice("--classifier-type", args["classifier_type"], CLASSIFIER_TYPES)
        require(not args["freeze_backbone"] or args["load_backbone"], "--freeze-backbone needs --load-backbone (a trained U-ViT model.pt)")
    else:
        for flag in ("classifier_type", "load_backbone"):
            require(args[flag] is None, f"--{flag.replace('_', '-')} applies to --model early_exit only")
        for flag in ("freeze_backbone", "use_unweighted_loss"):
            require(not args[flag], f"--{flag.replace('_', '-')} applies to --model early_exit only")

    model_config = load_yaml(args["config_path"])  # stored in model.pt as the user wrote it
    config = UViTConfig.from_dict(model_config, source=str(args["config_path"]))
    image_size = args["image_size"] if args["image_size"] is not None else config.img_size
    _int("--image-size", image_size, 1)
    require(
        image_size == config.img_size,
        f"--image-size {image_size} does not match img_size {config.img_size} in {args['config_path']}",
    )
    require(
        CHANNELS[args["dataset"]] == config.in_chans,
        f"--dataset {args['dataset']} has {CHANNELS[args['dataset']]} channel(s) but {args['config_path']} "
        f"has in_chans {config.in_chans}",
    )
    if config.num_classes > 0 and NUM_CLASSES[args["dataset"]] is not None:
        require(
            NUM_CLASSES[args["dataset"]] == config.num_classes,
            f"{args['config_path']} has num_classes {config.num_classes} but --dataset {args['dataset']} "
            f"has {NUM_CLASSES[args['dataset']] or 'no'} class labels",
        )

    backbone_state = None
    if args["load_backbone"] is not None:
        backbone_state = read_backbone(args["load_backbone"], config, diffusion, args["config_path"])

    settings = {
        "model": kind, "model_config": config.to_dict(), "dataset": args["dataset"], "image_size": image_size,
        "diffusion": diffusion.config(),
        **{k: args[k] for k in (
            "n_steps", "batch_size", "lr", "weight_decay", "beta1", "beta2", "warmup_steps", "grad_clip",
            "ema_decay", "use_amp", "seed", "classifier_type", "freeze_backbone", "use_unweighted_loss",
        )},
        # Settings added later enter only when they differ from the old behaviour, so checkpoints
        # written before them still resume.
        **({"loss_weighting": args["loss_weighting"], "min_snr_gamma": args["min_snr_gamma"]}
           if args["loss_weighting"] != "uniform" else {}),
        "load_backbone": str(args["load_backbone"]) if args["load_backbone"] is not None else None,
    }
    train_args = {k: (str(v) if isinstance(v, Path) else v) for k, v in args.items()}
    train_args.update(model=kind, image_size=image_size, device=device, world_size=world_size)
    return {
        "kind": kind, "model_config": model_config, "config": config, "diffusion": diffusion, "image_size": image_size,
        "device": device, "settings": settings, "train_args": train_args, "backbone_state": backbone_state,
    }


def read_backbone(path, config, diffusion, config_path) -> dict:
    """The weights of a trained U-ViT model.pt (EMA if it has them) after checking it fits the
    run's UViTConfig `config`."""
    from duodiff.models import EARLY_EXIT_KEYS, UViTConfig

    obj = checkpoints.load_model_file(path)
    require(obj["kind"] == "uvit", f"--load-backbone {path}: expected a U-ViT model (kind uvit), found kind {obj['kind']!r}")
    theirs, ours = UViTConfig.from_dict(obj["model_config"], source=str(path)).to_dict(), config.to_dict()
    # The probe settings belong to the early-exit part, not the backbone.
    differing = [k for k in ours if k not in EARLY_EXIT_KEYS and theirs[k] != ours[k]]
    require(
        not differing,
        f"--load-backbone {path} was trained with a different model config than {config_path}: "
        + ", ".join(f"{k} {theirs[k]!r} vs {ours[k]!r}" for k in differing),
    )
    differing = [k for k, v in diffusion.config().items() if obj["diffusion"].get(k) != v]
    require(
        not differing,
        f"--load-backbone {path} was trained with different diffusion settings: "
        + ", ".join(f"--{k.replace('_', '-')} {obj['diffusion'].get(k)!r} vs {diffusion.config()[k]!r}" for k in differing),
    )
    return obj["ema_state_dict"] if obj["ema_state_dict"] is not None else obj["state_dict"]


# ---- command line -------------------------------------------------------------------------------


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a U-ViT or an early-exit U-ViT (resumes from --log-path/checkpoint.pt)",
        description=__doc__.split("\n\n")[0],
    )
    add_flag(p, "--model", default="uvit", help="uvit | early_exit (alias deediff_uvit)")
    add_flag(p, "--config-path", required=True, help="model YAML (config/models/*.yaml)")
    add_flag(p, "--log-path", required=True, help="output folder: model.pt, loss.csv, checkpoint.pt")
    add_flag(p, "--dataset", default="digits", help=" | ".join(DATASETS))
    add_flag(p, "--data-root", "--data_path", default=None, help="dataset folder (default data/<dataset>)")
    add_flag(p, "--download", action="store_true", help="download the dataset if missing (cifar10, celeba)")
    add_flag(p, "--image-size", type=int, default=None, help="default: img_size of the model config")
    add_flag(p, "--num-timesteps", type=int, default=1000)
    add_flag(p, "--beta-start", type=float, default=1e-4)
    add_flag(p, "--beta-end", type=float, default=0.02)
    add_flag(p, "--parametrization", default="predict_noise", help="predict_noise | predict_original")
    add_flag(p, "--n-steps", type=int, default=500_000)
    add_flag(p, "--batch-size", type=int, default=128, help="global batch (split across torchrun ranks)")
    add_flag(p, "--lr", type=float, default=2e-4)
    add_flag(p, "--weight-decay", type=float, default=0.03)
    add_flag(p, "--beta1", type=float, default=0.99)
    add_flag(p, "--beta2", type=float, default=0.999)
    add_flag(p, "--warmup-steps", "--num_warmup_steps", type=int, default=5000)
    add_flag(p, "--grad-clip", "--max_grad_norm", type=float, default=1.0, help="0 disables clipping")
    add_flag(p, "--ema-decay", type=float, default=0.9999, help="0 disables the EMA")
    add_flag(p, "--use-amp", action="store_true", help="bfloat16 autocast")
    add_flag(p, "--seed", type=int, default=0)
    add_flag(p, "--log-every-n-steps", type=int, default=100)
    add_flag(p, "--save-every-n-steps", type=int, default=5000)
    add_flag(p, "--num-workers", type=int, default=0)
    add_flag(p, "--device", default=None, help="cpu | cuda (default: cuda when available)")
    add_flag(p, "--nproc-per-node", type=int, default=1, help="training processes on this node, one per GPU "
             "with --device cuda (DDP under torchrun; --batch-size stays the global batch); 0 or 1: one process")
    add_flag(p, "--classifier-type", default=None, help="early exit: attention_probe | mlp_probe_per_layer | "
             "mlp_probe_per_timestep | mlp_probe_per_layer_per_timestep")
    add_flag(p, "--load-backbone", default=None, help="early exit: a trained U-ViT model.pt for the backbone")
    add_flag(p, "--freeze-backbone", action="store_true", help="early exit: train only the exit heads and probes")
    add_flag(p, "--use-unweighted-loss", action="store_true", help="early exit: add the unweighted per-exit MSE")
    add_flag(p, "--loss-weighting", default="uniform", help="uniform (DDPM's L_simple) | min_snr (Min-SNR-gamma)")
    add_flag(p, "--min-snr-gamma", type=float, default=5.0, help="min_snr: the cap on the signal-to-noise ratio")
    p.set_defaults(func=_cli)


def _cli(args) -> None:
    kwargs = {k: v for k, v in vars(args).items() if k not in ("command", "func") and not k.startswith("_")}
    nproc = kwargs.pop("nproc_per_node")
    _int("--nproc-per-node", nproc, 0)
    world_size = distributed.from_env().world_size
    if nproc > 1 and world_size == 1:
        check_processes(kwargs, nproc)  # one clear line now, not one per rank after the launch
        distributed.relaunch_under_torchrun(nproc, ["train", *_flags(kwargs)])  # does not return
    require(
        nproc <= 1 or nproc == world_size,
        f"--nproc-per-node {nproc} contradicts the {world_size} processes torchrun started; give one or the other",
    )
    summary = run_train(**kwargs)
    if distributed.from_env().is_main:
        print(f"trained {summary['step']} steps -> {summary['model']}")


def check_processes(kwargs: dict, nproc: int) -> None:
    """What must hold before N training processes start: the usual arguments, and one GPU each."""
    validate(dict(kwargs), nproc)
    device = kwargs["device"] or distributed.default_device()
    if device == "cuda":
        available = torch.cuda.device_count()
        require(nproc <= available, f"--nproc-per-node {nproc} needs {nproc} GPUs, but {available} are visible")


def _flags(kwargs: dict) -> list[str]:
    """The parsed arguments written back as `duodiff train` flags, for the torchrun ranks."""
    flags = []
    for key, value in kwargs.items():
        if value is None or value is False:
            continue
        flags.append(f"--{key.replace('_', '-')}")
        if value is not True:
            flags.append(str(value))  # str(float) round-trips exactly
    return flags
