"""Paired differences to the full model (duodiff.metrics.paired): the jackknife over the shared
sample index, against hand computations, and the refusal to pair sets of other noise."""

import numpy as np
import pytest
from scipy import linalg

from duodiff.core.errors import DuodiffError
from duodiff.metrics.paired import check_pairing, paired_differences
from duodiff.metrics.uncertainty import Z_95, frechet_statistic, jackknife_interval

PAIRING = {"seed": 0, "n_samples": 7, "batch_size": 4, "shape": [1, 8, 8], "label_classes": 0}


def fd_by_hand(x, ref):
    """Fréchet distance with scipy's matrix square root, written from the formula."""
    mu1, mu2 = x.mean(axis=0), ref.mean(axis=0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(ref, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


def kid_by_hand(x, ref):
    """Unbiased MMD² with the cubic polynomial kernel, as explicit double sums."""
    d = x.shape[1]

    def k(a, b):
        return (a @ b / d + 1) ** 3

    m, r = len(x), len(ref)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    rr = sum(k(ref[a], ref[b]) for a in range(r) for b in range(r) if a != b) / (r * (r - 1))
    xr = sum(k(x[i], ref[a]) for i in range(m) for a in range(r)) / (m * r)
    return xx + rr - 2 * xr


def reference_terms(ref):
    mu, sigma = ref.mean(axis=0), np.cov(ref, rowvar=False)
    return mu, sigma, linalg.sqrtm(sigma).real


def jackknife_by_hand(values_all, left_out):
    n = len(left_out)
    se = np.sqrt((n - 1) / n * sum((v - np.mean(left_out)) ** 2 for v in left_out))
    return values_all, values_all - Z_95 * se, values_all + Z_95 * se


def test_paired_differences_are_the_jackknife_of_the_difference_by_hand():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(9, 2))
    base = rng.normal(size=(7, 2))
    sample = base + rng.normal(scale=0.3, size=(7, 2)) + 0.2
    got = paired_differences(sample, base, ref, *reference_terms(ref), intervals=True)
    for name, score in (("fid", fd_by_hand), ("kid", kid_by_hand)):
        # Leave sample i out of *both* sets, then take the difference.
        left_out = [score(np.delete(sample, i, 0), ref) - score(np.delete(base, i, 0), ref) for i in range(7)]
        expected = jackknife_by_hand(score(sample, ref) - score(base, ref), left_out)
        assert (got[f"{name}_diff"], got[f"{name}_diff_ci_low"], got[f"{name}_diff_ci_high"]) == pytest.approx(
            expected, rel=1e-6, abs=1e-9), name


def test_a_set_paired_with_itself_differs_by_exactly_zero():
    rng = np.random.default_rng(1)
    ref, base = rng.normal(size=(20, 3)), rng.normal(size=(12, 3))
    got = paired_differences(base, base, ref, *reference_terms(ref), intervals=True)
    assert [got[k] for k in ("fid_diff", "fid_diff_ci_low", "fid_diff_ci_high", "kid_diff")] == [0, 0, 0, 0]


def test_without_reference_features_only_the_frechet_difference():
    rng = np.random.default_rng(2)
    ref, base = rng.normal(size=(20, 3)), rng.normal(size=(12, 3))
    got = paired_differences(base + 0.1, base, None, *reference_terms(ref), intervals=False)
    assert got["kid_diff"] is None and np.isnan(got["fid_diff_ci_low"])
    assert got["fid_diff"] == pytest.approx(fd_by_hand(base + 0.1, ref) - fd_by_hand(base, ref), rel=1e-6)


def half_width(low, high):
    return (high - low) / 2


@pytest.mark.parametrize("seed", [3, 4])
def test_the_paired_interval_narrows_as_the_sets_correlate(seed):
    """A set that is the baseline plus a little noise (strongly correlated, sample by sample) has
    a far narrower paired interval than the unpaired one, sqrt(se_set² + se_base²); an independent
    set does not, and the width grows with the noise between the pairs."""
    rng = np.random.default_rng(seed)
    ref = rng.normal(size=(300, 4))
    base = rng.normal(size=(200, 4))
    terms = reference_terms(ref)
    widths = []
    for noise in (0.05, 0.3, 1.0):
        sample = (base + rng.normal(scale=noise, size=base.shape)) / np.sqrt(1 + noise**2)
        widths.append(half_width(*[paired_differences(sample, base, None, *terms, intervals=True)[k]
                                   for k in ("fid_diff_ci_low", "fid_diff_ci_high")]))
    assert widths[0] < widths[1] < widths[2]
    independent = rng.normal(size=base.shape)
    unpaired = np.hypot(*[half_width(*jackknife_interval(frechet_statistic(x, *terms), len(x)))
                          for x in (base + rng.normal(scale=0.05, size=base.shape), independent)])
    assert widths[0] < unpaired / 4
    paired_independent = half_width(*[paired_differences(independent, base, None, *terms, intervals=True)[k]
                                      for k in ("fid_diff_ci_low", "fid_diff_ci_high")])
    assert paired_independent > widths[0] * 4


def test_sets_of_other_noise_or_labels_are_refused():
    check_pairing("s", dict(PAIRING), "full", dict(PAIRING))  # the same draws: fine
    for key, value in (("seed", 1), ("n_samples", 8), ("batch_size", 2), ("label_classes", 10), ("shape", [3, 8, 8])):
        with pytest.raises(DuodiffError, match=rf"^--samples s cannot be paired with --baseline full: they were drawn "
                                               rf"from different noise and labels \({key} "):
            check_pairing("s", {**PAIRING, key: value}, "full", dict(PAIRING))
    with pytest.raises(DuodiffError, match="its stats.json has no pairing record"):
        check_pairing("s", None, "full", dict(PAIRING))
    with pytest.raises(DuodiffError, match="the baseline's stats.json has no pairing record"):
        check_pairing("s", dict(PAIRING), "full", None)
