"""The median of a few measurements and its distribution-free confidence interval.

The interval is the classical one from order statistics (binomial ranks; e.g. Conover, Practical
Nonparametric Statistics, the confidence interval for a quantile): with n values sorted,
x_(1) <= ... <= x_(n), the interval [x_(k), x_(n+1-k)] holds the true median with probability

    1 - 2 P(B <= k - 1),   B ~ Binomial(n, 1/2),

whatever the distribution of the values (continuous, independent draws), since each value lies
below the median with probability 1/2. `median_interval` takes the narrowest such interval whose
coverage is at least the confidence asked for. Being a probability of a discrete count, the
coverage reached is usually above it (n = 7: [x_(1), x_(7)], 98.4%; n = 10: [x_(2), x_(9)], 97.9%);
with n <= 5 no interval reaches 95% (n = 5: [x_(1), x_(5)] covers 93.8%), and the widest one,
[min, max], is returned with the coverage it has. Callers record that coverage beside the interval.

Why not a bootstrap: for the handful of rounds a timing run affords, the percentile bootstrap of
the median can only return sample values anyway, and its coverage is not known; the order
statistics give the same kind of interval with an exact coverage.
"""

from __future__ import annotations

import math
from fractions import Fraction


def median(values) -> float:
    """The sample median (the mean of the two middle values when there is an even number)."""
    x = sorted(values)
    n = len(x)
    assert n > 0, "the median of nothing"
    middle = n // 2
    return float(x[middle]) if n % 2 else (x[middle - 1] + x[middle]) / 2


def rank_coverage(n: int, k: int) -> float:
    """P(x_(k) <= median <= x_(n+1-k)) for n independent draws: 1 - 2 P(Binomial(n, 1/2) <= k - 1)."""
    assert 1 <= k <= (n + 1) // 2, (n, k)
    tail = Fraction(sum(math.comb(n, i) for i in range(k)), 2**n)
    return float(1 - 2 * tail)


def interval_ranks(n: int, confidence: float = 0.95) -> tuple[int, int, float]:
    """-> (k, n + 1 - k, coverage): the 1-based ranks of the narrowest order-statistics interval
    for the median whose coverage is >= `confidence`; [min, max] (k = 1) when none reaches it."""
    assert n >= 1 and 0 < confidence < 1, (n, confidence)
    k = 1
    while k + 1 <= (n + 1) // 2 and rank_coverage(n, k + 1) >= confidence:
        k += 1
    return k, n + 1 - k, rank_coverage(n, k)


def median_interval(values, confidence: float = 0.95) -> dict:
    """{"median", "low", "high", "coverage", "ranks"} of `values` (see the module docstring)."""
    x = sorted(values)
    low_rank, high_rank, coverage = interval_ranks(len(x), confidence)
    return {
        "median": median(x),
        "low": float(x[low_rank - 1]),
        "high": float(x[high_rank - 1]),
        "coverage": coverage,
        "ranks": [low_rank, high_rank],
    }
