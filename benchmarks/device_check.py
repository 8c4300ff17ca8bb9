"""Device check: every paper config's models at their real size, on random weights, through the
pipeline's own commands, in a few minutes on one GPU (benchmarks/README.md, "Device check").

For each config (the four studies and the six released-checkpoint variants laid over theirs, merged
as Snakemake merges two --configfile's):

1. the full model: a U-ViT-format state dict of random weights (libs/uvit.py's names) saved as a
   .pth and converted by `duodiff convert` with the config's recipe (noise process, time input,
   schedule, label dropout, autoencoder and scale), as rule convert_full does;
2. the first shallow model and one early-exit model (the first classifier type, random probes,
   built on the converted backbone) saved as model.pt files, as training would;
3. for latent configs, a random-init diffusers AutoencoderKL of the KL-f8 shape
   (config/autoencoders/sd-kl-f8.json), saved as a single file read back through --autoencoder-config;
4. `duodiff sample` with each method — full, early exit (the config's first threshold), DuoDiff (the
   shallow model for the first half of the steps), cache (interval 2, one block kept) — in bf16 and
   fp32, with the config's sampler (ddpm, whose steps must be all 1,000, runs as ddim), a few steps,
   the config's guidance scale, decoding latent samples;
5. `duodiff flops` over every set, and `duodiff reference` + `duodiff score` (Inception FID) of the
   full fp32 set (--score) against a reference made of a full fp32 set's images of that size;
6. benchmarks/bench_sampling.py, short (the sampling benchmarks of benchmarks/README.md).

It prints one table: config, model, params, method, precision, steps, s/step, images/s, GFLOP/img,
peak GPU memory, ok/fail (with the error of a failure). `--tiny` shrinks every model (width 32,
5 and 3 blocks), the autoencoder and the batches so the whole check runs on a CPU in seconds
(tests/test_device_check.py); the full-size run is `benchmarks/device_check.sh` on a GPU.

    python benchmarks/device_check.py --device cuda          # full size, ~minutes on one H100
    python benchmarks/device_check.py --tiny --device cpu    # the same code paths at toy size
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
# (name, config files laid over each other): the paper configs and U-ViT's released checkpoints.
CONFIGS = [  # the released checkpoints first: under --budget-s the from-scratch studies are the ones left out
    ("cifar10_uvit_small", ["config/cifar10.yaml", "config/variants/cifar10_uvit_small.yaml"]),
    ("celeba64_uvit_small", ["config/celeba64.yaml", "config/variants/celeba64_uvit_small.yaml"]),
    ("imagenet64_uvit_mid", ["config/imagenet64.yaml", "config/variants/imagenet64_uvit_mid.yaml"]),
    ("imagenet64_uvit_large", ["config/imagenet64.yaml", "config/variants/imagenet64_uvit_large.yaml"]),
    ("imagenet256_uvit_large", ["config/imagenet256.yaml", "config/variants/imagenet256_uvit_large.yaml"]),
    ("imagenet256_uvit_huge", ["config/imagenet256.yaml", "config/variants/imagenet256_uvit_huge.yaml"]),
    ("cifar10", ["config/cifar10.yaml"]),
    ("celeba64", ["config/celeba64.yaml"]),
    ("imagenet64", ["config/imagenet64.yaml"]),
    ("imagenet256", ["config/imagenet256.yaml"]),
]
METHODS = ("full", "early_exit", "duodiff", "cache")
PRECISIONS = ("bf16", "fp32")
COLUMNS = ("config", "model", "params", "method", "precision", "steps", "s/step", "images/s", "GFLOP/img", "peak GPU MB",
           "status")  # fmt: skip
TINY_MODEL = {"embed_dim": 32, "num_heads": 2, "mlp_ratio": 2.0, "probe_hidden": 16}
TINY_DEPTHS = (5, 3)  # full, shallow
TINY_AUTOENCODER = {"block_out_channels": [8, 8, 8, 8], "layers_per_block": 1, "norm_num_groups": 4}


def merged_config(files) -> dict:
    """Config files laid over each other as Snakemake merges --configfile's: nested mappings key by
    key, anything else replaced."""

    def merge(base, over):
        out = dict(base)
        for key, value in over.items():
            out[key] = merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
        return out

    cfg = {}
    for path in files:
        cfg = merge(cfg, yaml.safe_load((REPO / path).read_text()))
    return cfg


def duodiff(*argv) -> None:
    """One `duodiff` command in this process, as the workflow runs it; its output kept for errors."""
    from duodiff.cli import main

    argv = [str(a) for a in argv]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(argv)
    if code != 0:
        raise RuntimeError(f"duodiff {argv[0]} exited {code}: {out.getvalue().strip()[-500:]}")


def flags(mapping: dict) -> list:
    return [x for key, value in mapping.items() if value is not None for x in (f"--{key.replace('_', '-')}", value)]


class Check:
    def __init__(self, args, workdir: Path):
        self.args, self.workdir = args, workdir
        self.device = args.device
        self.rows = []
        self.references = {}  # image size -> reference folder
        self.scored = False

    # ---- models --------------------------------------------------------------------------------

    def model_config(self, path, depth_index) -> dict:
        from duodiff.models import load_model_config

        config = load_model_config(REPO / path)
        if self.args.tiny:
            config = {**config, **TINY_MODEL, "depth": TINY_DEPTHS[depth_index]}
        return config

    def autoencoder(self, cfg, folder: Path):
        """A random-init AutoencoderKL of the config's architecture, as a single file and its config."""
        from diffusers import AutoencoderKL

        architecture = json.loads((REPO / cfg["autoencoder"]["config"]).read_text())
        architecture = {k: v for k, v in architecture.items() if not k.startswith("_")}
        if self.args.tiny:
            architecture.update(TINY_AUTOENCODER)
        config_path = folder / "autoencoder.json"
        config_path.write_text(json.dumps(architecture))
        torch.manual_seed(3)
        vae = AutoencoderKL(**architecture)
        path = folder / "autoencoder.pth"
        torch.save(vae.state_dict(), path)
        return path, config_path

    def prepare(self, name, cfg, folder: Path) -> dict:
        """Convert the full model, save the shallow and early-exit models -> paths and facts."""
        from duodiff.models import build_model
        from duodiff.models.checkpoints import load_model_file, save_model
        from duodiff.models.early_exit import EarlyExitUViT

        diffusion_cfg = cfg.get("diffusion", {})
        full_config = self.model_config(cfg["models"]["full"], 0)
        shallow_config = self.model_config(cfg["models"]["shallow"][0], 1)
        (folder / "full.yaml").write_text(yaml.safe_dump(full_config))
        torch.manual_seed(0)
        full = build_model("uvit", full_config)
        params = sum(p.numel() for p in full.parameters())
        torch.save(full.state_dict(), folder / "uvit.pth")  # U-ViT's names (convert.py: the map is the identity)
        latent = cfg.get("autoencoder", {}).get("path") is not None
        autoencoder = self.autoencoder(cfg, folder) if latent else (None, None)
        recipe = {k: diffusion_cfg[k] for k in ("num_timesteps", "beta_start", "beta_end", "beta_schedule", "parametrization",
                                                 "noise_process", "time_input", "sde_beta_min", "sde_beta_max")
                  if k in diffusion_cfg}  # fmt: skip
        label_dropout = cfg["train"]["full"].get("label_dropout", 0.0)
        convert = {**recipe, "label_dropout": label_dropout or None, "autoencoder": autoencoder[0],
                   "scale_factor": cfg["autoencoder"]["scale_factor"] if latent else None}  # fmt: skip
        started = time.perf_counter()
        if full_config.get("normalize_timesteps", False):
            # A from-scratch study's model file (normalize_timesteps: true) holds no U-ViT checkpoint:
            # convert refuses it, so its full model is saved as training saves it, in its recipe.
            from duodiff.core.diffusion import GaussianDiffusion

            save_model(folder / "full.pt", kind="uvit", classifier_type=None, model_config=full_config,
                       diffusion=GaussianDiffusion(**recipe).config(), state_dict=full.state_dict(), ema_state_dict=None, step=0,
                       train_args=None)  # fmt: skip
            how = "save (as trained)"
        else:
            duodiff("convert", "--checkpoint", folder / "uvit.pth", "--config-path", folder / "full.yaml",
                    "--output", folder / "full.pt", *flags(convert))  # fmt: skip
            how = "convert"
        converted_s = time.perf_counter() - started
        (folder / "uvit.pth").unlink()  # the large file is not needed any more
        # The converted model.pt's facts (diffusion, training facts); its weights are `full`'s, since
        # convert maps the names one to one, so `full` itself is the early-exit backbone below (no
        # second build and load of U-ViT-H/2).
        meta = load_model_file(folder / "full.pt")
        diffusion = meta["diffusion"]
        # Shallow and early-exit models as training saves them, recording the full model's training
        # facts (dataset, null class, the latents' autoencoder), which sampling checks.
        torch.manual_seed(1)
        shallow = build_model("uvit", shallow_config)
        save_model(folder / "shallow.pt", kind="uvit", classifier_type=None, model_config=shallow_config,
                   diffusion=diffusion, state_dict=shallow.state_dict(), ema_state_dict=None, step=0,
                   train_args=meta.get("train_args"))  # fmt: skip
        classifier_type = cfg["early_exit"]["classifier_types"][0]
        torch.manual_seed(2)
        early_exit = EarlyExitUViT(full, classifier_type)
        save_model(folder / "early_exit.pt", kind="early_exit", classifier_type=classifier_type, model_config=full_config,
                   diffusion=diffusion, state_dict=early_exit.state_dict(), ema_state_dict=None, step=0,
                   train_args=meta.get("train_args"))  # fmt: skip
        shallow_params = sum(p.numel() for p in shallow.parameters())
        del full, early_exit, shallow
        self.row(name, "full", params, how, "fp32", "-", converted_s, None, None, None, "ok")
        return {"params": params, "autoencoder": autoencoder, "latent": latent, "classifier_type": classifier_type,
                "shallow_params": shallow_params}  # fmt: skip

    # ---- sampling ------------------------------------------------------------------------------

    def sample(self, cfg, facts, folder: Path, method: str, precision: str) -> dict:
        sampling = cfg["sampling"]
        sampler = "ddim" if sampling["sampler"] == "ddpm" else sampling["sampler"]
        steps = self.args.steps
        n = self.args.batch
        common = {"sampler": sampler, "steps": steps, "n_samples": n, "batch_size": n, "seed": 0, "device": self.device,
                  "precision": precision, "guidance_scale": sampling.get("guidance_scale", 0.0)}  # fmt: skip
        if facts["latent"]:
            common |= {"autoencoder": facts["autoencoder"][0], "autoencoder_config": facts["autoencoder"][1],
                       "scale_factor": cfg["autoencoder"]["scale_factor"]}  # fmt: skip
        by_method = {
            "full": {"checkpoint_path": folder / "full.pt"},
            "early_exit": {"checkpoint_path": folder / "early_exit.pt", "threshold": cfg["early_exit"]["thresholds"][0]},
            "duodiff": {"checkpoint_path": folder / "shallow.pt", "checkpoint_path_late": folder / "full.pt",
                        "t_switch": steps // 2},
            "cache": {"checkpoint_path": folder / "full.pt", "cache_interval": 2, "cache_keep": 1},
        }  # fmt: skip
        output = folder / "samples" / f"{method}_{precision}"
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        duodiff("sample", "--method", method, *flags(by_method[method] | common), "--output-folder", output,
                "--restart", "--no-progress")  # fmt: skip
        peak = torch.cuda.max_memory_allocated() / 2**20 if self.device == "cuda" else None
        stats = json.loads((output / "stats.json").read_text())
        images = sorted((output / "images").glob("*.png"))
        if len(images) != n:
            raise RuntimeError(f"{len(images)} images written, expected {n}")
        return {"folder": output, "stats": stats, "peak": peak, "steps": steps, "sampler": sampler}

    # ---- one config ----------------------------------------------------------------------------

    def run_config(self, name, files) -> None:
        cfg = merged_config(files)
        folder = self.workdir / name
        folder.mkdir(parents=True)
        try:
            facts = self.prepare(name, cfg, folder)
        except Exception as error:  # noqa: BLE001 (a row per failure, the check goes on)
            self.fail(name, "full", "convert", "fp32", error)
            for method in METHODS:
                for precision in PRECISIONS:
                    self.row(name, self.model_name(method), None, method, precision, "-", None, None, None, None,
                             "fail: convert failed")  # fmt: skip
            return
        sets = {}
        for method in METHODS:
            for precision in PRECISIONS:
                model = self.model_name(method)
                params = facts["shallow_params"] + facts["params"] if method == "duodiff" else facts["params"]
                try:
                    result = self.sample(cfg, facts, folder, method, precision)
                except Exception as error:  # noqa: BLE001
                    self.fail(name, model, method, precision, error, params)
                    continue
                sets[(method, precision)] = result
                stats = result["stats"]
                per_step = stats["wall_time_s"] / result["steps"]
                self.row(name, model, params, method, precision, f"{result['steps']} {result['sampler']}", per_step,
                         stats["images_per_s"], None, result["peak"], "ok")  # fmt: skip
        self.flops(name, sets)
        if self.args.score in ("all", "full") or (self.args.score == "first" and not self.scored):
            self.scored = True
            self.score(name, folder, sets)

    def model_name(self, method):
        return {"duodiff": "shallow + full", "early_exit": "full + probes"}.get(method, "full")

    def flops(self, name, sets) -> None:
        if not sets:
            return
        keys = list(sets)
        outputs = [sets[k]["folder"] / "flops.json" for k in keys]
        try:
            duodiff("flops", "--samples", *[sets[k]["folder"] for k in keys], "--output", *outputs)
            for key, path in zip(keys, outputs):
                gflops = json.loads(path.read_text())
                value = gflops.get("gflops_per_image", gflops.get("gflops"))
                for row in self.rows:
                    if (row["config"], row["method"], row["precision"]) == (name, *key):
                        row["GFLOP/img"] = value
                if value is None or not value > 0:
                    raise RuntimeError(f"{path}: no positive GFLOPs per image ({sorted(gflops)})")
            self.row(name, "-", None, "flops", "-", "-", None, None, None, None, "ok")
        except Exception as error:  # noqa: BLE001
            self.fail(name, "-", "flops", "-", error)

    def score(self, name, folder: Path, sets) -> None:
        """Inception FID of the fp32 sets (--score all) or of the full fp32 set (--score first)
        against a reference made of a full fp32 set's images of the same size (an ImageFolder tree
        of one class; built once per image size: its 2048x2048 covariance root is the reference's
        cost): `duodiff reference` and `duodiff score` as the workflow runs them."""
        full = sets.get(("full", "fp32"))
        if full is None:
            self.row(name, "-", None, "score", "fp32", "-", None, None, None, None, "fail: no full fp32 set")
            return
        try:
            from PIL import Image

            images = sorted((full["folder"] / "images").glob("*.png"))
            size, n = Image.open(images[0]).size[0], len(images)
            started = time.perf_counter()
            if size not in self.references:
                tree = folder / "real" / "class0"
                tree.mkdir(parents=True)
                for image in images:
                    (tree / image.name).symlink_to(image)
                duodiff("reference", "--dataset", "imagefolder", "--data-root", folder / "real", "--image-size", size,
                        "--n-reference", n, "--output-folder", folder / "reference", "--device", self.device,
                        "--batch-size", n)  # fmt: skip
                self.references[size] = folder / "reference"
            chosen = {k: v for k, v in sets.items() if k[1] == "fp32" and (self.args.score == "all" or k[0] == "full")}
            if not chosen:
                raise RuntimeError("no fp32 set to score")
            for (method, _), result in chosen.items():
                duodiff("score", "--samples", result["folder"], "--reference", self.references[size], "--output-dir",
                        result["folder"] / "metrics", "--device", self.device, "--batch-size", n, "--kid-subsets", 2,
                        "--kid-subset-size", n, "--no-intervals")  # fmt: skip
                fid = json.loads((result["folder"] / "metrics" / "fid.json").read_text())
                if not isinstance(fid.get("fid"), (int, float)):
                    raise RuntimeError(f"{method}: fid.json has no FID ({sorted(fid)})")
            self.row(name, "Inception", None, f"score ({len(chosen)} sets)", "fp32", "-", None, None, None, None, "ok",
                     seconds=time.perf_counter() - started)  # fmt: skip
        except Exception as error:  # noqa: BLE001
            self.fail(name, "Inception", "score", "fp32", error)

    # ---- bench_sampling ------------------------------------------------------------------------

    def bench(self) -> None:
        sys.path.insert(0, str(REPO / "benchmarks"))
        import bench_sampling

        output = self.workdir / "bench_sampling.json"
        if self.args.tiny:
            argv = ["--models", "digits", "--batch-sizes", "2", "--repeats", "1", "--warmup", "0", "--loop-steps", "2",
                    "--classifier-types", "mlp_probe_per_layer", "--exit-fractions", "0.5", "--t-switch-fractions", "0.5",
                    "--target-batch", "2", "--matmul-size", "64", "--threads", "1"]  # fmt: skip
        else:
            argv = ["--models", "digits,cifar10", "--quick", "--loop-steps", "10"]  # the README's models
        argv += ["--device", self.device, "--output", str(output)]
        started = time.perf_counter()
        try:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                bench_sampling.main(argv)
            print(out.getvalue())
            result = json.loads(output.read_text())
            if not result["per_eval"] or not result["loop"]:
                raise RuntimeError("bench_sampling wrote no per-evaluation or loop rows")
            self.row("bench_sampling", ",".join(argv[1:2]), None, "benchmarks/bench_sampling.py", "fp32", "-", None, None,
                     None, None, "ok", seconds=time.perf_counter() - started)  # fmt: skip
        except Exception as error:  # noqa: BLE001
            self.fail("bench_sampling", "-", "benchmarks/bench_sampling.py", "fp32", error)

    # ---- the table -----------------------------------------------------------------------------

    def row(self, config, model, params, method, precision, steps, per_step, images_per_s, gflops, peak, status,
            seconds=None):  # fmt: skip
        self.rows.append({
            "config": config, "model": model, "params": params, "method": method, "precision": precision,
            "steps": steps, "s/step": per_step if seconds is None else seconds, "images/s": images_per_s,
            "GFLOP/img": gflops, "peak GPU MB": peak, "status": status,
        })  # fmt: skip

    def fail(self, config, model, method, precision, error, params=None):
        detail = f"{type(error).__name__}: {error}".replace("\n", " ")[:300]
        if self.args.verbose:
            traceback.print_exception(error)
        self.row(config, model, params, method, precision, "-", None, None, None, None, f"fail: {detail}")


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and value > 10_000:
        return f"{value / 1e6:.1f}M"
    return str(value)


def print_table(rows) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(row[c]) for c in COLUMNS) + " |" for row in rows]
    text = "\n".join(lines)
    print(text)
    return text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--tiny", action="store_true", help="shrink every model, the autoencoder and the batches (CPU)")
    p.add_argument("--configs", default="all", help="'all' or comma-separated names: " + ", ".join(n for n, _ in CONFIGS))
    p.add_argument("--steps", type=int, default=None, help="sampling steps per set (default 4; --tiny 2)")
    p.add_argument("--batch", type=int, default=None, help="images per set (default 8; --tiny 2)")
    p.add_argument("--score", choices=["all", "full", "first", "none"], default=None,
                   help="Inception FID of every config's fp32 sets (all), of every config's full fp32 set (full; the "
                   "default: the same code for every set, one Inception start per config), of the first config's "
                   "full set only (first; the default with --tiny: a reference costs a 2048x2048 eigh on the CPU), "
                   "or none")
    p.add_argument("--no-bench", dest="bench", action="store_false", help="skip benchmarks/bench_sampling.py")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting configs after this many seconds "
                   "(each left out is a failed row)")  # fmt: skip
    p.add_argument("--workdir", type=Path, default=None, help="keep the files here (default: a temporary folder)")
    p.add_argument("--output", type=Path, default=None, help="also write the rows as JSON")
    p.add_argument("--verbose", action="store_true", help="print each failure's traceback")
    args = p.parse_args(argv)
    args.steps = args.steps or (2 if args.tiny else 4)
    args.batch = args.batch or (2 if args.tiny else 8)
    args.score = args.score or ("first" if args.tiny else "full")
    names = [n for n, _ in CONFIGS]
    args.configs = names if args.configs == "all" else args.configs.split(",")
    unknown = sorted(set(args.configs) - set(names))
    if unknown:
        p.error(f"--configs: unknown {unknown}; known: {names}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to torch")
    return args


def main(argv=None) -> list:
    args = parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(1 if args.tiny else torch.get_num_threads())
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "-"
    print(f"# device_check: device {args.device} ({gpu}), tiny {args.tiny}, steps {args.steps}, batch {args.batch}, "
          f"torch {torch.__version__}")  # fmt: skip
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="device_check_")))
        check = Check(args, workdir)
        for name, files in CONFIGS:
            if name not in args.configs:
                continue
            if args.budget_s is not None and time.perf_counter() - started > args.budget_s:
                check.row(name, "-", None, "-", "-", "-", None, None, None, None, "fail: over --budget-s, not run")
                continue
            config_started, done = time.perf_counter(), len(check.rows)
            check.run_config(name, files)
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
            # Each config's rows as soon as they exist: a run stopped by the time limit keeps them.
            print(f"# {name}: {time.perf_counter() - config_started:.1f} s", flush=True)
            for row in check.rows[done:]:
                print("#   " + " | ".join(fmt(row[c]) for c in COLUMNS), flush=True)
        if args.bench and args.budget_s is not None and time.perf_counter() - started > args.budget_s:
            check.row("bench_sampling", "-", None, "benchmarks/bench_sampling.py", "fp32", "-", None, None, None, None,
                      "fail: over --budget-s, not run")  # fmt: skip
        elif args.bench:
            check.bench()
    print(f"\n## Device check ({time.perf_counter() - started:.0f} s)\n")
    print_table(check.rows)
    failed = [r for r in check.rows if r["status"] != "ok"]
    print(f"\n{len(check.rows) - len(failed)} ok, {len(failed)} failed")
    if args.output:
        args.output.write_text(json.dumps(check.rows, indent=1, default=str))
    return check.rows


if __name__ == "__main__":
    rows = main()
    sys.exit(1 if any(r["status"] != "ok" for r in rows) else 0)
