"""Theoretical cost: FLOPs per network evaluation, per exit, and per sample set.

Counting. `torch.utils.flop_counter.FlopCounterMode` counts the matrix products and
convolutions that really run, for a batch of one image at the model's resolution; nothing is
counted by hand. Its convention is 2 FLOPs per multiply-add (an (m x k) @ (k x n) product is
2mkn FLOPs; a convolution is 2 x its multiply-adds; bias adds, norms, activations and softmax are
not counted). Tools such as fvcore and thop count multiply-adds ("MACs") and call them FLOPs:
their numbers are half of these.

Two numbers are kept for every piece:
- `total`: everything FlopCounterMode counts, attention included (QK^T and AV of every block
  and of attention probes);
- `linear_conv`: only the FLOPs of aten.mm / aten.addmm (what nn.Linear runs) and of
  convolutions, the convention of the DeeDiff / DuoDiff cost tables (their 22.75 GFLOPs for
  U-ViT-S/2 with MLP probes is this count; the plain U-ViT-S/2 backbone is 22.64).
Attention runs under the math SDPA backend while counting: on CPU, PyTorch's fused SDPA kernel
has no FLOP formula and would silently count as zero; the math backend runs QK^T and AV as
batched matmuls, which are counted (the same 4 * L^2 * D FLOPs per block the fused formulas
give). The model is built on the meta device: shapes only, no weights and no arithmetic.

Per exit (early exit): LUT[k] = embedding + blocks 0..k-1 + the probes of exits 0..min(k, depth-1)
(exit k's probe is what said "stop"; at k = depth every probe said "go on") + exit k's head
(exit depth: the backbone's head).

Per sample set (DIR/stats.json, DIR/exit_layers.pt of shape (steps, n)):
- gflops_per_forward: the mean over steps and samples of the executed network's cost
  (full / shallow: constant; duodiff: shallow for the first t_switch steps, full after;
  early exit: LUT[exit layer]; DuoDiff with an early-exit late model (a composed set): shallow
  for the first t_switch steps, LUT[exit layer] of the late model after. Fewer steps change only
  the number of rows of exit_layers);
- gflops_per_image: the sum over the sampling steps (steps x gflops_per_forward) and, with
  classifier-free guidance, over the sample's two branches (each step runs the network twice);
  cache: the whole network at full steps (exit_layers = depth), and at cached steps
  (exit_layers = 2 * cache_keep) what UViT.forward_cached runs on a cached state, counted by
  FlopCounterMode on that call itself: embedding, the first and last cache_keep blocks, head;
  DuoDiff with caching (a composed set): the shallow network for the first t_switch steps, then
  the full network's full and cached steps as a cache set's;
  l2c: the whole network at steps 0, 2, 4, ...; on each cache step what UViT.forward_routed
  runs with that step's plan (the router's gates above the set's threshold; models/router.py),
  counted by FlopCounterMode on that call: embedding, the attention and MLP layers that run
  (with their LayerNorms), every out-block's skip_linear, head; exit_layers (the blocks of which
  a layer ran) must agree with the plan;
- layer_ratio: the mean executed depth (exit_layers) / the full depth;
- gflops_decoder_per_image (latent diffusion; null in pixel space): the autoencoder's one decoder
  pass per image, counted the same way on the decoder built from its config. It is kept apart:
  the papers' speed-ups count the network only, and so do the tables.

A guided set (stats.json: branches 2) has exit_layers (steps, 2n), one column per network
evaluation (duodiff.core.guidance): gflops_per_forward stays the mean cost of one evaluation, each
branch at its own depth under early exit, and gflops_per_image counts both.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from pathlib import Path

import torch

from duodiff.core.errors import is_int, is_number, require
from duodiff.core.flags import add_flag
from duodiff.core.io import read_json, write_json
from duodiff.core.study import METHODS

GIGA = 1e9
# FlopCounterMode op names that nn.Linear and convolutions lower to.
LINEAR_OPS = ("aten.mm", "aten.addmm")
THEORETICAL = (
    "FLOPs from torch.utils.flop_counter.FlopCounterMode, batch 1 at the model's resolution, "
    "2 FLOPs per multiply-add (fvcore/thop-style MACs are half). gflops_*: all counted matmuls and "
    "convolutions, attention QK^T/AV included (math SDPA backend); *_linear_conv: nn.Linear "
    "(aten.mm/addmm) and convolution FLOPs only, the DeeDiff/DuoDiff tables' convention. "
    "Early exit: LUT[k] = embedding + blocks 0..k-1 + probes 0..min(k, depth-1) + head of exit k."
)


# ---------------------------------------------------------------------------------------------
# Counting one piece of a network


def is_linear_conv(op) -> bool:
    name = str(op)
    return name in LINEAR_OPS or "convolution" in name


def count(fn):
    """-> (fn's result, {"total": FLOPs, "linear_conv": FLOPs}) for one call of fn()."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        result = fn()
    by_op = counter.get_flop_counts().get("Global", {})
    cost = {
        "total": int(sum(by_op.values())),
        "linear_conv": int(sum(v for op, v in by_op.items() if is_linear_conv(op))),
    }
    return result, cost


def dummy_inputs(backbone, device):
    """A batch of one: image, timestep (0) and, if class-conditional, a label (0)."""
    x = torch.zeros(1, backbone.in_chans, backbone.img_size, backbone.img_size, device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)
    y = torch.zeros(1, dtype=torch.long, device=device) if backbone.num_classes > 0 else None
    return x, t, y


def piece_costs(model) -> dict:
    """FLOPs of every piece of a U-ViT or an early-exit U-ViT, through the decomposed interface.

    -> {"embed", "blocks": [depth], "head", and for early exit "probes": [depth],
        "exit_heads": [depth + 1] (the last is the backbone head)}, each {"total", "linear_conv"}.
    """
    early_exit = hasattr(model, "probe") and hasattr(model, "exit_head")
    backbone = model.backbone if early_exit else model
    device = next(backbone.parameters()).device
    x, t, y = dummy_inputs(backbone, device)

    costs = {"blocks": [], "probes": [], "exit_heads": []}
    tokens, costs["embed"] = count(lambda: backbone.embed(x, t, y))
    skips = []
    for i in range(backbone.depth):
        if early_exit:
            costs["probes"].append(count(lambda: model.probe(i, tokens, t))[1])
            costs["exit_heads"].append(count(lambda: model.exit_head(i, tokens))[1])
        tokens, cost = count(lambda: backbone.run_block(i, tokens, skips))
        costs["blocks"].append(cost)
    _, costs["head"] = count(lambda: backbone.head(tokens))
    if early_exit:
        costs["exit_heads"].append(costs["head"])
    else:
        del costs["probes"], costs["exit_heads"]
    return costs


def add(*costs) -> dict:
    return {key: sum(c[key] for c in costs) for key in ("total", "linear_conv")}


def network_cost(costs: dict, depth: int | None = None) -> dict:
    """Embedding + the first `depth` blocks (default all) + the backbone head: one U-ViT forward."""
    blocks = costs["blocks"] if depth is None else costs["blocks"][:depth]
    return add(costs["embed"], *blocks, costs["head"])


def exit_lut(costs: dict) -> list[dict]:
    """LUT[k], k = 0..depth: the cost of a forward pass that leaves at exit k."""
    depth = len(costs["blocks"])
    require("probes" in costs, "an exit LUT needs an early-exit model")
    return [
        add(costs["embed"], *costs["blocks"][:k], *costs["probes"][: min(k, depth - 1) + 1], costs["exit_heads"][k])
        for k in range(depth + 1)
    ]


def _meta_model(spec: dict):
    from duodiff.models import build_model

    # The meta device: the modules get shapes but no storage, the ops run as shape functions.
    with torch.device("meta"):
        model = build_model(spec["kind"], spec["model_config"], spec["num_timesteps"], spec["classifier_type"])
    return model.eval()


@functools.lru_cache(maxsize=None)
def _costs_for(key: str) -> dict:
    return piece_costs(_meta_model(json.loads(key)))


def cached_step_cost(model, keep: int) -> dict:
    """FLOPs of one cached step of a U-ViT (UViT.forward_cached with a cache): the call itself
    counted, on the cache a full step left, so what the count holds is exactly what ran."""
    device = next(model.parameters()).device
    x, t, y = dummy_inputs(model, device)
    with torch.no_grad():
        _, cache = model.forward_cached(x, t, y, keep)
    return count(lambda: model.forward_cached(x, t, y, keep, cache))[1]


@functools.lru_cache(maxsize=None)
def _cached_cost_for(key: str, keep: int) -> dict:
    return cached_step_cost(_meta_model(json.loads(key)), keep)


def routed_step_cost(model, run) -> dict:
    """FLOPs of one Learning-to-Cache step (UViT.forward_routed with `run`, depth x (attention,
    MLP) booleans) on the cache a full step left: the call itself counted."""
    device = next(model.parameters()).device
    x, t, y = dummy_inputs(model, device)
    with torch.no_grad():
        _, cache = model.forward_routed(x, t, y)
    return count(lambda: model.forward_routed(x, t, y, run=run, cache=cache))[1]


@functools.lru_cache(maxsize=None)
def _routed_cost_for(key: str, run: tuple) -> dict:
    return routed_step_cost(_meta_model(json.loads(key)), run)


def model_costs(kind: str, model_config: dict, num_timesteps: int = 1000, classifier_type: str | None = None) -> dict:
    """piece_costs of the model built from this config; cached per process per config."""
    key = json.dumps(
        {"kind": kind, "model_config": model_config, "num_timesteps": num_timesteps, "classifier_type": classifier_type},
        sort_keys=True,
    )
    return _costs_for(key)


def model_file(path) -> dict:
    """A model.pt's metadata (its weights left out), after load_model_file's checks (of the weights
    too: a NaN is refused here as everywhere); read once per process and version of the file, so the
    check pass of run_flops_sets and the counting after it share one read."""
    stat = Path(path).stat()
    return _model_file(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=None)
def _model_file(path: str, mtime_ns: int, size: int) -> dict:
    from duodiff.models.checkpoints import load_model_file

    return {k: v for k, v in load_model_file(path).items() if k not in ("state_dict", "ema_state_dict")}


def _architecture_key(path) -> str:
    """A model.pt's architecture as a hashable text (kind, model config, timesteps, classifier)."""
    obj = model_file(path)
    return json.dumps(
        {"kind": obj["kind"], "model_config": obj["model_config"],
         "num_timesteps": int(obj["diffusion"].get("num_timesteps", 1000)), "classifier_type": obj.get("classifier_type")},
        sort_keys=True,
    )  # fmt: skip


def checkpoint_cached_cost(path, keep: int) -> dict:
    """cached_step_cost of a (plain U-ViT) model.pt's architecture, built on the meta device."""
    return _cached_cost_for(_architecture_key(path), int(keep))


def checkpoint_routed_cost(path, run: tuple) -> dict:
    """routed_step_cost of a (plain U-ViT) model.pt's architecture, built on the meta device."""
    return _routed_cost_for(_architecture_key(path), tuple(tuple(pair) for pair in run))


def checkpoint_costs(path) -> tuple[dict, dict]:
    """-> (piece costs, model file metadata) of a model.pt; only its config is used."""
    obj = model_file(path)
    costs = model_costs(
        obj["kind"], obj["model_config"], int(obj["diffusion"].get("num_timesteps", 1000)), obj.get("classifier_type")
    )
    return costs, obj


# ---------------------------------------------------------------------------------------------
# Per sample set


def set_costs(method: str, exit_layers: torch.Tensor, costs: dict, costs_late: dict | None = None, t_switch=None,
              cached: dict | None = None, cache_keep=None, routed: list | None = None):
    """Per-evaluation cost (steps, n) tensors {"total", "linear_conv"} in FLOPs, and the full depth.

    method full / shallow: `costs` is the one network; early_exit: `costs` has probes, exit_layers
    index its LUT; duodiff: `costs` is the shallow network, `costs_late` the full one; cache:
    `costs` is the full network, `cached` one cached step with `cache_keep` blocks at each end;
    l2c: `costs` is the full network, `routed` per step None (a full step) or (plan, cost) of a cache step.
    """
    steps, n = exit_layers.shape
    per_eval = {}
    if method == "l2c":
        depth = len(costs["blocks"])
        require(routed is not None and len(routed) == steps,
                f"l2c set: exit_layers has {steps} steps but the router plans {len(routed or [])}")
        whole = network_cost(costs)
        expected = [depth if entry is None else sum(1 for a, m in entry[0] if a or m) for entry in routed]
        require(bool((exit_layers == torch.tensor(expected).unsqueeze(1)).all()),
                f"l2c set: exit_layers (blocks run) should be {expected} per step, as the router and threshold plan")
        per_eval = {k: torch.tensor([float(whole[k] if entry is None else entry[1][k]) for entry in routed],
                                    dtype=torch.float64).unsqueeze(1).expand(steps, n).clone() for k in whole}
        return per_eval, depth
    if method == "cache":
        depth = len(costs["blocks"])
        assert cached is not None and 1 <= cache_keep <= depth // 2, "run_flops checks a cache set's cache_keep"
        return cached_phase_costs(exit_layers, network_cost(costs), cached, depth, cache_keep, "cache set:"), depth
    if method in ("full", "shallow"):
        depth = len(costs["blocks"])
        require(bool((exit_layers == depth).all()), f"{method} set: exit_layers should all be {depth} (the model's depth)")
        whole = network_cost(costs)
        per_eval = {k: torch.full((steps, n), float(whole[k]), dtype=torch.float64) for k in whole}
        return per_eval, depth
    if method == "early_exit":
        depth = len(costs["blocks"])
        require(
            int(exit_layers.min()) >= 0 and int(exit_layers.max()) <= depth,
            f"early_exit set: exit layers must be in [0, {depth}]; found [{int(exit_layers.min())}, {int(exit_layers.max())}]",
        )
        lut = exit_lut(costs)
        for k in ("total", "linear_conv"):
            table = torch.tensor([float(entry[k]) for entry in lut], dtype=torch.float64)
            per_eval[k] = table[exit_layers.long()]
        return per_eval, depth
    if method == "duodiff":
        assert costs_late is not None and 0 <= t_switch <= steps, "read_set checks a duodiff set's t_switch"
        shallow_depth, depth = len(costs["blocks"]), len(costs_late["blocks"])
        early_exit = "probes" in costs_late  # DuoDiff with early exit in the late phase (a composed set)
        require(
            bool((exit_layers[:t_switch] == shallow_depth).all()),
            f"duodiff set: exit_layers should be {shallow_depth} for the first t_switch={t_switch} steps",
        )
        late_layers = exit_layers[t_switch:]
        if cached is not None:  # DuoDiff with caching: the full network or one cached step after t_switch
            late = cached_phase_costs(late_layers, network_cost(costs_late), cached, depth, cache_keep,
                                      f"duodiff set with caching: after t_switch={t_switch},")
            shallow = network_cost(costs)
            per_eval = {k: torch.cat([torch.full((t_switch, n), float(shallow[k]), dtype=torch.float64), late[k]])
                        for k in late}
            return per_eval, depth
        if early_exit:
            require(
                late_layers.numel() == 0 or (int(late_layers.min()) >= 0 and int(late_layers.max()) <= depth),
                f"duodiff set with early exit: exit layers after t_switch={t_switch} must be in [0, {depth}]",
            )
        else:
            require(bool((late_layers == depth).all()), f"duodiff set: exit_layers should be {depth} after t_switch={t_switch}")
        shallow = network_cost(costs)
        # The late phase costs what the full network ran: all of it, or LUT[exit] with early exit.
        late = exit_lut(costs_late) if early_exit else [network_cost(costs_late)] * (depth + 1)
        for k in ("total", "linear_conv"):
            table = torch.tensor([float(entry[k]) for entry in late], dtype=torch.float64)
            per_eval[k] = table[exit_layers.long().clamp(0, depth)]
            per_eval[k][:t_switch] = float(shallow[k])
        return per_eval, depth
    raise AssertionError(f"read_set checks the method; got {method!r}")


def cached_phase_costs(layers: torch.Tensor, whole: dict, cached: dict, depth: int, keep: int, what: str) -> dict:
    """Per-evaluation cost of steps run with DeepCache's rule: `whole` where all `depth` blocks
    ran (full steps), `cached` where 2 * `keep` did; any other count is refused, naming `what`."""
    full_step = layers == depth
    require(
        bool((full_step | (layers == 2 * keep)).all()),
        f"{what} exit_layers (blocks run) should be {depth} (full steps) or {2 * keep} (cached steps, cache_keep={keep})",
    )
    return {k: torch.where(full_step, float(whole[k]), float(cached[k])).double() for k in whole}


def summarize(per_eval: dict, exit_layers: torch.Tensor, full_depth: int, branches: int = 1) -> dict:
    """Mean over steps and evaluations (per forward), sum over steps and a sample's `branches`
    (per image; branch b of sample i is column b * n + i), layer ratio."""
    steps, columns = exit_layers.shape
    out = {}
    for k, suffix in (("total", ""), ("linear_conv", "_linear_conv")):
        per_forward = float(per_eval[k].mean()) / GIGA
        out[f"gflops_per_forward{suffix}"] = per_forward
        # Every sample runs every step, so the sum over steps is steps x the mean per step.
        per_image = per_eval[k].sum(dim=0).reshape(branches, columns // branches).sum(dim=0)
        out[f"gflops_per_image{suffix}"] = float(per_image.mean()) / GIGA
    out["layer_ratio"] = float(exit_layers.double().mean()) / full_depth
    out["steps"] = steps
    return out


def read_set(samples) -> tuple[dict, torch.Tensor]:
    """stats.json and exit_layers.pt of a finished sample set, checked once, before any counting."""
    samples = Path(samples)
    stats_path, layers_path = samples / "stats.json", samples / "exit_layers.pt"
    require(stats_path.is_file(), f"--samples {samples}: no stats.json there (an unfinished sample set?)")
    require(layers_path.is_file(), f"--samples {samples}: no exit_layers.pt there")
    stats = read_json(stats_path)
    method = stats.get("method")
    require(method in METHODS, f"{stats_path}: method must be one of {', '.join(METHODS)}; got {method!r}")
    exit_layers = torch.load(layers_path, map_location="cpu", weights_only=True)
    require(
        isinstance(exit_layers, torch.Tensor) and exit_layers.ndim == 2 and exit_layers.numel() > 0,
        f"{layers_path}: expected a non-empty (steps, n_samples) tensor",
    )
    for key in ("checkpoint",) + (("checkpoint_late",) if method == "duodiff" else ()):
        require(stats.get(key), f"{stats_path}: {key} is missing")
        require(Path(stats[key]).is_file(), f"{stats_path}: {key} {stats[key]} does not exist")
    branches, columns = stats.get("branches", 1), exit_layers.shape[1]
    require(
        branches in (1, 2) and columns % branches == 0 and stats.get("n_samples", columns // branches) * branches == columns,
        f"{layers_path}: {columns} columns do not hold branches {branches!r} (stats.json) x n_samples "
        f"{stats.get('n_samples')} network evaluations per step",
    )
    if method == "duodiff":
        t_switch, steps = stats.get("t_switch"), exit_layers.shape[0]
        require(
            is_int(t_switch) and 0 <= t_switch <= steps,
            f"{stats_path}: t_switch must be an integer in [0, {steps}] (the steps of exit_layers.pt); got {t_switch!r}",
        )
    return stats, exit_layers


def decoder_cost(stats: dict) -> dict | None:
    """FLOPs of one decoder pass (batch 1) of a latent set's autoencoder (stats.json's
    `autoencoder`), built on the meta device from its architecture file; None in pixel space."""
    record = stats.get("autoencoder")
    if record is None:
        return None
    from diffusers import AutoencoderKL

    architecture = Path(record["config"] or Path(record["path"]) / "config.json")
    require(architecture.is_file(), f"autoencoder architecture {architecture} (stats.json's autoencoder) does not exist")
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(read_json(architecture))
        z = torch.zeros(1, stats["latent_chans"], stats["latent_size"], stats["latent_size"])
    return count(lambda: vae.decode(z))[1]


def run_flops(*, samples, output) -> dict:
    """GFLOPs per forward / per image and the layer ratio of a sample set -> FILE.json."""
    stats, exit_layers = read_set(samples)
    method, stats_path = stats["method"], Path(samples) / "stats.json"
    costs, meta = checkpoint_costs(stats["checkpoint"])
    costs_late = checkpoint_costs(stats["checkpoint_late"])[0] if method == "duodiff" else None
    if method == "early_exit":
        require(meta["kind"] == "early_exit", f"{stats_path}: an early_exit set needs an early-exit checkpoint; {stats['checkpoint']} is {meta['kind']!r}")
    cached, keep = None, stats.get("cache_keep")
    if method == "cache" or (method == "duodiff" and keep is not None):
        # the cached model: the cache set's own, or DuoDiff's full one (its late phase cached)
        cached_path = stats["checkpoint_late" if method == "duodiff" else "checkpoint"]
        cached_costs, cached_meta = checkpoint_costs(cached_path)
        require(cached_meta["kind"] == "uvit", f"{stats_path}: caching needs a uvit checkpoint; {cached_path} is {cached_meta['kind']!r}")
        half = len(cached_costs["blocks"]) // 2
        require(is_int(keep) and 1 <= keep <= half, f"{stats_path}: cache_keep must be an integer in [1, {half}]; got {keep!r}")
        cached = checkpoint_cached_cost(cached_path, keep)
    routed = None
    if method == "l2c":
        from duodiff.models.router import check_router_fits, load_router, routing_plan

        require(meta["kind"] == "uvit", f"{stats_path}: an l2c set needs a uvit checkpoint; {stats['checkpoint']} is {meta['kind']!r}")
        threshold = stats.get("router_threshold")
        require(bool(stats.get("router")) and is_number(threshold), f"{stats_path}: an l2c set needs router and router_threshold")
        router = load_router(stats["router"])
        check_router_fits(router, stats["router"], steps=exit_layers.shape[0], sampler=stats["sampler"],
                          depth=len(costs["blocks"]))
        routed = [None if run is None else (run, checkpoint_routed_cost(stats["checkpoint"], run))
                  for run in routing_plan(router, threshold)]
    per_eval, full_depth = set_costs(method, exit_layers, costs, costs_late, stats.get("t_switch"), cached, keep, routed)
    branches = stats.get("branches", 1)  # sets sampled before guidance existed: 1

    full = network_cost(costs_late if method == "duodiff" else costs)
    late_meta = checkpoint_costs(stats["checkpoint_late"])[1] if method == "duodiff" else None
    # The exit look-up of the set's early-exit model: alone, or DuoDiff's late model.
    lut = exit_lut(costs) if method == "early_exit" else None
    if late_meta is not None and late_meta["kind"] == "early_exit":
        lut = exit_lut(costs_late)
    decoder = decoder_cost(stats)
    result = {
        "method": method,
        **summarize(per_eval, exit_layers, full_depth, branches),
        "n_samples": exit_layers.shape[1] // branches,
        "guidance_scale": stats.get("guidance_scale", 0.0),
        "branches": branches,
        "full_depth": full_depth,
        "gflops_full_network": full["total"] / GIGA,
        "gflops_full_network_linear_conv": full["linear_conv"] / GIGA,
        "lut_gflops": [entry["total"] / GIGA for entry in lut] if lut else None,
        "lut_gflops_linear_conv": [entry["linear_conv"] / GIGA for entry in lut] if lut else None,
        # cache sets: one cached step (the full steps cost gflops_full_network)
        **({"gflops_cached_step": cached["total"] / GIGA, "gflops_cached_step_linear_conv": cached["linear_conv"] / GIGA}
           if cached else {}),
        "gflops_decoder_per_image": decoder["total"] / GIGA if decoder else None,
        "gflops_decoder_per_image_linear_conv": decoder["linear_conv"] / GIGA if decoder else None,
        "flop_convention": "2 FLOPs per multiply-add",
        "theoretical": THEORETICAL,
    }
    write_json(output, result)
    return result


def run_flops_sets(*, samples: list, output: list) -> list[dict]:
    """run_flops for several sets in one process (the workflow's one flops job): every network is
    counted once, and every set and its model files are checked before the first is counted."""
    from tqdm import tqdm

    require(
        len(samples) == len(output),
        f"--samples names {len(samples)} set(s) but --output {len(output)} file(s); give one FILE.json per set, in the same order",
    )
    repeated = sorted(path for path, count in Counter(map(str, output)).items() if count > 1)
    require(not repeated, f"--output names {', '.join(repeated)} more than once; give each set its own FILE.json")
    for folder in samples:
        stats, _ = read_set(folder)
        for key in ("checkpoint",) + (("checkpoint_late",) if stats["method"] == "duodiff" else ()):
            model_file(stats[key])  # every model file checked (its weights finite) before the first set is counted
    return [run_flops(samples=folder, output=file) for folder, file in
            tqdm(list(zip(samples, output)), desc="GFLOPs", unit="set")]


def add_cli(subparsers):
    p = subparsers.add_parser("flops", help="GFLOPs per forward / per image and layer ratio of sample sets")
    add_flag(p, "--samples", required=True, nargs="+", help="sample set folder(s) (each: stats.json and exit_layers.pt)")
    add_flag(p, "--output", required=True, nargs="+", help="FILE.json for each set, in the same order")
    p.set_defaults(func=lambda a: run_flops_sets(samples=a.samples, output=a.output))
