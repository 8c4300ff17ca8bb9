"""Confidence intervals: the jackknife against closed forms, and the subset statistics it
evaluates against the full-set formulas and a hand computation."""

import math

import numpy as np
import pytest

from duodiff.metrics import distances
from duodiff.metrics.uncertainty import (
    Z_95,
    frechet_statistic,
    jackknife_interval,
    kid_kernels,
    kid_statistic,
    polynomial_kernel,
)


def test_jackknife_interval_of_a_mean_is_the_textbook_interval():
    # For the mean the jackknife standard error is exactly s / sqrt(n) (s: the sample standard
    # deviation), so the interval is mean +- 1.96 s / sqrt(n), to rounding.
    rng = np.random.default_rng(0)
    values = rng.normal(3.0, 2.0, size=400)
    low, high = jackknife_interval(lambda idx: float(values[idx].mean()), len(values))
    half = 1.959963984540054 * values.std(ddof=1) / math.sqrt(len(values))
    assert (low, high) == pytest.approx((values.mean() - half, values.mean() + half), rel=1e-10)
    assert Z_95 == pytest.approx(1.959963984540054)


def test_jackknife_interval_by_hand_on_three_values():
    # Values 1, 2, 6; statistic: the mean of squares. Leave-one-out: (4+36)/2 = 20, (1+36)/2 = 18.5,
    # (1+4)/2 = 2.5; their mean 41/3; se^2 = 2/3 * sum (s_i - 41/3)^2.
    values = np.array([1.0, 2.0, 6.0])
    stat = lambda idx: float(np.square(values[idx]).mean())  # noqa: E731
    loo = np.array([20.0, 18.5, 2.5])
    se = math.sqrt(2 / 3 * np.square(loo - loo.mean()).sum())
    assert jackknife_interval(stat, 3) == pytest.approx((41 / 3 - Z_95 * se, 41 / 3 + Z_95 * se))
    assert stat(np.arange(3)) == pytest.approx(41 / 3)


def test_jackknife_interval_has_no_width_without_spread_and_none_for_tiny_sets():
    assert jackknife_interval(lambda idx: 5.0, 10) == (5.0, 5.0)
    assert all(math.isnan(v) for v in jackknife_interval(lambda idx: 1.0, 2))


@pytest.mark.parametrize("n, d", [(40, 5), (12, 30)])  # more images than dimensions, and fewer (Inception)
def test_frechet_statistic_equals_the_full_formula_on_any_resample(n, d):
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(60, d))
    features = rng.normal(0.3, 1.2, size=(n, d))
    mu, sigma = ref.mean(0), np.cov(ref, rowvar=False)
    stat = frechet_statistic(features, mu, sigma, distances.psd_sqrt(sigma))
    leave_one_out = np.delete(np.arange(n), 7)  # the jackknife's subsets: a small update of the whole set
    for idx in (np.arange(n), leave_one_out, rng.integers(0, n, n), np.array([0, 0, 1, 2, 2, 2, 3])):
        x = features[idx]
        # Independent: the textbook ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2) with scipy's sqrtm.
        from scipy import linalg

        s1 = np.cov(x, rowvar=False)
        expected = np.sum((x.mean(0) - mu) ** 2) + np.trace(s1 + sigma - 2 * linalg.sqrtm(s1 @ sigma).real)
        assert stat(idx) == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_kid_statistic_by_hand_with_an_image_counted_twice():
    # d = 1, kernel k(x, y) = (x y + 1)^3. Samples [1, 1, 2] (image 0 twice), reference [0, 1].
    # Pairs i != j of the samples: (1,1) x2 -> 8 each, (1,2) x4 -> 27 each: (16 + 108) / 6.
    # Reference pairs a != b: (0,1) x2 -> 1 each: 2 / 2. Cross: k(1,0)=1, k(1,1)=8 (twice),
    # k(2,0)=1, k(2,1)=27: (1 + 8 + 1 + 8 + 1 + 27) / 6 = 46 / 6.
    features = np.array([[1.0], [2.0]])
    ref = np.array([[0.0], [1.0]])
    stat = kid_statistic(kid_kernels(features, ref))
    expected = 124 / 6 + 1 - 2 * 46 / 6
    assert stat(np.array([0, 0, 1])) == pytest.approx(expected)
    assert polynomial_kernel(features, ref).tolist() == [[1.0, 8.0], [1.0, 27.0]]
