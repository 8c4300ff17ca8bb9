"""Shared pieces of the benchmark scripts: device and threads, timing, FLOP counting, early-exit
models with a controlled exit pattern, the machine description and table printing.

Import this module before torch: it turns on PyTorch's transparent-huge-page allocation for CPU
tensors (THP_MEM_ALLOC_ENABLE, read once at the first allocation). Without it every large
activation (the MLP's 4x-wide hidden layer of U-ViT-S/2 at batch 64 is 135 MB) is a fresh mmap
that is page-faulted in 4 KiB pages on every forward pass, which costs ~15-20% of a large matmul
on this machine (see README.md). Set THP_MEM_ALLOC_ENABLE=0 in the environment to measure without it.
"""

from __future__ import annotations

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from duodiff.core.errors import DuodiffError  # noqa: E402
from duodiff.metrics import flops as flops_lib  # noqa: E402
from duodiff.models import CLASSIFIER_TYPES, build_model, load_model_config  # noqa: E402
from duodiff.models.early_exit import pool_tokens  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODEL_DIR = REPO / "config" / "models"


# ---- command line -------------------------------------------------------------------------------


def csv_list(kind):
    """argparse type for comma-separated lists: '1,16,64' -> [1, 16, 64]."""

    def parse(text):
        try:
            return [kind(item) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from None

    return parse


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (cuda when present, else cpu), cpu or cuda")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: all cores this process may use)"
    )
    parser.add_argument("--output", type=Path, default=None, help="also write the results as JSON to this file")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise DuodiffError(f"--device must be auto, cpu or cuda; got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise DuodiffError("--device cuda: no CUDA device is visible to torch")
    return torch.device(name)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def set_threads(threads: int | None) -> int:
    threads = available_cores() if threads is None else threads
    if threads < 1:
        raise DuodiffError(f"--threads must be >= 1; got {threads}")
    torch.set_num_threads(threads)
    return threads


def model_configs(name: str, shallow_suffix: str) -> tuple[dict, dict]:
    """'cifar10' -> the configs of config/models/cifar10.yaml and cifar10<suffix>.yaml."""
    full, shallow = MODEL_DIR / f"{name}.yaml", MODEL_DIR / f"{name}{shallow_suffix}.yaml"
    for path in (full, shallow):
        if not path.is_file():
            known = sorted(p.stem for p in MODEL_DIR.glob("*.yaml") if (MODEL_DIR / f"{p.stem}{shallow_suffix}.yaml").is_file())
            raise DuodiffError(f"--models {name}: {path} does not exist; known: {', '.join(known)}")
    return load_model_config(full), load_model_config(shallow)


# ---- timing ------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_once(fn, device: torch.device, clock: str = "wall") -> float:
    """Seconds for one call of fn(), the device queue drained before and after.

    clock 'cpu' is this process's CPU time: on a machine shared with other jobs it is not
    inflated by time slices given to them, which makes single-threaded CPU figures repeatable;
    with several threads it also counts OpenMP threads spinning while they wait.
    """
    now = CLOCKS[clock]
    synchronize(device)
    start = now()
    fn()
    synchronize(device)
    return now() - start


def measure(cases: dict, device: torch.device, repeats: int, warmup: int, clock: str = "wall", progress=None) -> dict:
    """Time every case `repeats` times -> {name: [seconds, ...]}.

    The cases are interleaved (every repeat runs each case once, starting one case later each
    time), so a change in machine load during the run affects all cases alike and the ratios
    between them stay meaningful on a shared machine. Warm-up calls (lazy initialisation, first
    touch of memory, CUDA kernel selection) are not timed.
    """
    names = list(cases)
    for name in names:
        for _ in range(warmup):
            cases[name]()
        if progress is not None:
            progress.update(1)
    times = {name: [] for name in names}
    for r in range(repeats):
        for j in range(len(names)):
            name = names[(j + r) % len(names)]
            times[name].append(time_once(cases[name], device, clock))
            if progress is not None:
                progress.update(1)
    return times


def median(values):
    return statistics.median(values) if values else float("nan")


def spread(values):
    """Relative spread of repeated timings: (max - min) / median."""
    if len(values) < 2:
        return float("nan")
    return (max(values) - min(values)) / statistics.median(values)


# ---- FLOPs -------------------------------------------------------------------------------------
# Theoretical costs come from duodiff.metrics.flops, the same counts the study's gflops.json uses:
# FlopCounterMode at batch 1, 2 FLOPs per multiply-add, attention's QK^T and AV included ("total").


def network_flops(config: dict, num_timesteps: int = 1000) -> int:
    """FLOPs per image of one U-ViT forward pass."""
    return flops_lib.network_cost(flops_lib.model_costs("uvit", config, num_timesteps))["total"]


def exit_lut(config: dict, classifier_type: str, num_timesteps: int = 1000) -> list[int]:
    """FLOPs per image of an early-exit forward pass that leaves at exit k, k = 0..depth."""
    costs = flops_lib.model_costs("early_exit", config, num_timesteps, classifier_type)
    return [entry["total"] for entry in flops_lib.exit_lut(costs)]


def lut_flops(lut: list[int], exit_layers: torch.Tensor) -> int:
    """Total FLOPs of samples that left at `exit_layers` (any shape). Every op of the early-exit
    forward is per sample, so a batch costs the sum of its samples' LUT entries."""
    table = torch.tensor(lut, dtype=torch.float64)
    return int(table[exit_layers.cpu().long()].sum().item())


# ---- early exit with a controlled exit pattern -------------------------------------------------


class ControlledExits:
    """Make an early-exit model with random weights leave at planned exits, running its real code.

    Freshly initialised probes answer u ~ 0.5 for every sample and exit, so a threshold alone
    gives no meaningful exit pattern. Instead each exit i gets its own threshold thr_i and the
    model's `probe` is wrapped so that after the real probe has run (its full cost is paid),
    it returns u_i + 0.5 - thr_i, which forward_early_exit's rule "<= 0.5" turns into
    u_i <= thr_i. Nothing else changes: the compaction, the heads and the blocks are the
    model's own code.

    - forced(k): thr_i = -1 for i < k and 2 for i >= k: every sample leaves at exit k
      (k = depth: no sample leaves early; that measures the probes' overhead).
    - calibrated(plan, x, t): per-sample exits that follow `plan` (an exit layer per sample):
      one run of every exit gives every sample's u_i; going through the exits in order, thr_i is
      placed between the u_i of the samples still running so that the planned number of them
      leaves at exit i (which samples leave is decided by u, as in a trained model).
    - widen(x, t): at initialisation the probes' logits differ between samples by ~1e-3 around
      an offset up to ~100x larger, too little for float32 u to rank 64 samples; rescaling each
      probe's last linear layer (the FLOPs are unchanged) centres its logits and spreads them to
      a standard deviation of 1, so u stays well inside (0, 1).
    """

    THRESHOLD = 0.5

    def __init__(self, model):
        self.model = model
        self.thresholds = [2.0] * model.depth
        self.raw = False  # True while calibrating: the wrapper passes the real u through
        real_probe = model.probe  # the class's bound method

        def probe(i, tokens, t):
            u = real_probe(i, tokens, t)
            # One cheap op on (B,): u + 0.5 - thr_i <= 0.5 exactly when u <= thr_i.
            return u if self.raw else u + (self.THRESHOLD - self.thresholds[i])

        model.probe = probe  # instance attribute: forward_early_exit's self.probe(...) finds it

    @torch.inference_mode()
    def uncertainties(self, x, t) -> torch.Tensor:
        """u (B, depth) of every exit, from one forward pass that runs them all."""
        self.raw = True
        try:
            _, u = self.model.forward(x, t)
        finally:
            self.raw = False
        return u.double().cpu()

    @torch.inference_mode()
    def widen(self, x, t) -> None:
        """Rescale each probe's last linear layer so that its logits over the batch (x, t) have
        mean 0 and standard deviation 1 (per exit; per exit and timestep for the banks)."""
        probes = self.model.probes
        captured = []  # (exit or bank, the last layer's input features (B, H))
        if isinstance(probes, torch.nn.ModuleList):  # one MLP / attention probe per exit
            hooks = [
                p.fc2.register_forward_hook(lambda m, args, out, i=i: captured.append((i, args[0])))
                for i, p in enumerate(probes)
            ]
        else:  # per-timestep banks: probes(bank, tokens, t), a linear probe on the pooled tokens
            if probes.hidden != 0:
                raise DuodiffError("ControlledExits.widen supports linear timestep banks (bank_hidden = 0) only")
            hooks = [probes.register_forward_hook(lambda m, args, out: captured.append((args[0], pool_tokens(args[1]))))]
        try:
            self.uncertainties(x, t)
        finally:
            for hook in hooks:
                hook.remove()
        if isinstance(probes, torch.nn.ModuleList):
            for i, features in captured:
                fc2 = probes[i].fc2
                z = features.double() @ fc2.weight[0].double()  # logits without the bias
                scale = 1.0 / z.std().clamp_min(1e-12)
                fc2.weight.mul_(scale.item())
                fc2.bias.fill_(-(z.mean() * scale).item())
        else:
            features = {}
            for bank, f in captured:  # the shared bank sees the features of every exit
                features.setdefault(bank, []).append(f)
            for bank, f in features.items():
                z = torch.cat(f).double() @ probes.weight[bank].double().T  # (samples, T)
                std = z.std(dim=0).clamp_min(1e-12)
                probes.weight[bank].div_(std[:, None].to(probes.weight.dtype))
                probes.bias[bank].copy_(-z.mean(dim=0) / std)

    def forced(self, k: int) -> None:
        depth = self.model.depth
        if not 0 <= k <= depth:
            raise DuodiffError(f"exit layer must be in [0, {depth}]; got {k}")
        self.thresholds = [-1.0 if i < k else 2.0 for i in range(depth)]

    def calibrated(self, plan: torch.Tensor, x, t) -> None:
        depth = self.model.depth
        u = self.uncertainties(x, t)
        counts = torch.bincount(plan.long().cpu(), minlength=depth + 1)
        running = torch.ones(u.shape[0], dtype=torch.bool)
        thresholds = []
        for i in range(depth):
            n_leave = int(counts[i])
            values = u[running, i].sort().values
            if n_leave == 0:
                thr = -1.0
            elif n_leave >= len(values):
                thr = 2.0
            else:  # half-way between the last sample that leaves and the first that stays
                thr = (values[n_leave - 1].item() + values[n_leave].item()) / 2
            thresholds.append(thr)
            running &= ~(u[:, i] <= thr)
        self.thresholds = thresholds


def spread_plan(batch: int, first: int, last: int) -> torch.Tensor:
    """Exit layers for `batch` samples spread evenly over exits first..last (inclusive)."""
    if batch == 1:
        return torch.tensor([(first + last) // 2])
    return torch.tensor([first + (last - first) * j // (batch - 1) for j in range(batch)])


def check_exit_flops_lut(model, controls: ControlledExits, lut, device) -> None:
    """The work counted must be the work run: the per-exit table (from the model's pieces) must add
    up to a direct FlopCounterMode count of forward_early_exit on a batch with mixed exits, so the
    compacted forward pass neither skips nor repeats anything the table assumes."""
    b = model.backbone
    batch = 5
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, b.in_chans, b.img_size, b.img_size, generator=g).to(device)
    t = torch.full((batch,), b.num_timesteps // 2, dtype=torch.long, device=device)
    plan = spread_plan(batch, 1, model.depth)
    controls.calibrated(plan, x, t)
    with torch.inference_mode():
        (_, exits), cost = flops_lib.count(lambda: model.forward_early_exit(x, t, ControlledExits.THRESHOLD))
    counted = cost["total"]
    expected = lut_flops(lut, exits)
    if counted != expected:
        raise RuntimeError(f"exit FLOP table disagrees with a direct count: {expected} != {counted} (exits {exits.tolist()})")


def build(kind: str, config: dict, device, classifier_type: str | None = None, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(kind, config, classifier_type=classifier_type).to(device).eval()


def classifier_types(text: str) -> list[str]:
    if text == "all":
        return list(CLASSIFIER_TYPES)
    chosen = [c for c in text.split(",") if c]
    unknown = [c for c in chosen if c not in CLASSIFIER_TYPES]
    if unknown:
        raise DuodiffError(f"--classifier-types: unknown {', '.join(unknown)}; allowed: all, {', '.join(CLASSIFIER_TYPES)}")
    return chosen


# ---- the machine -------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device, threads: int) -> dict:
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host_cpu": cpu_model(),
        "cores_available": available_cores(),
        "torch_threads": threads,
        "torch": torch.__version__,
        "device": str(device),
        "thp_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def print_table(title: str, rows: list[dict], floatfmt=".3g") -> None:
    from tabulate import tabulate

    print(f"\n## {title}\n")
    if not rows:
        print("(no rows)")
        return
    print(tabulate(rows, headers="keys", tablefmt="github", floatfmt=floatfmt, missingval="-"))
