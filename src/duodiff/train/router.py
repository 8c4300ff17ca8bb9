"""`duodiff train-router`: Learning-to-Cache's router (Ma, Fang, Mi, Wang, NeurIPS 2024, arXiv
2406.01733) for one frozen U-ViT and one sampling grid (sampler, steps, eta, guidance scale).

The router (models/router.py) holds one logit per (cache step, block, attention | MLP). L2C's
differentiable objective, per cache step s (1, 3, 5, ...):
  - the frozen model runs whole at step s - 1 of the teacher trajectory, leaving each layer's
    residual (the cache; no gradient);
  - the student runs at step s on the teacher's input, every layer's residual interpolated
    g * fresh + (1 - g) * cached with g = sigmoid(logit) (L2C's relaxed gate);
  - loss_s = sum over the output's elements of (student - teacher)^2, averaged over the batch
    (L2C's `sos`), + l1_weight * sum of the step's gates (L2C's router L1 term).
Each training step draws `--cache-steps-per-step` R of the cache steps (0: all of them), a batch
for each, and takes one optimiser step on the sum of their loss_s in one forward pass (each sample
carries its own step's gates): the rows share no parameter, so this is each drawn row's own L2C
step at once. R 1 is L2C's own loop (one step's states per iteration, 40,000 iterations on
ImageNet); a small study takes all: with one of 20 rows per step, 120 steps left the gates where
their random start put them, with all 20 the gates settle (near 0 or 1, or in between for the
layers whose reuse costs about the L1 weight) in about 100.
Only the logits learn (AdamW, no weight decay, as L2C's router optimiser).

The teacher trajectory: the frozen model samples `--n-trajectories` images with the set's own
sampler and steps (guided: both branches, as sampling runs them); each step's network input and
output are kept. L2C instead noises training images to x_s (q(x_s | x_0)) and takes one solver
step to x_{s+1}; drawing the states from the sampler itself needs no data set and holds for every
sampler of the study (DDIM, DPM-Solver++, ...), at the price of the states' variety (the pool).

Resumable as `duodiff train` is: FOLDER/checkpoint.pt (logits, optimiser, step, loss rows) with a
fingerprint of the model file's bytes and the settings; a rerun resumes it, a changed input is
refused naming what changed, `--restart` discards it. The per-step draws depend on (seed, step)
only, and the trajectory pool on the seed, so a resumed run ends where an uninterrupted one does.
-> FOLDER/router.pt, FOLDER/loss.csv (step, loss, data_loss, l1_loss, open_fraction).
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path

import torch

from duodiff.core.errors import check_choice, check_int, is_number, require
from duodiff.core.fingerprint import RESTART_HELP, check_state, fingerprint, remove_files
from duodiff.core.flags import add_flag
from duodiff.core.guidance import GuidedDenoiser, check_guidance_scale, guided_labels, label_classes, null_label
from duodiff.core.io import file_sha256, torch_save, write_csv
from duodiff.core.study import SAMPLERS
from duodiff.models.router import LAYERS_PER_BLOCK, ROUTER_FORMAT, ROUTER_VERSION, cache_steps, gates

LOSS_COLUMNS = ["step", "loss", "data_loss", "l1_loss", "open_fraction"]


class _Recorder:
    """The frozen model at every step, each step's input (x, t) and output kept (on the CPU)."""

    def __init__(self, model, y):
        self.model, self.y = model, y
        self.inputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.outputs: list[torch.Tensor] = []

    def __call__(self, x, t, step_index):
        assert step_index == len(self.outputs)
        out = self.model(x, t, self.y)
        self.inputs.append((x.detach().cpu(), t.detach().cpu()))
        self.outputs.append(out.detach().cpu())
        return out


def teacher_trajectories(model, diffusion, *, sampler, steps, eta, guidance_scale, null, n, batch_size, seed, device):
    """-> (xs (steps, N, ...), ts (steps, N), outputs (steps, N, ...), y (N,) or None): every step's
    network inputs and outputs of `n` samples (N = n, or 2n guided: both branches)."""
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    xs, ts, outs, ys = [], [], [], []
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        noise = torch.randn((count, config.in_chans, config.img_size, config.img_size), generator=generator)
        y = (torch.randint(label_classes(config.num_classes, null), (count,), generator=generator)
             if config.num_classes > 0 else None)  # fmt: skip
        inner_y = guided_labels(y, null) if guidance_scale != 0 else y
        recorder = _Recorder(model, None if inner_y is None else inner_y.to(device))
        denoiser = GuidedDenoiser(recorder, guidance_scale) if guidance_scale != 0 else recorder
        with torch.inference_mode():
            diffusion.sample(denoiser, noise.to(device), sampler, steps, eta=eta, generator=generator)
        xs.append(torch.stack([x for x, _ in recorder.inputs]))
        ts.append(torch.stack([t for _, t in recorder.inputs]))
        outs.append(torch.stack(recorder.outputs))
        ys.append(inner_y)
    y_all = None if ys[0] is None else torch.cat(ys)
    return torch.cat(xs, dim=1), torch.cat(ts, dim=1), torch.cat(outs, dim=1), y_all


def router_objective(model, logits_row, x_prev, t_prev, x, t, teacher, y=None, l1_weight=0.0, rows=None):
    """L2C's loss -> (loss, data_loss, l1_loss): the frozen model whole at the step before (the
    cache), the student at this step with every layer's residual g * fresh + (1 - g) * cached,
    g = sigmoid(logits_row). One cache step: logits_row (depth, 2), the data loss averaged over the
    batch. Several at once: logits_row (R, depth, 2) and `rows` (B,) the row of each sample; the
    data loss is averaged within each row and summed over the rows, the L1 term sums those rows'
    gates: the sum of the rows' own objectives."""
    with torch.no_grad():
        _, cache = model.forward_routed(x_prev, t_prev, y)
    g = gates(logits_row)
    per_sample = g if rows is None else g[rows]
    student, _ = model.forward_routed(x, t, y, cache=cache, gates=per_sample)
    errors = (student.float() - teacher.float()).square().flatten(1).sum(1)
    if rows is None:
        data_loss = errors.mean()
    else:
        counts = torch.bincount(rows, minlength=g.shape[0]).clamp(min=1).to(errors)
        data_loss = (torch.zeros(g.shape[0], dtype=errors.dtype, device=errors.device).index_add(0, rows, errors) / counts).sum()
    l1_loss = g.sum() if rows is None else g[torch.unique(rows)].sum()  # the drawn rows' gates only
    return data_loss + l1_weight * l1_loss, data_loss, l1_loss


def check_train_router_args(*, sampler, steps, eta, guidance_scale, n_trajectories, batch_size, n_steps, router_lr,
                            l1_weight, seed, log_every_n_steps, save_every_n_steps, cache_steps_per_step=0) -> None:
    check_choice("--sampler", sampler, SAMPLERS)
    check_int("--steps", steps, 2)  # step 0 never caches: a router needs a step 1
    require(is_number(eta) and eta >= 0, f"--eta must be >= 0; got {eta!r}")
    check_guidance_scale(guidance_scale)
    for flag, value, low in (("--n-trajectories", n_trajectories, 1), ("--batch-size", batch_size, 1),
                             ("--n-steps", n_steps, 1), ("--seed", seed, 0), ("--log-every-n-steps", log_every_n_steps, 1),
                             ("--cache-steps-per-step", cache_steps_per_step, 0),
                             ("--save-every-n-steps", save_every_n_steps, 1)):  # fmt: skip
        check_int(flag, value, low)
    require(is_number(router_lr) and router_lr > 0, f"--router-lr must be a positive number; got {router_lr!r}")
    require(is_number(l1_weight) and l1_weight >= 0, f"--l1-weight must be >= 0; got {l1_weight!r}")


def run_train_router(*, checkpoint_path, output_folder, sampler, steps, eta, guidance_scale, n_trajectories, batch_size,
                     n_steps, router_lr, l1_weight, seed, use_ema, device, log_every_n_steps, save_every_n_steps,
                     restart, cache_steps_per_step=0) -> dict:
    """Train the router of `checkpoint_path` for (sampler, steps) -> FOLDER/router.pt (its record)."""
    check_train_router_args(
        sampler=sampler, steps=steps, eta=eta, guidance_scale=guidance_scale, n_trajectories=n_trajectories,
        batch_size=batch_size, n_steps=n_steps, router_lr=router_lr, l1_weight=l1_weight, seed=seed,
        log_every_n_steps=log_every_n_steps, save_every_n_steps=save_every_n_steps,
        cache_steps_per_step=cache_steps_per_step,
    )  # fmt: skip
    from duodiff.core.distributed import default_device
    from duodiff.models.checkpoints import load_model

    dev = torch.device(device or default_device())
    model, diffusion, meta = load_model(checkpoint_path, use_ema=use_ema, device=dev)
    require(meta["kind"] == "uvit", f"--checkpoint-path {checkpoint_path}: train-router needs a uvit model; it holds {meta['kind']!r}")
    null = null_label(model.config.num_classes, meta)
    require(guidance_scale == 0 or null is not None,
            f"--guidance-scale {guidance_scale} needs a class-conditional model with a null class; {checkpoint_path} has none")
    diffusion.timesteps(sampler, steps)  # the grid's own checks (ddpm: steps = num_timesteps)
    model.eval().requires_grad_(False)

    folder = Path(output_folder)
    folder.mkdir(parents=True, exist_ok=True)
    state_path, router_path, loss_path = folder / "checkpoint.pt", folder / "router.pt", folder / "loss.csv"
    settings = {"sampler": sampler, "steps": steps, "eta": float(eta), "guidance_scale": float(guidance_scale),
                "n_trajectories": n_trajectories, "batch_size": batch_size, "n_steps": n_steps,
                "router_lr": float(router_lr), "l1_weight": float(l1_weight), "seed": seed, "use_ema": bool(use_ema),
                "cache_steps_per_step": cache_steps_per_step}
    # n_steps stays out: a longer run resumes a shorter one's state (the router has no schedule to end)
    current = fingerprint({"model weights": checkpoint_path}, {k: v for k, v in settings.items() if k != "n_steps"})
    rows = cache_steps(steps)
    logits = torch.nn.Parameter(torch.randn((len(rows), model.depth, LAYERS_PER_BLOCK),
                                            generator=torch.Generator().manual_seed(seed)).to(dev))  # L2C: randn
    optimizer = torch.optim.AdamW([logits], lr=router_lr, weight_decay=0.0)
    step, loss_rows = 0, []
    if state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if check_state(state.get("fingerprint"), current, f"checkpoint.pt in {folder}", restart,
                       remove_files(state_path, router_path, loss_path)):
            logits.data.copy_(state["logits"].to(dev))
            optimizer.load_state_dict(state["optimizer"])
            step, loss_rows = int(state["step"]), list(state["loss_rows"])
            print(f"duodiff train-router: resuming {folder} at step {step}", flush=True)

    started = time.perf_counter()
    xs, ts, outs, y = teacher_trajectories(model, diffusion, sampler=sampler, steps=steps, eta=eta,
                                           guidance_scale=guidance_scale, null=null, n=n_trajectories,
                                           batch_size=batch_size, seed=seed, device=dev)
    pool = xs.shape[1]
    batch = min(batch_size, pool)
    per_step = len(rows) if cache_steps_per_step == 0 else min(cache_steps_per_step, len(rows))

    def save_state() -> None:
        torch_save({"fingerprint": current, "logits": logits.detach().cpu(), "optimizer": optimizer.state_dict(),
                    "step": step, "loss_rows": loss_rows}, state_path)

    sums = torch.zeros(4, dtype=torch.float64)
    while step < n_steps:
        draw = torch.Generator().manual_seed(seed * 1_000_003 + step)  # (seed, step) alone: resumable
        # R of the cache steps (0: all), a batch of trajectories for each, stacked: row by row
        drawn = torch.randperm(len(rows), generator=draw)[:per_step].sort().values
        index = torch.stack([torch.randperm(pool, generator=draw)[:batch] for _ in drawn])  # (R, batch)
        now = torch.tensor(rows)[drawn][:, None].expand_as(index)
        before = now - 1
        row_of = drawn[:, None].expand_as(index).reshape(-1).to(dev)
        pick = lambda a, s: a[s.reshape(-1), index.reshape(-1)].to(dev)  # noqa: E731
        yb = None if y is None else y[index.reshape(-1)].to(dev)
        loss, data_loss, l1_loss = router_objective(
            model, logits, pick(xs, before), pick(ts, before), pick(xs, now), pick(ts, now), pick(outs, now), yb,
            l1_weight, rows=row_of)
        require(bool(torch.isfinite(loss)), f"train-router: the loss is not finite at step {step} (--router-lr {router_lr})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        sums += torch.tensor([loss.item(), data_loss.item(), l1_loss.item(), 1.0], dtype=torch.float64)
        if step % log_every_n_steps == 0 or step == n_steps:
            mean = (sums[:3] / sums[3]).tolist()
            open_fraction = float((gates(logits.detach()) > 0.5).double().mean())
            loss_rows.append(dict(zip(LOSS_COLUMNS, [step, *mean, open_fraction])))
            sums.zero_()
        if step % save_every_n_steps == 0 and step < n_steps:
            save_state()
    save_state()
    record = {
        "format": ROUTER_FORMAT, "version": ROUTER_VERSION, "logits": logits.detach().cpu().float(),
        "cache_steps": rows, "steps": steps, "sampler": sampler, "eta": float(eta),
        "guidance_scale": float(guidance_scale), "depth": model.depth,
        "model_sha256": file_sha256(checkpoint_path), "settings": settings,
    }  # fmt: skip
    torch_save(record, router_path)
    write_csv(loss_path, loss_rows, LOSS_COLUMNS)
    print(f"duodiff train-router: {router_path} ({n_steps} steps, {time.perf_counter() - started:.1f} s; "
          f"last loss {loss_rows[-1]['loss']:.4g})", flush=True)
    return record


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "train-router",
        help="train Learning-to-Cache's router for a frozen U-ViT and one sampling grid",
        description="Learning-to-Cache (arXiv 2406.01733): learn, per cache step and layer (attention, MLP), "
        "whether the layer may re-add its residual of the step before. Writes FOLDER/router.pt and loss.csv; "
        "rerunning the same command resumes FOLDER/checkpoint.pt.",
    )
    add_flag(parser, "--checkpoint-path", required=True, help="the frozen full U-ViT (model.pt)")
    add_flag(parser, "--output-folder", required=True, help="router.pt, loss.csv and checkpoint.pt go here")
    add_flag(parser, "--sampler", default="ddim", choices=SAMPLERS)
    add_flag(parser, "--steps", type=int, required=True, help="the sampling steps the router is for (one gate row per cache step)")
    add_flag(parser, "--eta", type=float, default=0.0)
    add_flag(parser, "--guidance-scale", type=float, default=0.0, help="the sample sets' guidance scale (both branches)")
    add_flag(parser, "--n-trajectories", type=int, default=256, help="teacher trajectories sampled once (the training states)")
    add_flag(parser, "--batch-size", type=int, default=64, help="states per cache step and training step (L2C: 64)")
    add_flag(parser, "--cache-steps-per-step", type=int, default=0,
             help="cache steps trained per training step (0: all of them; L2C: 1)")
    add_flag(parser, "--n-steps", type=int, default=500, help="router training steps (L2C U-ViT: 40,000 on ImageNet)")
    add_flag(parser, "--router-lr", type=float, default=1e-3, help="AdamW learning rate of the logits (L2C: 0.001)")
    add_flag(parser, "--l1-weight", type=float, default=0.1, help="weight of the gates' sum, the sparsity term (L2C: 0.1)")
    add_flag(parser, "--seed", type=int, default=0)
    add_flag(parser, "--no-ema", dest="use_ema", action="store_false", help="use the raw weights instead of the EMA weights")
    add_flag(parser, "--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    add_flag(parser, "--log-every-n-steps", type=int, default=50)
    add_flag(parser, "--save-every-n-steps", type=int, default=200)
    add_flag(parser, "--restart", action="store_true", help=f"checkpoint.pt: {RESTART_HELP}")
    parser.set_defaults(func=_main)


def _main(args) -> None:
    run_train_router(**{name: getattr(args, name) for name in inspect.signature(run_train_router).parameters})
