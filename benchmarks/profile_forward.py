"""Where the time of one network evaluation goes: torch.profiler over the full U-ViT and the
early-exit forward pass (exits spread over the layers), grouped into matmul / attention /
elementwise and norms / indexing and copies / the rest, plus the top operators.

This is the evidence behind benchmarks/README.md's "what limits the speed-ups": a model whose
time is nearly all matmul cannot run faster than the matmul ceiling, and time outside the
groups FLOPs count (norms, GELU, residual adds, the early exit's indexing) is what makes the
measured speed-up fall short of the theoretical one.

    python benchmarks/profile_forward.py --model cifar10 --batch 64
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (before torch: sets THP_MEM_ALLOC_ENABLE)

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from duodiff.core.errors import DuodiffError  # noqa: E402
from duodiff.models.early_exit import EarlyExitUViT  # noqa: E402

# Operator name -> group. Matmuls are what FLOPs count; the rest is time they do not see.
GROUPS = {
    "matmul": ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::mkldnn_convolution", "aten::convolution"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_efficient_attention",
                  "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_cudnn_attention",
                  "aten::_softmax"),
    "norm / activation / add": ("aten::native_layer_norm", "aten::gelu", "aten::add", "aten::add_", "aten::mul",
                                "aten::sigmoid", "aten::mean", "aten::sub", "aten::div", "aten::clamp", "aten::gt",
                                "aten::le", "aten::cos", "aten::sin", "aten::exp"),
    "index / copy / cat": ("aten::index", "aten::index_put_", "aten::copy_", "aten::cat", "aten::nonzero",
                           "aten::sort", "aten::argsort", "aten::index_select", "aten::clone", "aten::contiguous"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_flags(p)
    p.add_argument("--model", default="cifar10", help="config/models name")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--classifier-type", default="mlp_probe_per_layer")
    p.add_argument("--spread-exits", type=common.csv_list(int), default=[1, -1], help="FIRST,LAST exit (-1 = depth)")
    p.add_argument("--top", type=int, default=12, help="operators listed per profile")
    return p.parse_args(argv)


def summarize(prof, total_label):
    events = prof.key_averages()
    total = sum(e.self_device_time_total if e.self_device_time_total else e.self_cpu_time_total for e in events)
    groups = {name: 0.0 for name in GROUPS}
    groups["other"] = 0.0
    for e in events:
        own = e.self_device_time_total if e.self_device_time_total else e.self_cpu_time_total
        for name, ops in GROUPS.items():
            if e.key in ops:
                groups[name] += own
                break
        else:
            groups["other"] += own
    rows = [{"profile": total_label, "group": name, "ms": us / 1e3, "share": us / total} for name, us in groups.items()]
    return rows


def main(argv=None):
    args = parse_args(argv)
    device = common.pick_device(args.device)
    threads = common.set_threads(args.threads)
    info = common.machine_info(device, threads)
    print("# profile_forward: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    full_cfg, _ = common.model_configs(args.model, "_d3")
    full = common.build("uvit", full_cfg, device)
    ct = common.classifier_types(args.classifier_type)[0]
    torch.manual_seed(2)
    ee = EarlyExitUViT(full, ct).to(device).eval()
    controls = common.ControlledExits(ee)
    x = torch.randn(args.batch, full.in_chans, full.img_size, full.img_size, generator=torch.Generator().manual_seed(0)).to(device)
    t = torch.full((args.batch,), full.num_timesteps // 2, dtype=torch.long, device=device)
    first, last = args.spread_exits
    last = full.depth if last < 0 else last
    if not 0 <= first <= last <= full.depth:
        raise DuodiffError(f"--spread-exits must satisfy 0 <= FIRST <= LAST <= depth ({full.depth}); got {args.spread_exits}")
    controls.widen(x, t)
    controls.calibrated(common.spread_plan(args.batch, first, last), x, t)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    runs = {
        "full": lambda: full(x, t),
        f"early_exit {ct} spread={first}..{last}": lambda: ee.forward_early_exit(x, t, common.ControlledExits.THRESHOLD),
    }
    summary = []
    with torch.inference_mode():
        for label, run in runs.items():
            run()  # warm-up
            common.synchronize(device)
            with profile(activities=activities) as prof:
                run()
                common.synchronize(device)
            sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            print(f"\n## {args.model}, batch {args.batch}: {label}\n")
            print(prof.key_averages().table(sort_by=sort, row_limit=args.top))
            summary += summarize(prof, label)
    common.print_table(f"{args.model}, batch {args.batch}: time by operator group", summary)


if __name__ == "__main__":
    try:
        main()
    except DuodiffError as error:
        print(f"profile_forward: error: {error}", file=sys.stderr)
        sys.exit(2)
