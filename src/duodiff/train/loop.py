"""`duodiff train`: train a U-ViT (full or shallow) or an early-exit U-ViT (DeeDiff / AdaDiff).

The recipe is U-ViT's (Bao et al., configs/cifar10_uvit_small.py): AdamW with lr 2e-4, betas
(0.99, 0.999), weight decay 0.03, linear warm-up, an EMA of the weights (0.9999 for the published
FIDs), batch 128; the learning-rate shape (linear warm-up, then cosine decay to 0 at n_steps) and
gradient clipping at 1.0 are the early-exit seed repository's.

Each model computes its own loss (UViT.loss: DDPM's L_simple; EarlyExitUViT.loss: DeeDiff's),
with target = the noise (predict_noise) or the clean image (predict_original) and per-sample
weights from --loss-weighting (GaussianDiffusion.loss_weights).

The parts live beside it: the check pass of the arguments in checks.py, the per-(seed,
step) random draws that make a resumed run bit-identical in determinism.py, stopping on SIGTERM
and the torchrun relaunch in process.py, the process group in core/distributed.py.

Files in --log-path: checkpoint.pt (every save_every_n_steps, at the end, and on SIGTERM),
loss.csv (rewritten with each checkpoint from the history kept in it) and, at the end, model.pt.
"""

from __future__ import annotations

import copy
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from duodiff.core import distributed
from duodiff.core.data import DATASETS, load_dataset
from duodiff.core.diffusion import add_diffusion_recipe_flags
from duodiff.core.errors import DuodiffError, check_int, require
from duodiff.core.fingerprint import RESTART_HELP, remove_files
from duodiff.core.flags import add_flag, cli_flags
from duodiff.core.io import write_csv
from duodiff.core.latent import latent_dataset
from duodiff.models import build_model, checkpoints
from duodiff.models.early_exit import LOSS_PARTS
from duodiff.train import process
from duodiff.train.checks import (
    TrainPlan,
    check_checkpoint,
    check_data_fits,
    check_processes,
    check_train_args,
    with_dataset_digest,
)
from duodiff.train.determinism import (
    StepBatchSampler,
    drop_labels,
    get_rng_states,
    set_rng_states,
    step_draws,
)
from duodiff.train.optim import ema_update, warmup_cosine
from duodiff.train.process import StopRequest, TrainingStopped

CHECKPOINT_NAME = "checkpoint.pt"
MODEL_NAME = "model.pt"
LOSS_NAME = "loss.csv"


def run_train(
    *, model, config_path, log_path, dataset, data_root, download, image_size, num_timesteps, beta_start, beta_end,
    beta_schedule, noise_process, time_input, sde_beta_min, sde_beta_max, parametrization, n_steps, batch_size, lr, weight_decay, beta1, beta2, warmup_steps, grad_clip, ema_decay,
    use_amp, seed, log_every_n_steps, save_every_n_steps, num_workers, device, classifier_type, load_backbone,
    freeze_backbone, use_unweighted_loss, loss_weighting, min_snr_gamma, label_dropout, latents, restart,
) -> dict:
    """Train, resuming from log_path/checkpoint.pt if present. Returns a summary dict.

    Every argument is a `duodiff train` flag of the same name, and has its default there (and in
    the workflow's schema for the pipeline); none here."""
    args = dict(locals())
    dist_info = distributed.from_env()
    plan = check_train_args(args, dist_info.world_size)  # raises DuodiffError before any work
    log_path = Path(log_path)
    device = distributed.setup(dist_info, plan.device)
    try:
        if device.type == "cuda":
            # TF32 matmuls: the usual speed/precision trade for training (bf16 autocast goes further).
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if latents is not None:
            data = latent_dataset(latents, dataset, plan.settings["latents"])  # checked by check_latents
        else:
            data = load_training_data(dataset, data_root, download, plan.image_size, dist_info, device)
            plan = with_dataset_digest(plan, data)  # the images themselves, not only --dataset's name
        check_data_fits(data, plan.config, config_path, label_dropout, batch_size)
        resume = None
        if (log_path / CHECKPOINT_NAME).exists():
            resume = checkpoints.load(log_path / CHECKPOINT_NAME, checkpoints.TRAIN_STATE_FORMAT)
            # A stale checkpoint goes with the model.pt and loss.csv it made (rank 0 deletes them).
            stale = [log_path / name for name in (CHECKPOINT_NAME, MODEL_NAME, LOSS_NAME)]
            if not check_checkpoint(resume, plan.fingerprint, log_path / CHECKPOINT_NAME, restart,
                                    remove_files(*stale) if dist_info.is_main else lambda: None):
                resume = None
            distributed.barrier()  # every rank starts after rank 0 has discarded stale state
        return _train(args, plan, data, device, dist_info, resume, log_path)
    finally:
        distributed.cleanup()


def _train(args, plan: TrainPlan, data, device, dist_info, resume, log_path: Path) -> dict:
    """The loop: one optimizer step per global batch, a loss.csv row every log_every_n_steps, a
    checkpoint every save_every_n_steps, at the end and when a signal asks to stop."""
    n_steps, world_size = args["n_steps"], dist_info.world_size
    run = build_run(args, plan, device, dist_info, resume)
    start_step = run.step
    batches = iter(make_loader(data, args, start_step, device, dist_info))
    local_batch = args["batch_size"] // world_size
    rows = slice(dist_info.rank * local_batch, (dist_info.rank + 1) * local_batch)
    weights = plan.diffusion.loss_weights(args["loss_weighting"], args["min_snr_gamma"]).to(device)
    progress = Progress(n_steps, start_step, dist_info.is_main)
    saved_step = start_step if resume is not None else None
    with progress.bar, StopRequest() as stop:
        while run.step < n_steps:
            x0, y = next(batches)
            loss, parts, lr_now = train_step(run, plan, args, x0, y, weights, data.hflip, rows, device)
            progress.advance()
            values, stop_now = reduce_stats(loss, parts, stop.requested, world_size)
            check_finite(values, run.step, log_path / CHECKPOINT_NAME, saved_step)
            run.add_to_interval(values)
            if run.step % args["log_every_n_steps"] == 0 or run.step == n_steps:
                run.history.append(progress.row(run.step, lr_now, ["loss", *parts], run.interval))
                run.interval = new_interval()
            if run.step % args["save_every_n_steps"] == 0 or run.step == n_steps or stop_now:
                if dist_info.is_main:
                    save_checkpoint(run, plan, args, log_path)
                saved_step = run.step
                distributed.barrier()
            if stop_now and run.step < n_steps:
                raise TrainingStopped(
                    f"stopped by {stop.name or 'a signal to another rank'} after step {run.step} of {n_steps}; "
                    f"checkpoint written to {log_path / CHECKPOINT_NAME}; rerun the same command to resume",
                    # A rank stopped by another rank's signal: Slurm and torchrun send SIGTERM.
                    stop.signum or signal.SIGTERM,
                )
    return finish(run, plan, args, log_path, dist_info, start_step, resume is not None)


# ---- the steps of the loop ------------------------------------------------------------------------


def new_interval() -> dict:
    return {"n": 0, "sums": []}


@dataclass
class Run:
    """What the loop advances and checkpoint.pt keeps."""

    net: torch.nn.Module  # the model whose weights are saved
    model: torch.nn.Module  # net, or net wrapped for DDP: what the step calls
    ema: torch.nn.Module | None
    params: list  # the trainable parameters
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    step: int = 0
    history: list = field(default_factory=list)  # the loss.csv rows
    interval: dict = field(default_factory=new_interval)  # loss sums since the last loss.csv row

    def add_to_interval(self, values: list) -> None:
        self.interval["n"] += 1
        self.interval["sums"] = [a + b for a, b in zip(self.interval["sums"], values)] if self.interval["sums"] else values


def build_run(args, plan: TrainPlan, device, dist_info, resume) -> Run:
    """Model, EMA, optimizer and schedule; restored from `resume` (a checkpoint) when given."""
    torch.manual_seed(args["seed"])  # the initial weights (identical on every rank)
    net = build_model(plan.kind, plan.config, num_timesteps=plan.diffusion.num_timesteps, classifier_type=args["classifier_type"])
    if plan.backbone_state is not None:
        net.backbone.load_state_dict(plan.backbone_state)
    if args["freeze_backbone"]:
        net.freeze_backbone()
    net.to(device).train()
    ema = copy.deepcopy(net).requires_grad_(False).eval() if args["ema_decay"] > 0 else None
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args["lr"], betas=(args["beta1"], args["beta2"]), weight_decay=args["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args["warmup_steps"], args["n_steps"]))
    run = Run(net, net, ema, params, optimizer, scheduler)
    if resume is not None:
        net.load_state_dict(resume["model"])
        if ema is not None:
            ema.load_state_dict(resume["ema"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        set_rng_states(resume["rng"])
        run.step, run.history, run.interval = resume["step"], resume["history"], resume["interval"]
    if dist_info.enabled:
        # Every trainable parameter takes part in every step (the early-exit forward runs all
        # exits; per-timestep probe banks are gathered from one tensor), so no unused-parameter scan.
        run.model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    return run


def make_loader(data, args, start_step, device, dist_info) -> DataLoader:
    """This rank's slice of each step's global batch, from start_step on."""
    sampler = StepBatchSampler(
        len(data), args["batch_size"], args["seed"], start_step, args["n_steps"], dist_info.rank, dist_info.world_size
    )
    return DataLoader(
        data, batch_sampler=sampler, num_workers=args["num_workers"], pin_memory=device.type == "cuda",
        worker_init_fn=process.ignore_stop_signals, generator=torch.Generator(),  # keep the global RNG untouched
    )  # fmt: skip


def train_step(run: Run, plan: TrainPlan, args, x0, y, weights, hflip, rows: slice, device):
    """One optimizer step on this rank's part of the global batch -> (loss, {part: value}, its lr)."""
    diffusion = plan.diffusion
    x0 = x0.to(device, non_blocking=True)
    y = y.to(device) if plan.config.num_classes > 0 else None
    if args["label_dropout"] > 0:
        null = plan.config.num_classes - 1
        y = drop_labels(y, null, args["label_dropout"], args["seed"], run.step, args["batch_size"], rows)
    t, noise, flip = step_draws(
        args["seed"], run.step, diffusion.num_timesteps, args["batch_size"], x0.shape[1:], hflip, rows, device
    )
    if flip is not None:
        x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(-1), x0)
    x_t = diffusion.q_sample(x0, t, noise)
    target = diffusion.target(x0, noise)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args["use_amp"]):
        output = run.model(x_t, diffusion.network_time(t), y)  # the recipe's time input (index, index + 1, t * 999)
    loss, parts = run.net.loss(output, target, weights[t], args["use_unweighted_loss"])

    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if args["grad_clip"] > 0:
        torch.nn.utils.clip_grad_norm_(run.params, args["grad_clip"])
    lr_now = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    if run.ema is not None:
        ema_update(run.ema, run.net, args["ema_decay"])
    run.step += 1
    return loss, parts, lr_now


def reduce_stats(loss, parts: dict, stop_requested: bool, world_size: int):
    """One collective per step: the losses (for the log and the NaN check) and whether any rank
    was asked to stop, so all ranks stop after the same step -> (mean values, stop now)."""
    stats = torch.stack([loss.detach(), *(v.detach() for v in parts.values())]).float()
    stats = torch.cat([stats, torch.tensor([float(stop_requested)], device=stats.device)])
    stats = distributed.all_reduce_sum(stats).tolist()
    return [v / world_size for v in stats[:-1]], stats[-1] > 0


def check_finite(values, step, checkpoint_path, saved_step) -> None:
    """A NaN or infinite loss stops the run without saving, keeping the last good checkpoint."""
    if all(math.isfinite(v) for v in values):
        return
    kept = (
        f"the last good checkpoint {checkpoint_path} (step {saved_step}) is kept"
        if saved_step is not None
        else "no checkpoint was written yet"
    )
    raise DuodiffError(f"loss became {values[0]} at step {step}; stopped without saving ({kept}); lower --lr or check the data")


class Progress:
    """The progress bar and the loss.csv rows (each the mean over its interval, and the speed)."""

    def __init__(self, n_steps, start_step, is_main):
        self.interactive, self.is_main = sys.stderr.isatty(), is_main
        self.bar = tqdm(
            total=n_steps, initial=start_step, desc="train", disable=not is_main, dynamic_ncols=True,
            mininterval=0.5 if self.interactive else 60,  # a Slurm log gets a bar line a minute, not ten a second
        )  # fmt: skip
        self.tick, self.ticked = time.perf_counter(), 0

    def advance(self) -> None:
        self.ticked += 1
        self.bar.update(1)

    def row(self, step, lr, names, interval) -> dict:
        now = time.perf_counter()
        row = {"step": step, "lr": lr, "steps_per_s": self.ticked / max(now - self.tick, 1e-9)}
        row.update({name: s / interval["n"] for name, s in zip(names, interval["sums"])})
        self.tick, self.ticked = now, 0
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", steps_per_s=f"{row['steps_per_s']:.2f}", lr=f"{lr:.2e}")
        if not self.interactive and self.is_main:  # batch jobs: one plain line per log step
            self.bar.write(", ".join(f"{k} {v:.6g}" for k, v in row.items()), file=sys.stderr)
        return row


def save_checkpoint(run: Run, plan: TrainPlan, args, log_path: Path) -> None:
    state = {
        "settings": plan.settings, "fingerprint": plan.fingerprint, "train_args": plan.train_args, "kind": plan.kind,
        "classifier_type": args["classifier_type"], "model_config": plan.model_config, "diffusion": plan.diffusion.config(),
        "model": cpu_state(run.net), "ema": cpu_state(run.ema) if run.ema is not None else None,
        "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
        "step": run.step, "rng": get_rng_states(), "history": run.history, "interval": run.interval,
    }  # fmt: skip
    checkpoints.save(state, log_path / CHECKPOINT_NAME, checkpoints.TRAIN_STATE_FORMAT)
    write_loss_csv(log_path / LOSS_NAME, run.history, plan.kind)


def finish(run: Run, plan: TrainPlan, args, log_path: Path, dist_info, start_step, resumed) -> dict:
    """model.pt (and loss.csv for a finished run rerun) -> the run's summary."""
    if start_step == args["n_steps"] and dist_info.is_main:
        write_loss_csv(log_path / LOSS_NAME, run.history, plan.kind)  # a finished run rerun: rewrite its outputs
    if dist_info.is_main:
        checkpoints.save_model(
            log_path / MODEL_NAME, kind=plan.kind, classifier_type=args["classifier_type"], model_config=plan.model_config,
            diffusion=plan.diffusion.config(), state_dict=cpu_state(run.net),
            ema_state_dict=cpu_state(run.ema) if run.ema is not None else None, step=run.step, train_args=plan.train_args,
        )  # fmt: skip
    distributed.barrier()
    return {
        "step": run.step, "resumed_from": start_step if resumed else None,
        "final_loss": run.history[-1]["loss"] if run.history else None,
        "model": str(log_path / MODEL_NAME), "loss_csv": str(log_path / LOSS_NAME),
    }  # fmt: skip


# ---- files ---------------------------------------------------------------------------------


def cpu_state(module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def write_loss_csv(path, history, kind):
    names = ["step", "loss", "lr", "steps_per_s", *(LOSS_PARTS if kind == "early_exit" else ())]
    write_csv(path, history, fieldnames=names)


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
    add_flag(p, "--beta-schedule", default="linear", help="linear (DDPM, U-ViT pixel models) | scaled_linear (U-ViT latent models)")
    add_diffusion_recipe_flags(p)
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
    add_flag(p, "--label-dropout", type=float, default=0.0, help="classifier-free guidance: the probability of "
             "replacing a label by the null class (the last class token; num_classes = classes + 1); 0: none")
    add_flag(p, "--latents", default=None, help="latent diffusion: train on this .npz of `duodiff encode` (never "
             "flipped: it holds the mirror images' latents) instead of the dataset's images")
    add_flag(p, "--restart", action="store_true", help=f"checkpoint.pt: {RESTART_HELP}")
    p.set_defaults(func=_cli)


def _cli(args) -> None:
    kwargs = {k: v for k, v in vars(args).items() if k not in ("command", "func") and not k.startswith("_")}
    nproc = kwargs.pop("nproc_per_node")
    check_int("--nproc-per-node", nproc, 0)
    world_size = distributed.from_env().world_size
    if nproc > 1 and world_size == 1:
        check_processes(kwargs, nproc)  # one clear line now, not one per rank after the launch
        process.relaunch_under_torchrun(nproc, ["train", *cli_flags(kwargs)])  # does not return
    require(
        nproc <= 1 or nproc == world_size,
        f"--nproc-per-node {nproc} contradicts the {world_size} processes torchrun started; give one or the other",
    )
    summary = run_train(**kwargs)
    if distributed.from_env().is_main:
        print(f"trained {summary['step']} steps -> {summary['model']}")
