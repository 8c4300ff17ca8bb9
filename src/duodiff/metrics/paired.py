"""Paired differences to the baseline set: is a set's score worse than the full model's?

Every sample set of a study starts sample i from the same noise and label (the sets' stats.json
`pairing` records say so; `duodiff sample` draws them from the seed alone), so the sets are
paired sample by sample. Their scores' errors are then strongly correlated: the same hard draws
make both sets worse. The difference D = S(set) - S(baseline) of a score S (Fréchet distance or
KID against the same reference) is estimated far more precisely than either score alone, with
the jackknife over the *shared* sample index: leave sample i out of both sets,

    D_(i) = S(set without i) - S(baseline without i),   se² = (n - 1) / n · Σ_i (D_(i) - mean D_(.))²

and the 95% interval is D ± 1.96 se (uncertainty.py's jackknife, same conventions). On the
embedded default the paired interval is 2-12× narrower than the unpaired one.

Pairing holds only for sets drawn from the same noise and labels: same seed, number of samples,
batch layout, image shape and label draw (`check_pairing`). Anything else is refused.

Each scored set leaves its features beside its scores (`<score>_features.npz`: the features, the
network's sha256 and the set's pairing record), so a later set is compared without rescoring
the baseline.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from duodiff.core.errors import DuodiffError, require
from duodiff.core.io import atomic_path
from duodiff.metrics.uncertainty import frechet_statistic, jackknife_interval, kid_kernels, kid_statistic

# The features a score file was computed from: fid.json -> fid_features.npz.
FEATURES_SUFFIX = "_features.npz"


def features_path(score_file) -> Path:
    score_file = Path(score_file)
    return score_file.with_name(score_file.stem + FEATURES_SUFFIX)


def read_pairing(samples) -> dict | None:
    """The set's pairing record (stats.json `pairing`), or None: the real-data set, or a set
    sampled before the record existed."""
    stats = Path(samples) / "stats.json"
    if not stats.is_file():
        return None
    return json.loads(stats.read_text()).get("pairing")


def save_features(path, features: np.ndarray, network_sha256: str, pairing: dict | None) -> None:
    """The features (float32) a score was computed from, with what a paired comparison checks."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, features=features.astype(np.float32), network_sha256=np.array(network_sha256),
                 pairing=np.array(json.dumps(pairing, sort_keys=True)))


def _read_features_file(path, *keys: str) -> list:
    """The members `keys` of a features file (read lazily: the pairing record alone reads no features)."""
    path = Path(path)
    require(path.is_file(), f"--baseline: {path} does not exist; score the baseline set first (duodiff score)")
    try:
        with np.load(path) as data:
            return [data[key] if key == "features" else str(data[key]) for key in keys]
    except (OSError, ValueError, KeyError) as error:
        raise DuodiffError(f"--baseline: {path} is not a features file of `duodiff score` ({error})") from None


def load_pairing(path) -> dict | None:
    """The pairing record of the set whose features `path` holds."""
    (pairing,) = _read_features_file(path, "pairing")
    return json.loads(pairing)


def load_baseline(path, network_sha256: str, n_features: int) -> np.ndarray:
    """The baseline's features (float64), checked to be of the same network and count."""
    features, sha = _read_features_file(path, "features", "network_sha256")
    require(
        sha == network_sha256,
        f"--baseline: {path} holds features of another network (sha256 {sha}) than this score's ({network_sha256}); "
        "rescore the baseline",
    )
    require(
        len(features) == n_features,
        f"--baseline: {path} holds {len(features)} images' features but this set has {n_features}; paired differences "
        "need the same samples on both sides (metrics.fid.max_samples and sampling.n_samples the same)",
    )
    return features.astype(np.float64)


def check_pairing(samples, pairing: dict | None, baseline, baseline_pairing: dict | None) -> None:
    """Refuse to pair sets that were not drawn from the same noise and labels."""
    require(
        pairing is not None and baseline_pairing is not None,
        f"--samples {samples} cannot be paired with --baseline {baseline}: "
        + ("its" if pairing is None else "the baseline's")
        + " stats.json has no pairing record (real images, or a set sampled before it existed); "
        "resample it, or score it without --baseline",
    )
    differing = sorted(key for key in pairing.keys() | baseline_pairing.keys()
                       if pairing.get(key) != baseline_pairing.get(key))
    require(
        not differing,
        f"--samples {samples} cannot be paired with --baseline {baseline}: they were drawn from different noise and "
        "labels (" + "; ".join(f"{key} {pairing.get(key)!r} vs {baseline_pairing.get(key)!r}" for key in differing)
        + "); sample both with the same sampling.seed, n_samples and batch_size",
    )


def paired_jackknife(statistic, baseline_statistic, n: int, interval: bool = True) -> tuple[float, float, float]:
    """(D, low, high): D = statistic(all) - baseline_statistic(all) and its 95% interval, the
    jackknife (uncertainty.jackknife_interval) of the difference over the shared sample index: both
    statistics take index arrays into their n paired samples. NaN interval for n < 3 or without
    `interval`."""
    def difference(idx: np.ndarray) -> float:
        return statistic(idx) - baseline_statistic(idx)

    low, high = jackknife_interval(difference, n) if interval else (float("nan"), float("nan"))
    return float(difference(np.arange(n))), low, high


def paired_differences(features: np.ndarray, baseline_features: np.ndarray, ref_features: np.ndarray | None,
                       ref_mu: np.ndarray, ref_sigma: np.ndarray, ref_sigma_sqrt: np.ndarray, *, intervals: bool) -> dict:
    """The Fréchet distance's and (with reference features) KID's paired differences to the
    baseline, each with its 95% interval. KID here is the unbiased MMD² over all images on both
    sides (uncertainty.kid_statistic), the statistic whose interval the scores report."""
    n = len(features)
    fd, fd_base = (frechet_statistic(f, ref_mu, ref_sigma, ref_sigma_sqrt) for f in (features, baseline_features))
    diff, low, high = paired_jackknife(fd, fd_base, n, intervals)
    result = {"fid_diff": diff, "fid_diff_ci_low": low, "fid_diff_ci_high": high,
              "kid_diff": None, "kid_diff_ci_low": None, "kid_diff_ci_high": None}
    if ref_features is not None:
        kid, kid_base = (kid_statistic(kid_kernels(f, ref_features)) for f in (features, baseline_features))
        diff, low, high = paired_jackknife(kid, kid_base, n, intervals)
        result.update({"kid_diff": diff, "kid_diff_ci_low": low, "kid_diff_ci_high": high})
    return result
