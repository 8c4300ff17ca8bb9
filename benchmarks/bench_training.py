"""Training speed and peak memory of every model kind: U-ViT full, U-ViT shallow and the early-exit
model with each probe type, on the architectures of config/models (random weights, random data).

Each case runs in a fresh Python process, so its peak memory is its own:
- CPU: resource.getrusage(RUSAGE_SELF).ru_maxrss of that process (tracemalloc does not see
  torch's allocations); the table shows the peak and the peak minus the process's size just
  before the first training step (interpreter, torch, model, EMA copy), which is what the steps
  add (activations, gradients, AdamW state);
- CUDA: torch.cuda.max_memory_allocated during the steps.

The step is the one `duodiff train` runs (duodiff/train/loop.py): q_sample, forward, the MSE or
DeeDiff loss (models/early_exit.py, early_exit_loss), backward, gradient clipping, AdamW, EMA update. Early
exit trains heads and probes on a frozen backbone, as the study does (--no-freeze-backbone to
train everything).

    python benchmarks/bench_training.py
    python benchmarks/bench_training.py --models digits --steps 20
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (before torch: sets THP_MEM_ALLOC_ENABLE)

from duodiff.core.errors import DuodiffError  # noqa: E402

DEFAULT_BATCH = {"cpu": "digits=64,cifar10=8", "cuda": "digits=128,cifar10=128"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_flags(p)
    p.add_argument("--models", type=common.csv_list(str), default=["digits", "cifar10"], help="config/models names")
    p.add_argument("--shallow-suffix", default="_d3")
    p.add_argument(
        "--batch-sizes", default=None,
        help=f"NAME=B,... per model (default {DEFAULT_BATCH['cpu']} on CPU, {DEFAULT_BATCH['cuda']} on CUDA)",
    )
    p.add_argument("--classifier-types", default="all")
    p.add_argument("--steps", type=int, default=3, help="timed training steps per case")
    p.add_argument("--warmup", type=int, default=1, help="untimed training steps first")
    p.add_argument("--clock", choices=sorted(common.CLOCKS), default="wall", help="cpu: process CPU time (see common.time_once)")
    p.add_argument("--no-freeze-backbone", action="store_true", help="early exit: train the backbone too")
    p.add_argument("--use-amp", action="store_true", help="bf16 autocast, as duodiff train --use-amp")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--weight-decay", type=float, default=0.03)
    p.add_argument("--betas", type=common.csv_list(float), default=[0.99, 0.999])
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--ema-decay", type=float, default=0.9999, help="0 = no EMA")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        raise DuodiffError(f"--steps must be >= 1 and --warmup >= 0; got {args.steps}, {args.warmup}")
    return args


def batch_sizes(text: str, models: list[str]) -> dict:
    sizes = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit() or int(value) < 1:
            raise DuodiffError(f"--batch-sizes takes NAME=B,...; got {item!r}")
        sizes[name.strip()] = int(value)
    missing = [m for m in models if m not in sizes]
    if missing:
        raise DuodiffError(f"--batch-sizes has no size for {', '.join(missing)}")
    return sizes


# ---- one case, in its own process ----------------------------------------------------------------


def run_case(case: dict) -> dict:
    import copy

    import torch
    import torch.nn.functional as F

    from duodiff.core.diffusion import GaussianDiffusion
    from duodiff.models import build_model
    from duodiff.models.early_exit import early_exit_loss
    from duodiff.train.optim import ema_update

    device = torch.device(case["device"])
    common.set_threads(case["threads"])
    full_cfg, shallow_cfg = common.model_configs(case["model"], case["shallow_suffix"])
    config = shallow_cfg if case["kind"] == "shallow" else full_cfg
    kind = "early_exit" if case["kind"] == "early_exit" else "uvit"
    torch.manual_seed(0)
    net = build_model(kind, config, classifier_type=case["classifier_type"]).to(device).train()
    if kind == "early_exit" and case["freeze_backbone"]:
        net.freeze_backbone()
    ema = copy.deepcopy(net).requires_grad_(False).eval() if case["ema_decay"] > 0 else None
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=case["lr"], betas=tuple(case["betas"]), weight_decay=case["weight_decay"])
    diffusion = GaussianDiffusion()
    B = case["batch"]
    g = torch.Generator().manual_seed(1)
    x0 = (torch.rand(B, net_in_chans(net), config["img_size"], config["img_size"], generator=g) * 2 - 1).to(device)

    def step():
        t = torch.randint(0, diffusion.num_timesteps, (B,), device=device)
        noise = torch.randn_like(x0)
        x_t = diffusion.q_sample(x0, t, noise)
        target = diffusion.target(x0, noise)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=case["use_amp"]):
            output = net(x_t, t)
        if kind == "early_exit":
            loss, _ = early_exit_loss(*output, target)
        else:
            loss = F.mse_loss(output.float(), target.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if case["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(params, case["grad_clip"])
        optimizer.step()
        if ema is not None:
            ema_update(ema, net, case["ema_decay"])
        return loss

    # The process's size before any step: interpreter, torch, model, EMA copy and data.
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(case["warmup"]):
        step()
    common.synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(case["steps"]):
        times.append(common.time_once(step, device, case["clock"]))
    result = {
        "step_s": common.median(times),
        "spread": common.spread(times),
        "parameters_trained": sum(p.numel() for p in params),
    }
    if device.type == "cuda":
        result["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        result["peak_added_mb"] = None
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        result["peak_mb"] = peak / 1024
        result["peak_added_mb"] = (peak - rss_before) / 1024
    return result


def net_in_chans(net):
    return (net.backbone if hasattr(net, "backbone") else net).in_chans


# ---- the driver --------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    if args.worker is not None:
        case = json.loads(args.worker)
        print(json.dumps(run_case(case)))
        return

    from tqdm.auto import tqdm

    device = common.pick_device(args.device)
    if args.clock == "cpu" and device.type != "cpu":
        raise DuodiffError("--clock cpu measures host CPU time; use --clock wall with --device cuda")
    threads = args.threads or common.available_cores()
    sizes = batch_sizes(args.batch_sizes or DEFAULT_BATCH[device.type], args.models)
    types = common.classifier_types(args.classifier_types)
    info = common.machine_info(device, threads)
    info.update(clock=args.clock, steps=args.steps, warmup=args.warmup, use_amp=args.use_amp, freeze_backbone=not args.no_freeze_backbone)
    print("# bench_training: " + ", ".join(f"{k}={v}" for k, v in info.items()))

    cases = []
    for name in args.models:
        common.model_configs(name, args.shallow_suffix)  # fail early on an unknown name
        kinds = [("full", None), ("shallow", None)] + [("early_exit", ct) for ct in types]
        for kind, ct in kinds:
            cases.append(
                {
                    "model": name, "kind": kind, "classifier_type": ct, "batch": sizes[name],
                    "device": str(device), "threads": threads, "shallow_suffix": args.shallow_suffix,
                    "steps": args.steps, "warmup": args.warmup, "use_amp": args.use_amp, "clock": args.clock,
                    "freeze_backbone": not args.no_freeze_backbone, "lr": args.lr, "betas": args.betas,
                    "weight_decay": args.weight_decay, "grad_clip": args.grad_clip, "ema_decay": args.ema_decay,
                }
            )
    rows = []
    for case in tqdm(cases, desc="training cases", disable=None):
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(case)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise RuntimeError(f"case {case['model']} {case['kind']} {case['classifier_type']} failed:\n{proc.stderr[-3000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        kind = case["kind"] if case["kind"] != "early_exit" else f"early_exit {case['classifier_type']}"
        if case["kind"] == "early_exit":
            kind += " (frozen backbone)" if case["freeze_backbone"] else ""
        rows.append(
            {
                "model": case["model"], "kind": kind, "batch": case["batch"],
                "trained params (M)": result["parameters_trained"] / 1e6,
                "steps/s": 1 / result["step_s"], "img/s": case["batch"] / result["step_s"],
                "range": result["spread"], "peak MB": result["peak_mb"],
                "added by steps MB": result["peak_added_mb"],
                "case wall s": time.perf_counter() - started,
            }
        )
    common.print_table("Training: steps/s and peak memory (one fresh process per case)", rows)
    if args.output:
        from duodiff.core.io import write_json

        write_json(args.output, {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows})


if __name__ == "__main__":
    try:
        main()
    except DuodiffError as error:
        print(f"bench_training: error: {error}", file=sys.stderr)
        sys.exit(2)
