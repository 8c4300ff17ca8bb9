"""Sampling speed against theoretical cost: does each method run as fast as its FLOPs say?

For every architecture (--models: config/models/NAME.yaml and NAME_d3.yaml, random weights) and
batch size it prints

1. per network evaluation (one denoising step): images/s of the full U-ViT, the shallow U-ViT,
   early exit (forward_early_exit) with exits forced at several layers and with exits spread over
   the layers, for each probe type; the measured speed-up over the full model, the theoretical one
   (ratio of FLOPs from duodiff.metrics.flops) and their ratio, the efficiency. DuoDiff rows here are
   composed from the measured full and shallow times (a DuoDiff step *is* one of the two);
2. a short DDIM sampling loop through duodiff.core.diffusion.GaussianDiffusion.sample with the
   project's denoisers (full, shallow, DuoDiff at several t_switch, early exit), so the loop's own
   work (schedule arithmetic, clipping, exit bookkeeping) is in the time;
3. the full model's achieved GFLOP/s against a plain large matmul on the same device and threads,
   timed interleaved with the models (the practical ceiling).

Early exit with random weights needs a controlled exit pattern; common.ControlledExits gives each
exit its own threshold and leaves everything else to the model's code:
- "exit=k": every sample leaves at exit k (k = depth: none leaves, the probes' overhead alone);
- "spread": the samples' exits are spread evenly over exits --spread-exits FIRST..LAST; which
  sample leaves where is decided by its probe output, thresholds calibrated per batch (and, in
  the loop, per step) from one run of every exit, so the batch really shrinks layer by layer.
The FLOPs of an early-exit run are counted from the exits it actually took (per-exit LUT); the
LUT is checked against a direct FlopCounterMode count of a mixed-exit batch at start-up.

Timings: --warmup untimed calls, then --repeats timed calls per case, interleaved across cases;
the tables show the median and the relative spread (max - min) / median. Targets (checked at
--target-batch): efficiency >= 0.9 for DuoDiff (loop) and >= 0.8 for early exit, full-model
GFLOP/s >= 50% of the matmul's on CPU.

    python benchmarks/bench_sampling.py                       # everything, ~10 minutes on 2 CPU cores
    python benchmarks/bench_sampling.py --quick --models digits
    python benchmarks/bench_sampling.py --device cuda --loop-steps 50
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (before torch: sets THP_MEM_ALLOC_ENABLE)

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from duodiff.core.diffusion import GaussianDiffusion  # noqa: E402
from duodiff.sample.policies import DuoDiffDenoiser, EarlyExitDenoiser, ModelDenoiser  # noqa: E402
from duodiff.core.errors import DuodiffError  # noqa: E402
from duodiff.models.early_exit import EarlyExitUViT  # noqa: E402

EE_TARGET, DUODIFF_TARGET, CEILING_TARGET = 0.8, 0.9, 0.5


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_flags(p)
    p.add_argument("--models", type=common.csv_list(str), default=["digits", "cifar10"], help="config/models names")
    p.add_argument("--shallow-suffix", default="_d3", help="the shallow twin is config/models/NAME<suffix>.yaml")
    p.add_argument("--batch-sizes", type=common.csv_list(int), default=[1, 16, 64])
    p.add_argument("--classifier-types", default="all", help="'all' or a comma-separated list of probe types")
    p.add_argument("--primary-classifier", default="mlp_probe_per_layer", help="probe type of the forced-exit rows")
    p.add_argument(
        "--exit-fractions", type=common.csv_list(float), default=[0.5, 1.0],
        help="forced exits at round(fraction * depth); 1.0 = no early exit, the probes' overhead alone",
    )
    p.add_argument("--spread-exits", type=common.csv_list(int), default=[1, -1], help="FIRST,LAST exit of the spread pattern (-1 = depth)")
    p.add_argument("--loop-steps", type=int, default=10, help="DDIM steps of the sampling loop")
    p.add_argument("--t-switch-fractions", type=common.csv_list(float), default=[0.25, 0.5, 0.75])
    p.add_argument("--loop-batch-sizes", type=common.csv_list(int), default=None, help="default: --batch-sizes")
    p.add_argument(
        "--loop-budget-s", type=float, default=None,
        help="skip a loop table whose estimated time (from the per-evaluation medians) exceeds this "
        "(default 120 s on CPU, 600 s on CUDA)",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--clock", choices=sorted(common.CLOCKS), default="wall", help="cpu: process CPU time (see common.time_once)")
    p.add_argument("--compile", action="store_true", help="torch.compile every U-ViT block (all methods share them)")
    p.add_argument("--matmul-size", type=int, default=None, help="N of the N x N x N ceiling matmul (default 2048 CPU, 8192 CUDA)")
    p.add_argument("--target-batch", type=int, default=64, help="batch size at which the targets are checked")
    p.add_argument(
        "--quick", action="store_true",
        help="short run: batch sizes 1 and --target-batch, 2 repeats, primary probe type only, forced exit at "
        "depth/2 only, t_switch at 1/2",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.batch_sizes = sorted({1, args.target_batch})
        args.repeats = min(args.repeats, 2)
        args.classifier_types = args.primary_classifier
        args.exit_fractions = [0.5]
        args.t_switch_fractions = [0.5]
    args.classifier_types = common.classifier_types(args.classifier_types)
    common.classifier_types(args.primary_classifier)
    if args.primary_classifier not in args.classifier_types:
        args.classifier_types.insert(0, args.primary_classifier)
    for name in ("repeats", "loop_steps"):
        if getattr(args, name) < 1:
            raise DuodiffError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if args.warmup < 0:
        raise DuodiffError(f"--warmup must be >= 0; got {args.warmup}")
    for f in args.exit_fractions + args.t_switch_fractions:
        if not 0 <= f <= 1:
            raise DuodiffError(f"fractions must be in [0, 1]; got {f}")
    if len(args.spread_exits) != 2:
        raise DuodiffError(f"--spread-exits takes FIRST,LAST; got {args.spread_exits}")
    if any(b < 1 for b in args.batch_sizes):
        raise DuodiffError(f"--batch-sizes must be >= 1; got {args.batch_sizes}")
    if args.loop_batch_sizes is None:
        args.loop_batch_sizes = args.batch_sizes
    return args


class PlannedExitDenoiser(EarlyExitDenoiser):
    """The project's EarlyExitDenoiser with per-step exit thresholds (ControlledExits) set first.

    With `plan` given instead of thresholds it calibrates them at every step (one run of every
    exit on that step's x_t) and records them, for the timed runs that follow."""

    def __init__(self, model, controls, thresholds_per_step=None, plan=None):
        super().__init__(model, threshold=common.ControlledExits.THRESHOLD)
        self.controls = controls
        self.thresholds_per_step = thresholds_per_step if thresholds_per_step is not None else []
        self.plan = plan

    def __call__(self, x, t, step_index):
        if self.plan is not None:
            self.controls.calibrated(self.plan, x, t)
            self.thresholds_per_step.append(self.controls.thresholds)
        else:
            self.controls.thresholds = self.thresholds_per_step[step_index]
        return super().__call__(x, t, step_index)


class Bench:
    """One architecture: the models, their FLOPs, and the tables."""

    def __init__(self, name, args, device):
        self.name, self.args, self.device = name, args, device
        full_cfg, shallow_cfg = common.model_configs(name, args.shallow_suffix)
        self.full = common.build("uvit", full_cfg, device, seed=0)
        self.shallow = common.build("uvit", shallow_cfg, device, seed=1)
        self.depth, self.shallow_depth = self.full.depth, self.shallow.depth
        self.T = self.full.num_timesteps
        torch.manual_seed(2)
        # The early-exit models wrap the full model itself: no copy of the backbone's weights.
        self.ee = {
            ct: EarlyExitUViT(self.full, ct).to(device).eval()
            for ct in args.classifier_types
        }
        self.controls = {ct: common.ControlledExits(model) for ct, model in self.ee.items()}
        x, t = self.inputs(16, seed=4)
        for controls in self.controls.values():
            controls.widen(x, t)
        if args.compile:
            for model in (self.full, self.shallow):
                for i in range(model.depth):
                    model.block(i).compile()
        self.flops_full = common.network_flops(full_cfg, self.T)
        self.flops_shallow = common.network_flops(shallow_cfg, self.T)
        self.luts = {ct: common.exit_lut(full_cfg, ct, self.T) for ct in self.ee}
        for ct, model in self.ee.items():
            common.check_exit_flops_lut(model, self.controls[ct], self.luts[ct], device)
        first, last = args.spread_exits
        self.spread = (first, self.depth if last < 0 else last)
        if not 0 <= self.spread[0] <= self.spread[1] <= self.depth:
            raise DuodiffError(f"--spread-exits must satisfy 0 <= FIRST <= LAST <= depth ({self.depth}); got {args.spread_exits}")
        self.forced = sorted({round(f * self.depth) for f in args.exit_fractions})
        self.per_eval = {}  # batch -> {case: median seconds}
        self.notes = []

    def inputs(self, batch, seed=0):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, self.full.in_chans, self.full.img_size, self.full.img_size, generator=g).to(self.device)
        t = torch.full((batch,), self.T // 2, dtype=torch.long, device=self.device)
        return x, t

    # ---- one network evaluation ----------------------------------------------------------------

    def per_eval_table(self, batch, matmul):
        args = self.args
        x, t = self.inputs(batch)
        plan = common.spread_plan(batch, *self.spread)
        cases, flops, exits = {}, {}, {}

        def ee_case(ct, label, thresholds):
            model, controls = self.ee[ct], self.controls[ct]

            def run():
                controls.thresholds = thresholds
                _, exit_layer = model.forward_early_exit(x, t, common.ControlledExits.THRESHOLD)
                exits[label] = exit_layer

            cases[label] = run

        cases["full"] = lambda: self.full(x, t)
        cases["shallow"] = lambda: self.shallow(x, t)
        flops["full"], flops["shallow"] = batch * self.flops_full, batch * self.flops_shallow
        primary = args.primary_classifier
        for k in self.forced:
            self.controls[primary].forced(k)
            ee_case(primary, f"early_exit {primary} exit={k}", self.controls[primary].thresholds)
        for ct in self.ee:
            self.controls[ct].calibrated(plan, x, t)
            ee_case(ct, f"early_exit {ct} spread={self.spread[0]}..{self.spread[1]}", self.controls[ct].thresholds)
        cases["matmul"] = matmul["run"]

        bar = tqdm(total=len(cases) * (args.warmup + args.repeats), desc=f"{self.name} b={batch} per-eval", leave=False, disable=None)
        times = common.measure(cases, self.device, args.repeats, args.warmup, args.clock, progress=bar)
        bar.close()
        for label, exit_layer in exits.items():
            ct = label.split()[1]
            flops[label] = common.lut_flops(self.luts[ct], exit_layer)
            if "spread=" in label and sorted(exit_layer.tolist()) != sorted(plan.tolist()):
                self.notes.append(f"{self.name} b={batch} {label}: exits differ from the plan (FLOPs counted from the real ones)")
        med = {label: common.median(v) for label, v in times.items()}
        self.per_eval[batch] = med

        rows = []
        for label in cases:
            if label == "matmul":
                continue
            method, _, setting = label.partition(" ")
            mean_exit = float(exits[label].float().mean()) if label in exits else (self.shallow_depth if label == "shallow" else self.depth)
            rows.append(self.row(method, setting, batch, mean_exit, flops[label], med[label], times[label], flops["full"], med["full"]))
        # DuoDiff runs the shallow or the full network at each step: its per-step cost is a mix.
        steps = args.loop_steps
        for f in args.t_switch_fractions:
            ts = round(f * steps)
            time_mix = (ts * med["shallow"] + (steps - ts) * med["full"]) / steps
            flops_mix = (ts * flops["shallow"] + (steps - ts) * flops["full"]) / steps
            depth_mix = (ts * self.shallow_depth + (steps - ts) * self.depth) / steps
            row = self.row("duodiff", f"t_switch={ts}/{steps} (composed)", batch, depth_mix, flops_mix, time_mix, None, flops["full"], med["full"])
            row["target"] = self.verdict(batch, row["efficiency"], DUODIFF_TARGET)
            rows.append(row)
        ceiling = {
            "model": self.name, "batch": batch,
            "full GFLOP/s": batch * self.flops_full / med["full"] / 1e9,
            "matmul GFLOP/s": matmul["flops"] / med["matmul"] / 1e9,
        }
        ceiling["fraction"] = ceiling["full GFLOP/s"] / ceiling["matmul GFLOP/s"]
        ceiling["target"] = self.verdict(batch, ceiling["fraction"], CEILING_TARGET) if self.device.type == "cpu" else "-"
        return rows, ceiling

    def row(self, method, setting, batch, mean_exit, flops, seconds, samples, flops_full, seconds_full):
        theory = flops_full / flops
        measured = seconds_full / seconds
        efficiency = measured / theory
        target = {"early_exit": EE_TARGET}.get(method)
        return {
            "model": self.name, "batch": batch, "method": method, "setting": setting or "-",
            "mean exit": mean_exit, "GFLOP/img": flops / batch / 1e9,
            "ms/batch": seconds * 1e3, "img/s": batch / seconds,
            "range": common.spread(samples) if samples else None,
            "speed-up": measured, "theory": theory, "efficiency": efficiency,
            "target": self.verdict(batch, efficiency, target) if target else "-",
        }

    def verdict(self, batch, value, target):
        if batch != self.args.target_batch:
            return "-"
        return f"{'PASS' if value >= target else 'FAIL'} (>= {target})"

    # ---- a short sampling loop -----------------------------------------------------------------

    def loop_table(self, batch, diffusion):
        args = self.args
        steps = args.loop_steps
        med = self.per_eval[batch]
        budget = args.loop_budget_s if args.loop_budget_s is not None else (120.0 if self.device.type == "cpu" else 600.0)
        switches = sorted({round(f * steps) for f in args.t_switch_fractions})
        # Estimated from the per-evaluation medians: full, shallow, each DuoDiff, each early-exit
        # (with its calibration pass, ~ one full step per step).
        per_call = [steps * med["full"], steps * med["shallow"]]
        per_call += [ts * med["shallow"] + (steps - ts) * med["full"] for ts in switches]
        # Early exit in the loop with the primary probe type only: the types differ in their
        # per-evaluation cost, which the per-evaluation table already shows.
        primary = args.primary_classifier
        spread_labels = [label for label in med if "spread=" in label and label.split()[1] == primary]
        per_call += [steps * med[label] for label in spread_labels]
        estimate = sum(per_call) * (args.warmup + args.repeats) + len(spread_labels) * steps * med["full"]
        if estimate > budget:
            return None, f"{self.name} b={batch}: loop skipped, estimated {estimate:.0f} s > --loop-budget-s {budget:.0f}"

        x_T, _ = self.inputs(batch, seed=1)
        cases, flops, exits = {}, {}, {}
        cases["full"] = lambda: diffusion.sample(ModelDenoiser(self.full), x_T, "ddim", steps)
        cases["shallow"] = lambda: diffusion.sample(ModelDenoiser(self.shallow), x_T, "ddim", steps)
        flops["full"], flops["shallow"] = steps * batch * self.flops_full, steps * batch * self.flops_shallow
        for ts in switches:
            label = f"duodiff t_switch={ts}/{steps}"
            cases[label] = lambda ts=ts: diffusion.sample(DuoDiffDenoiser(self.shallow, self.full, ts, steps=steps), x_T, "ddim", steps)
            flops[label] = batch * (ts * self.flops_shallow + (steps - ts) * self.flops_full)
        plan = common.spread_plan(batch, *self.spread)
        for ct, model in [(primary, self.ee[primary])]:
            label = f"early_exit {ct} spread={self.spread[0]}..{self.spread[1]}"
            calibration = PlannedExitDenoiser(model, self.controls[ct], plan=plan)
            diffusion.sample(calibration, x_T, "ddim", steps)

            def run(model=model, ct=ct, label=label, per_step=calibration.thresholds_per_step):
                denoiser = PlannedExitDenoiser(model, self.controls[ct], thresholds_per_step=per_step)
                diffusion.sample(denoiser, x_T, "ddim", steps)
                exits[label] = denoiser  # its exit layers are read after the timing

            cases[label] = run

        # The loop's own work: the same loop around a denoiser that returns a fixed output.
        fixed = torch.zeros_like(x_T)
        cases["loop alone"] = lambda: diffusion.sample(lambda x, t, i: fixed, x_T, "ddim", steps)

        bar = tqdm(total=len(cases) * (args.warmup + args.repeats), desc=f"{self.name} b={batch} loop", leave=False, disable=None)
        times = common.measure(cases, self.device, args.repeats, args.warmup, args.clock, progress=bar)
        bar.close()
        loop_alone = common.median(times.pop("loop alone"))
        del cases["loop alone"]
        exits = {label: denoiser.exit_layers for label, denoiser in exits.items()}
        for label, layers in exits.items():
            flops[label] = common.lut_flops(self.luts[label.split()[1]], layers)
            if any(sorted(step.tolist()) != sorted(plan.tolist()) for step in layers):
                self.notes.append(f"{self.name} b={batch} loop {label}: exits differ from the plan at some steps (FLOPs counted from the real ones)")
        med_loop = {label: common.median(v) for label, v in times.items()}
        rows = []
        for label in cases:
            method, _, setting = label.partition(" ")
            if label in exits:
                mean_exit = float(exits[label].float().mean())
            elif method == "duodiff":
                ts = int(setting.split("=")[1].split("/")[0])
                mean_exit = (ts * self.shallow_depth + (steps - ts) * self.depth) / steps
            else:
                mean_exit = self.shallow_depth if method == "shallow" else self.depth
            row = self.row(method, setting, batch, mean_exit, flops[label], med_loop[label], times[label], flops["full"], med_loop["full"])
            row["GFLOP/img"] = flops[label] / batch / 1e9  # the whole loop
            row["ms/batch"] = med_loop[label] * 1e3
            if method == "duodiff":
                row["target"] = self.verdict(batch, row["efficiency"], DUODIFF_TARGET)
            # The loop's own cost: the loop without a network against the loop with it.
            row["loop share"] = loop_alone / med_loop[label]
            rows.append(row)
        return rows, None


def make_matmul(device, size):
    g = torch.Generator().manual_seed(3)
    a = torch.randn(size, size, generator=g).to(device)
    b = torch.randn(size, size, generator=g).to(device)
    return {"run": lambda: a @ b, "flops": 2 * size**3}


def main(argv=None):
    args = parse_args(argv)
    device = common.pick_device(args.device)
    if args.clock == "cpu" and device.type != "cpu":
        raise DuodiffError("--clock cpu measures host CPU time; use --clock wall with --device cuda")
    threads = common.set_threads(args.threads)
    info = common.machine_info(device, threads)
    info.update(clock=args.clock, compile=args.compile, repeats=args.repeats, warmup=args.warmup)
    print("# bench_sampling: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    matmul = make_matmul(device, args.matmul_size or (2048 if device.type == "cpu" else 8192))
    diffusion = GaussianDiffusion()

    per_eval_rows, loop_rows, ceiling_rows, notes = [], [], [], []
    with torch.inference_mode():
        for name in args.models:
            bench = Bench(name, args, device)
            for batch in args.batch_sizes:
                rows, ceiling = bench.per_eval_table(batch, matmul)
                per_eval_rows += rows
                ceiling_rows.append(ceiling)
                common.print_table(f"{name}, batch {batch}: one network evaluation", rows)
            for batch in args.loop_batch_sizes:
                if batch not in bench.per_eval:
                    notes.append(f"{name} b={batch}: loop skipped, batch not in --batch-sizes")
                    continue
                rows, note = bench.loop_table(batch, diffusion)
                if note:
                    notes.append(note)
                    print(f"\n{note}")
                    continue
                loop_rows += rows
                common.print_table(f"{name}, batch {batch}: DDIM loop of {args.loop_steps} steps", rows)
            notes += bench.notes
            del bench
    common.print_table("Full model vs a plain matmul (practical ceiling)", ceiling_rows)
    summary = [r for r in per_eval_rows + loop_rows + ceiling_rows if r.get("target", "-") != "-"]
    print("\n## Targets at batch %d\n" % args.target_batch)
    for r in summary:
        what = f"{r['model']} {r.get('method', 'full vs matmul')} {r.get('setting', '')}".strip()
        value = r.get("efficiency", r.get("fraction"))
        print(f"- {what}: {value:.3f} {r['target']}")
    for note in notes:
        print(f"- note: {note}")
    if args.output:
        from duodiff.core.io import write_json

        write_json(
            args.output,
            {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "per_eval": per_eval_rows,
             "loop": loop_rows, "ceiling": ceiling_rows, "notes": notes},
        )


if __name__ == "__main__":
    try:
        main()
    except DuodiffError as error:
        print(f"bench_sampling: error: {error}", file=sys.stderr)
        sys.exit(2)
