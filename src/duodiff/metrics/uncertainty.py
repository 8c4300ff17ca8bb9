"""Confidence intervals of the scores: the jackknife over the sample set's images.

A score compares a set of N generated images with a fixed reference; drawn again with other
seeds, the same method would give another N images and another score. The interval estimates
that spread from the set itself, the reference held fixed (it is the same for every set, so it
cancels in the comparisons the study makes): score ± 1.96 se, with se the jackknife standard
error (Quenouille-Tukey; Efron & Stein 1981) over the n leave-one-image-out scores s_(i):

    se² = (n - 1) / n · Σ_i (s_(i) - mean(s_(.)))²

Why the jackknife and not the bootstrap: a bootstrap resample repeats about a third of the
images, which shrinks a set's apparent diversity and pushes the Fréchet distance up, by more
than the spread it is meant to measure when the set has fewer images than feature dimensions
(Inception: 100 images, 2048 dimensions). Its intervals then sit beside the score instead of
around it: percentile intervals above it (1,000 held-out real digits: FD 73.1, percentile
interval [64, 107]), basic ones below it (Inception FID 42.4 of 100 real digits: [26.3, 34.0]),
and BCa's bias correction becomes infinite and gives no interval at all. Leaving one image out
repeats none. Measured on the digits model: four sets of 1,000 samples from four seeds scored FD
229.6, 224.6, 250.5 and 220.1 (standard deviation 13.5); their jackknife standard errors were
14.2, 14.7, 15.9 and 12.6.

The statistics take index arrays, so the heavy parts are computed once per set: for FD the
features times the reference's covariance square root (or their Gram matrix) and their
second-moment matrix, which a leave-one-out subset changes by one rank-one term, for KID the
kernel matrices.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

CONFIDENCE = 0.95
Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile


def jackknife_interval(statistic, n: int) -> tuple[float, float]:
    """score ± 1.96 jackknife standard errors of statistic(indices into the set's n images);
    NaNs when n < 3 (one left out leaves too little to score)."""
    if n < 3:
        return float("nan"), float("nan")
    everything = np.arange(n)
    value = statistic(everything)
    left_out = np.array([statistic(np.delete(everything, i)) for i in range(n)])
    se = np.sqrt((n - 1) / n * np.square(left_out - left_out.mean()).sum())
    return float(value - Z_95 * se), float(value + Z_95 * se)


def frechet_statistic(features: np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray, ref_sigma_sqrt: np.ndarray):
    """indices -> Fréchet distance of features[indices] to the reference (fid.frechet_distance's
    formula). A subset of the images is its count vector c (how often each image is in it), so the mean and
    the covariance's trace are weighted sums over the n images: mu = c.X / m, m = sum c. The trace
    term Tr((R S R)^1/2), R = S_ref^1/2, is the sum of the square roots of the eigenvalues of R S R
    (d x d, from the weighted second moment X^T diag(c) X, which is the whole set's plus the rank-one
    terms of the few images whose count is not 1: one for a jackknife subset) or, with fewer images
    than dimensions (Inception: 50 images, 2048 dimensions), of the subset's centred m x m Gram
    matrix, which shares its non-zero eigenvalues and is gathered from the n x n Gram matrix
    computed once."""
    n, d = features.shape
    projected = features @ ref_sigma_sqrt
    gram = projected @ projected.T if n <= d else None
    second_moment = projected.T @ projected if gram is None else None
    squared_norms = np.square(features).sum(axis=1)
    trace_ref = float(np.trace(ref_sigma))

    def fd(idx: np.ndarray) -> float:
        counts = np.bincount(idx, minlength=n).astype(np.float64)
        m = counts.sum()
        mu = counts @ features / m
        trace_sigma = (counts @ squared_norms - m * np.square(mu).sum()) / (m - 1)
        if gram is not None:
            block = gram[np.ix_(idx, idx)]
            centred = block - block.mean(axis=0) - block.mean(axis=1)[:, None] + block.mean()
            eigenvalues = np.linalg.eigvalsh(centred / (m - 1))
        else:
            mu_y = counts @ projected / m
            changed = np.flatnonzero(counts != 1)
            weighted = (
                second_moment + projected[changed].T @ ((counts[changed] - 1)[:, None] * projected[changed])
                if len(changed) < d
                else projected.T @ (counts[:, None] * projected)
            )
            cov_y = (weighted - m * np.outer(mu_y, mu_y)) / (m - 1)
            eigenvalues = np.linalg.eigvalsh(cov_y)
        trace_covmean = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
        return float(np.square(mu - ref_mu).sum() + trace_sigma + trace_ref - 2 * trace_covmean)

    return fd


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's kernel k(x, y) = (x.y / d + 1)^3 (Binkowski et al. 2018; clean-fid's kernel_distance)."""
    return (x @ y.T / x.shape[1] + 1) ** 3


class KidKernels(NamedTuple):
    """KID's three kernel matrices between a set's features (x) and the reference's (r), computed
    once per set (kid_kernels) and shared by KID over subsets (distances.kid_with_std) and its
    interval (kid_statistic)."""

    xx: np.ndarray  # (n, n)
    rr: np.ndarray  # (r, r)
    xr: np.ndarray  # (n, r)


def kid_kernels(features: np.ndarray, ref_features: np.ndarray) -> KidKernels:
    return KidKernels(
        xx=polynomial_kernel(features, features),
        rr=polynomial_kernel(ref_features, ref_features),
        xr=polynomial_kernel(features, ref_features),
    )


def kid_statistic(kernels: KidKernels):
    """indices -> unbiased MMD^2 of features[indices] and the whole reference, the cubic kernel.

    MMD^2_u = sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{a != b} k(r_a, r_b) / (r (r - 1))
              - 2 sum_{i, a} k(x_i, r_a) / (m r)
    over the m images i, j of the subset (an image counted twice makes a pair with itself, as
    i != j). With the count vector c:
    sum_{i != j} = c^T K c - c.diag(K), and the cross term c.(K_xr 1) / (m r)."""
    n, r = len(kernels.xx), len(kernels.rr)
    diagonal = np.diag(kernels.xx).copy()
    rr = (kernels.rr.sum() - np.trace(kernels.rr)) / (r * (r - 1))
    k_xr_mean = kernels.xr.mean(axis=1)

    def kid(idx: np.ndarray) -> float:
        counts = np.bincount(idx, minlength=n).astype(np.float64)
        m = counts.sum()
        xx = (counts @ kernels.xx @ counts - counts @ diagonal) / (m * (m - 1))
        return float(xx + rr - 2 * (counts @ k_xr_mean) / m)

    return kid
