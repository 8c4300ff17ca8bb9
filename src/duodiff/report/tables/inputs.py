"""The inputs of `duodiff tables`: one sample set's files read, checked against their contract and
merged into one flat row.

Per set: `samples/{set}/stats.json` and `metrics/{set}/{fid,cmmd,gflops}.json` (and the headline's
file when it is not fid.json); the real-data set has its own stats.json contract (real_stats.json).
Every problem is a DuodiffError naming the file and the key.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from duodiff.core.errors import DuodiffError, is_number, require
from duodiff.core.io import read_json
from duodiff.core.study import setting_label, stats_method

# The method a set's stats.json records: fewer-steps sets are the full model sampled with fewer steps.
# The headline score (metrics.headline): which metric file it is read from and how it is named.
HEADLINES = {
    "inception": {"file": "fid", "name": "FID", "kid_name": "KID", "long": "FID (Inception, clean-fid)"},
    "classifier": {"file": "fd_classifier", "name": "FD", "kid_name": "KD",
                   "long": "Fréchet distance in the features of the dataset's own classifier"},
}


@dataclass(frozen=True)
class TableSettings:
    """What one run of `duodiff tables` reads: the two results folders, the headline score
    (a key of HEADLINES) and whether CMMD was computed. Built once, by run_tables, from its flags."""

    samples_root: Path
    metrics_root: Path
    headline: str
    cmmd: bool
    timing: dict | None  # timing.json of `duodiff time` (read_timing), or None: the sampling jobs' own timings


# Keys each input file must have (the contract); anything else in them is ignored.
REQUIRED_KEYS = {
    "stats.json": ["method", "setting", "threshold", "t_switch", "classifier_type", "sampler",
                   "steps", "n_samples", "batch_size", "seed", "depth", "shallow_depth",
                   "images_per_s", "device", "torch_version"],
    "fid.json": ["fid", "kid", "kid_std", "n_samples", "n_reference", "feature_network",
                 "feature_network_sha256", "notes"],
    "fd_classifier.json": ["fid", "fid_ci_low", "fid_ci_high", "kid", "kid_ci_low", "kid_ci_high", "n_samples",
                           "n_reference", "feature_network", "feature_network_sha256", "notes"],
    "real_stats.json": ["method", "n_samples", "notes"],
    "cmmd.json": ["cmmd", "available", "reason", "n_samples", "embedding_model"],
    "gflops.json": ["gflops_per_forward", "gflops_per_forward_linear_conv", "gflops_per_image",
                    "layer_ratio", "theoretical"],
    "timing.json": ["format", "baseline", "rounds", "batch_size", "threads", "device", "device_name", "clock",
                    "confidence", "interval_method", "sets"],
}


def _read(path: Path, contract: str | None = None) -> dict:
    """A JSON input, checked against REQUIRED_KEYS[contract] (default: its file name)."""
    require(path.is_file(), f"{path} does not exist")
    try:
        data = read_json(path)
    except ValueError as error:
        raise DuodiffError(f"{path}: not valid JSON: {error}") from None
    require(isinstance(data, dict), f"{path}: expected a JSON object, found {type(data).__name__}")
    missing = [key for key in REQUIRED_KEYS[contract or path.name] if key not in data]
    require(not missing, f"{path}: missing {', '.join(missing)}")
    return data


def _number(path: Path, data: dict, key: str, positive: bool = False) -> float:
    value = data[key]
    ok = is_number(value) and math.isfinite(value)
    require(ok and (value > 0 or not positive),
            f"{path}: {key} must be a {'positive' if positive else 'finite'} number; got {value!r}")
    return float(value)


def _interval(path: Path, data: dict, key: str) -> tuple[float, float]:
    """(low, high) of a score's 95% interval; NaNs when the file has none (intervals off, or a
    file from before intervals existed)."""
    low, high = data.get(f"{key}_ci_low"), data.get(f"{key}_ci_high")
    if low is None or high is None:
        return math.nan, math.nan
    return _number(path, data, f"{key}_ci_low"), _number(path, data, f"{key}_ci_high")


def _paired(path: Path, data: dict, key: str, column: str) -> dict:
    """A score's paired difference to the full model (metrics/paired.py: `paired` in the score
    file) as three columns; NaNs for a set without one (the full model, the real images, a set
    scored before pairing existed, or intervals switched off)."""
    paired = data.get("paired") or {}
    columns = {f"{column}_diff": f"{key}_diff", f"{column}_diff_ci_low": f"{key}_diff_ci_low",
               f"{column}_diff_ci_high": f"{key}_diff_ci_high"}
    return {out: math.nan if paired.get(name) is None else _number(path, paired, name) for out, name in columns.items()}


def _scores(settings: TableSettings, name: str) -> dict:
    """The set's Inception FID/KID and its headline score, with their intervals, as columns."""
    fid_path = settings.metrics_root / name / "fid.json"
    fid = _read(fid_path)
    # A reference from published statistics (mu, sigma) has no features, so no KID: NaN, printed "–".
    no_kid = fid.get("reference_source") == "statistics" and fid["kid"] is None
    row = {
        "fid": _number(fid_path, fid, "fid"),
        "kid": math.nan if no_kid else _number(fid_path, fid, "kid"),
        "kid_std": math.nan if no_kid else _number(fid_path, fid, "kid_std"),
        "fid_mode": fid.get("mode", "clean"),  # fid.json written before modes existed: clean
        "reference_source": fid.get("reference_source", "images"),
        "reference_selection": fid.get("reference_selection"),
        "fid_n_samples": fid["n_samples"], "n_reference": fid["n_reference"],
        "feature_network": fid["feature_network"],
        "feature_network_sha256": fid["feature_network_sha256"], "fid_notes": list(fid["notes"] or []),
    }
    row["fid_ci_low"], row["fid_ci_high"] = _interval(fid_path, fid, "fid")
    row["kid_ci_low"], row["kid_ci_high"] = _interval(fid_path, fid, "kid")
    row.update(_paired(fid_path, fid, "fid", "fid"))
    spec = HEADLINES[settings.headline]
    score_path = settings.metrics_root / name / f"{spec['file']}.json"
    score = fid if spec["file"] == "fid" else _read(score_path)
    row.update({
        "score_name": spec["name"], "score": _number(score_path, score, "fid"),
        "kid_headline": row["kid"] if score is fid else _number(score_path, score, "kid"),
        "score_n_samples": score["n_samples"], "score_n_reference": score["n_reference"],
        "score_network": score["feature_network"], "score_notes": list(score["notes"] or []),
    })  # fmt: skip
    row["score_ci_low"], row["score_ci_high"] = _interval(score_path, score, "fid")
    row["kid_headline_ci_low"], row["kid_headline_ci_high"] = _interval(score_path, score, "kid")
    row.update(_paired(score_path, score, "fid", "score"))
    row.update(_paired(score_path, score, "kid", "kid_headline"))
    # What each score file was measured against, for check_one_reference.
    row["scored_against"] = {file: {key: data.get(key, "clean" if key == "mode" else None) for key in SCORED_AGAINST}
                             for file, data in {"fid": fid, spec["file"]: score}.items()}
    return row


CMMD_OFF = "not computed: CMMD is switched off for this experiment (metrics.cmmd.enabled: false)"


def _cmmd(settings: TableSettings, name: str) -> dict:
    if not settings.cmmd:
        return {"cmmd": None, "available": False, "reason": CMMD_OFF, "cmmd_n_samples": None, "embedding_model": None}
    path = settings.metrics_root / name / "cmmd.json"
    cmmd = _read(path)
    value = cmmd["cmmd"] if cmmd["available"] else None
    if value is not None:
        value = _number(path, cmmd, "cmmd")
    reason = cmmd["reason"]
    if value is None and not reason:
        reason = "CMMD was not computed"
    return {
        "cmmd": value, "available": bool(cmmd["available"]) and value is not None,
        "reason": None if value is not None else reason,
        "cmmd_n_samples": cmmd["n_samples"], "embedding_model": cmmd["embedding_model"],
    }


def check_one_mode(frame) -> None:
    """Every set's FID of one protocol (fid.json's mode, the reference's: `duodiff fid` refuses
    others), and the real-data set made for it; DuodiffError listing the sets of each mode."""
    modes = {}
    for row in frame.itertuples():
        modes.setdefault(row.fid_mode, []).append(row.set)
        # real_mode: None or NaN (pandas) for a set written before stats.json recorded it.
        if row.method == "real" and isinstance(row.real_mode, str) and row.real_mode != row.fid_mode:
            raise DuodiffError(f"the real-data set was made for FID mode {row.real_mode} but scored against a "
                               f"mode {row.fid_mode} reference; rerun `duodiff real-set --mode {row.fid_mode}`")
    require(len(modes) == 1, "FID modes are mixed, so the scores cannot share a table: "
            + "; ".join(f"mode {mode}: {', '.join(sets)}" for mode, sets in modes.items())
            + "; score every set against one reference (metrics.fid.mode)")


def read_timing(path) -> dict | None:
    """timing.json of `duodiff time` (every set timed alone after sampling), checked; None without one."""
    if path is None:
        return None
    path = Path(path)
    timing = _read(path, "timing.json")
    require(timing["format"] == "duodiff-timing", f"{path}: format is {timing['format']!r}, not 'duodiff-timing'")
    require(isinstance(timing["sets"], dict), f"{path}: sets must be an object of set name -> timing")
    return {**timing, "path": str(path)}


def _timed(settings: TableSettings, name: str, stats_path: Path, stats: dict) -> dict:
    """The set's throughput and measured speed-up: from timing.json (timed alone, interleaved with
    the full model, median ratio with its 95% interval) when the run has it, else the sampling
    job's own images/s (the speed-up is then their ratio, without an interval)."""
    if settings.timing is None:
        return {"images_per_s": _number(stats_path, stats, "images_per_s", positive=True), "timing_source": "sampling"}
    timing, path = settings.timing, settings.timing["path"]
    require(name in timing["sets"], f"{path}: set {name} was not timed (timed: {', '.join(timing['sets'])}); "
                                    "rerun `duodiff time` over every set of the study")
    entry = timing["sets"][name]
    return {
        "images_per_s": _number(Path(path), entry, "images_per_s", positive=True),
        "speedup_measured": _number(Path(path), entry, "speedup", positive=True),
        "speedup_measured_ci_low": _number(Path(path), entry, "speedup_ci_low", positive=True),
        "speedup_measured_ci_high": _number(Path(path), entry, "speedup_ci_high", positive=True),
        "timing_source": "timing",
    }


# What a score file records of what its scores were measured against (its `duodiff fid` inputs),
# and how a refusal names it; sets whose files disagree on any of them cannot share a table.
SCORED_AGAINST = {"reference": "against different reference folders",
                  "feature_network_sha256": "with different feature networks (sha256)",
                  "mode": "under different protocols (mode)"}


def check_one_reference(frame) -> None:
    """Every set's fid.json (and the headline's file) scored against one reference folder, with one
    feature network, under one protocol (the `scored_against` column _scores reads); DuodiffError
    listing the sets of each. A file from before `reference` was recorded is not compared on it;
    one without `mode` is clean (as _scores reads it)."""
    for file in frame["scored_against"].iloc[0]:
        for key, what in SCORED_AGAINST.items():
            groups = {}
            for name, scored in zip(frame["set"], frame["scored_against"]):
                value = scored[file][key]
                if value is not None:
                    groups.setdefault(os.path.normpath(str(value)) if key == "reference" else value, []).append(name)
            listed = "; ".join(f"{value}: {', '.join(names)}" for value, names in groups.items())
            require(len(groups) <= 1, f"the sets' {file}.json were scored {what}, so their scores "
                    f"cannot share a table: {listed}; score every set against one reference (rerun `duodiff score`)")


def read_real(settings: TableSettings) -> dict:
    """The real-data row: real images not in the reference, scored like a sample set (no sampling, no
    cost); how they were drawn and whether the models trained on them, from its stats.json."""
    stats_path = settings.samples_root / "real" / "stats.json"
    stats = _read(stats_path, "real_stats.json")
    require(stats["method"] == "real", f"{stats_path}: method is {stats['method']!r}, expected 'real'")
    return {
        "set": "real", "method": "real", "setting": setting_label({"method": "real"}, style="stats"),
        "n_samples": stats["n_samples"], "real_notes": list(stats["notes"] or []), "real_mode": stats.get("mode"),
        "real_selection": stats.get("selection"), "real_seen": stats.get("seen_in_training"),
        **_scores(settings, "real"), **_cmmd(settings, "real"),
    }  # fmt: skip


def read_set(settings: TableSettings, name: str, method: str) -> dict:
    """One generated sample set's row (its method from its name): its stats.json and metric files
    merged into flat columns."""
    stats_path = settings.samples_root / name / "stats.json"
    gflops_path = settings.metrics_root / name / "gflops.json"
    stats = _read(stats_path)
    gflops = _read(gflops_path)

    recorded = stats_method(name)
    require(stats["method"] == recorded,
            f"{stats_path}: method is {stats['method']!r} but the set name {name!r} says {recorded!r}")
    # A composed set's setting is what it combines, read from its name (stats.json knows the
    # method it ran, not which of its settings the study varied).
    setting = stats["setting"] if method != "composed" else setting_label(
        {"method": method, "set": name, **{key: stats.get(key) for key in ("t_switch", "threshold", "cache_interval", "steps")}},
        style="stats")
    shallow_depth = stats["shallow_depth"]
    if method == "shallow" and shallow_depth is None:
        shallow_depth = stats["depth"]  # a shallow set is one U-ViT: its depth is the shallow depth

    return {
        "set": name, "method": method, "setting": setting,
        "classifier_type": stats["classifier_type"], "threshold": stats["threshold"],
        "t_switch": stats["t_switch"], "shallow_depth": shallow_depth, "depth": stats["depth"],
        # caching's N and k (stats.json has them in cache sets and DuoDiff sets with caching only)
        "cache_interval": stats.get("cache_interval"), "cache_keep": stats.get("cache_keep"),
        "router_threshold": stats.get("router_threshold"),  # Learning-to-Cache's (l2c sets only)
        "sampler": stats["sampler"], "steps": stats["steps"], "seed": stats["seed"],
        "n_samples": stats["n_samples"], "batch_size": stats["batch_size"],
        "device": stats["device"], "torch_version": stats["torch_version"],
        "timing_clock": stats.get("timing_clock", "wall"),  # sets sampled before it was recorded: wall
        "precision": stats.get("precision", "fp32"),  # sets sampled before --precision existed: fp32
        **_scores(settings, name),
        **_cmmd(settings, name),
        "gflops_per_forward": _number(gflops_path, gflops, "gflops_per_forward", positive=True),
        "gflops_per_forward_linear_conv": _number(gflops_path, gflops, "gflops_per_forward_linear_conv", positive=True),
        "gflops_per_image": _number(gflops_path, gflops, "gflops_per_image", positive=True),
        "layer_ratio": _number(gflops_path, gflops, "layer_ratio"),
        "gflops_convention": gflops["theoretical"],
        **_timed(settings, name, stats_path, stats),
    }
