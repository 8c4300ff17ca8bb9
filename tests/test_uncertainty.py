"""Confidence intervals: the bootstrap against a closed form, and the index statistics it resamples
against the full-set formulas and a hand computation."""

import math

import numpy as np
import pytest

from duodiff.metrics import fid
from duodiff.metrics.uncertainty import bootstrap_interval, frechet_statistic, kid_statistic, polynomial_kernel


def test_bootstrap_interval_of_a_mean_matches_the_normal_closed_form():
    # For the mean of n normal values the 95% interval is mean +- 1.96 s / sqrt(n); the basic
    # bootstrap over 4000 resamples lands within a few percent of its half-width.
    rng = np.random.default_rng(0)
    values = rng.normal(3.0, 2.0, size=400)
    low, high = bootstrap_interval(lambda idx: float(values[idx].mean()), len(values), 4000, seed=1)
    half = 1.96 * values.std(ddof=1) / math.sqrt(len(values))
    assert low == pytest.approx(values.mean() - half, abs=0.06 * half)
    assert high == pytest.approx(values.mean() + half, abs=0.06 * half)


def test_basic_interval_reflects_the_resamples_about_the_estimate():
    # Hand computation: with the same seeded resamples, the interval is [2 s - q97.5, 2 s - q2.5]
    # of the resampled statistic (here the max, whose resamples all lie at or below the estimate).
    values = np.array([1.0, 2.0, 4.0, 8.0, 9.0])
    stat = lambda idx: float(values[idx].max())  # noqa: E731
    low, high = bootstrap_interval(stat, 5, 2000, seed=7)
    rng = np.random.default_rng(7)  # scipy draws all resamples at once from the seeded generator
    draws = np.array([stat(row) for row in rng.integers(0, 5, (2000, 5))])
    q_low, q_high = np.percentile(draws, [2.5, 97.5])
    assert (low, high) == pytest.approx((2 * 9.0 - q_high, 2 * 9.0 - q_low), abs=1e-9)
    assert high > 9.0  # the max is biased low: the basic interval reaches above it


def test_bootstrap_interval_is_seeded_and_nan_without_spread():
    values = np.arange(10.0)
    stat = lambda idx: float(values[idx].mean())  # noqa: E731
    assert bootstrap_interval(stat, 10, 200, seed=3) == bootstrap_interval(stat, 10, 200, seed=3)
    assert bootstrap_interval(stat, 10, 200, seed=3) != bootstrap_interval(stat, 10, 200, seed=4)
    assert all(math.isnan(v) for v in bootstrap_interval(lambda idx: 1.0, 10, 50, seed=0))  # constant
    assert all(math.isnan(v) for v in bootstrap_interval(stat, 2, 50, seed=0))  # too few images
    assert all(math.isnan(v) for v in bootstrap_interval(stat, 10, 0, seed=0))  # switched off


def test_frechet_statistic_equals_the_full_formula_on_any_resample():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(60, 5))
    features = rng.normal(0.3, 1.2, size=(40, 5))
    mu, sigma = ref.mean(0), np.cov(ref, rowvar=False)
    stat = frechet_statistic(features, mu, sigma, fid.psd_sqrt(sigma))
    for idx in (np.arange(40), rng.integers(0, 40, 40), np.array([0, 0, 1, 2, 2, 2, 3])):
        x = features[idx]
        # Independent: the textbook ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2) with scipy's sqrtm.
        from scipy import linalg

        s1 = np.cov(x, rowvar=False)
        expected = np.sum((x.mean(0) - mu) ** 2) + np.trace(s1 + sigma - 2 * linalg.sqrtm(s1 @ sigma).real)
        assert stat(idx) == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_kid_statistic_by_hand_with_a_repeated_image():
    # d = 1, kernel k(x, y) = (x y + 1)^3. Samples [1, 1, 2] (image 0 twice), reference [0, 1].
    # Pairs i != j of the samples: (1,1) x2 -> 8 each, (1,2) x4 -> 27 each: (16 + 108) / 6.
    # Reference pairs a != b: (0,1) x2 -> 1 each: 2 / 2. Cross: k(1,0)=1, k(1,1)=8 (twice),
    # k(2,0)=1, k(2,1)=27: (1 + 8 + 1 + 8 + 1 + 27) / 6 = 46 / 6.
    features = np.array([[1.0], [2.0]])
    ref = np.array([[0.0], [1.0]])
    stat = kid_statistic(features, ref)
    expected = 124 / 6 + 1 - 2 * 46 / 6
    assert stat(np.array([0, 0, 1])) == pytest.approx(expected)
    assert polynomial_kernel(features, ref).tolist() == [[1.0, 8.0], [1.0, 27.0]]
