"""Statistics of the rollout-error study: means over starts (and model seeds) with bootstrap
95 % confidence intervals, vectorised (one matrix product for every replicate and step)."""
from __future__ import annotations

import warnings

import numpy as np


def _quantiles(point: np.ndarray, boots: np.ndarray, ci: float):
    alpha = (1 - ci) / 2
    with warnings.catch_warnings():  # steps where no start is alive anymore are NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanquantile(boots, [alpha, 1 - alpha], axis=0)
    return point, lo, hi


def bootstrap_masked_mean(values: np.ndarray, mask: np.ndarray, reps: int,
                          rng: np.random.Generator, ci: float = 0.95):
    """Per-column mean of `values` (N,H) over rows where `mask`, with a bootstrap CI over rows
    (multinomial resampling weights, one matrix product for all reps and columns)."""
    n = len(values)
    v = np.where(mask, values, 0.0)
    m = mask.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        point = v.sum(0) / m.sum(0)
        w = rng.multinomial(n, np.full(n, 1.0 / n), size=reps).astype(np.float64)  # (B, N)
        boots = (w @ v) / (w @ m)
    if not reps:
        return point, point, point
    return _quantiles(point, boots, ci)


def hierarchical_bootstrap_mean(values: np.ndarray, mask: np.ndarray, reps: int,
                                rng: np.random.Generator, ci: float = 0.95):
    """Per-column mean of `values` (S,N,H) over the valid (seed, start) pairs, with a two-level
    bootstrap CI: each replicate resamples the S model seeds, then the N starts within each
    drawn seed, so the interval carries model-training variance as well as start variance
    (with few seeds it is wide, as it should be)."""
    s, n, h = values.shape
    v = np.where(mask, values, 0.0).reshape(s * n, h)
    m = mask.reshape(s * n, h).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        point = v.sum(0) / m.sum(0)
        seeds = rng.multinomial(s, np.full(s, 1.0 / s), size=reps)            # (B, S)
        starts = rng.multinomial(n, np.full(n, 1.0 / n), size=(reps, s))      # (B, S, N)
        w = (seeds[:, :, None] * starts).reshape(reps, s * n).astype(np.float64)
        boots = (w @ v) / (w @ m)
    if not reps:
        return point, point, point
    return _quantiles(point, boots, ci)
