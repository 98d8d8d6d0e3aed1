"""Paired comparisons with bootstrap confidence intervals, and the verdicts they allow.

Every "holds" this project prints comes from here: a claim is a signed difference (e.g. ``after - before`` for "the
refinement lowers the divergence"); it **holds** when the 95% bootstrap CI of the difference lies entirely on the
claimed side of zero, **does not hold** when it lies entirely on the other side, and is **not resolved** when it covers
zero. The criterion is fixed here, before any study runs.

Two resampling schemes, both around the full-data estimate ``t``:

- the *basic* (reverse-percentile) bootstrap interval ``[2 t - q_97.5, 2 t - q_2.5]`` (:func:`basic_ci`), for means
  and for FID/KID differences: resampling with replacement duplicates samples, which shifts set-level statistics in
  the bootstrap world, and the basic interval cancels that shift to first order;
- the *half-sample* bootstrap (:func:`half_sample_ci`: random halves of the units, drawn without replacement,
  ``t +- 1.96 sd``), for Sinkhorn divergences of a few conditions per (class, position) group: there a duplicated
  point changes its group's effective count, and the with-replacement replicates move by several standard errors
  (on the digits flow every replicate of ``after - before`` lay below the estimate). For a mean, the variance of a
  half-sample estimate around the pool is ``sigma^2 / (n - 1)``, the variance of the full estimate, which is what
  the interval uses; halves contain no duplicates.

Plain NumPy/SciPy; no Lightning, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import special

from lightning_ar.theory.records import Record

LEVEL = 0.95
DEFAULT_REPS = 2000
HOLDS, FAILS, UNRESOLVED, UNMEASURABLE = "holds", "does not hold", "not resolved", "not measurable"


@dataclass
class PairedComparison(Record):
    """A signed difference with its bootstrap CI and verdict.

    Attributes:
        estimate: The difference on the full data (e.g. mean over pairs of ``a - b``).
        low: Lower end of the 95% basic bootstrap CI.
        high: Upper end.
        num_pairs: Pairs (or clusters) resampled.
        verdict: ``holds`` / ``does not hold`` / ``not resolved`` for the claim's sign (see :func:`verdict`), or
            ``not measurable`` when there is nothing to compare.
    """

    estimate: float
    low: float
    high: float
    num_pairs: int
    verdict: str


def verdict(low: float, high: float, claim: str) -> str:
    """Verdict of a claim about the sign of a difference from its CI ``[low, high]``.

    Args:
        low: Lower end of the CI.
        high: Upper end.
        claim: ``"negative"`` (the claim is that the difference is below 0, e.g. a lower FID) or ``"positive"``.

    Returns:
        ``holds`` (CI entirely on the claimed side), ``does not hold`` (entirely on the other side), ``not resolved``
        (the CI covers 0) or ``not measurable`` (a NaN bound).
    """
    if claim not in ("negative", "positive"):
        raise ValueError(f"claim must be 'negative' or 'positive', got {claim!r}")
    if not (math.isfinite(low) and math.isfinite(high)):
        return UNMEASURABLE
    sign = -1.0 if claim == "negative" else 1.0
    lo, hi = sorted((sign * low, sign * high))
    if lo > 0:
        return HOLDS
    if hi < 0:
        return FAILS
    return UNRESOLVED


def bootstrap_ci(
    statistic: Callable[[np.ndarray], float], num: int, reps: int = DEFAULT_REPS, seed: int = 0
) -> tuple[float, float]:
    """95% basic bootstrap CI of ``statistic(idx)`` over resamples ``idx`` ``[num]`` of ``range(num)``.

    Args:
        statistic: Maps an index array (with repeats) to a number; it must apply the *same* indices to every
            member of a pair, which is what makes the comparison paired. ``statistic(arange(num))`` is the estimate.
        num: Number of units (pairs, clusters) to resample.
        reps: Bootstrap replicates.
        seed: Seed of the resampling (``numpy.random.default_rng``).

    Returns:
        ``(low, high)``; NaN when ``num < 2`` or every replicate is NaN.
    """
    if num < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    replicates = [statistic(rng.integers(0, num, num)) for _ in range(reps)]
    return basic_ci(float(statistic(np.arange(num))), replicates)


def percentile_ci(replicates: np.ndarray | list[float]) -> tuple[float, float]:
    """95% percentile interval of bootstrap ``replicates`` (NaNs dropped; NaN bounds when none is left)."""
    values = np.asarray(replicates, dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.nan, math.nan
    tail = 100 * (1 - LEVEL) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def half_sample_ci(estimate: float, replicates: np.ndarray | list[float]) -> tuple[float, float]:
    """``estimate +- 1.96 sd(replicates)`` for replicates computed on random halves (without replacement)."""
    values = np.asarray(replicates, dtype=float)
    values = values[np.isfinite(values)]
    if values.size < 2 or not math.isfinite(estimate):
        return math.nan, math.nan
    half = float(special.ndtri(0.5 + LEVEL / 2)) * float(values.std(ddof=1))
    return estimate - half, estimate + half


def basic_ci(estimate: float, replicates: np.ndarray | list[float]) -> tuple[float, float]:
    """95% basic bootstrap interval ``[2 t - q_high, 2 t - q_low]`` of the estimate ``t`` from its ``replicates``."""
    low, high = percentile_ci(replicates)
    if not math.isfinite(estimate):
        return math.nan, math.nan
    return 2 * estimate - high, 2 * estimate - low


def paired_difference(
    a: np.ndarray, b: np.ndarray, claim: str, reps: int = DEFAULT_REPS, seed: int = 0
) -> PairedComparison:
    """Mean of the paired differences ``a - b`` ``[n]`` with its bootstrap CI and the verdict of ``claim``.

    Args:
        a: ``[n]`` values of the first member of each pair.
        b: ``[n]`` values of the second member (same unit: same seed, same sample, same label).
        claim: ``"negative"`` (claim: ``a < b``) or ``"positive"`` (claim: ``a > b``).
        reps: Bootstrap replicates.
        seed: Resampling seed.
    """
    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired values must have the same length, got {a.size} and {b.size}")
    diff = a - b
    low, high = bootstrap_ci(lambda idx: float(diff[idx].mean()), diff.size, reps, seed)
    estimate = float(diff.mean()) if diff.size else math.nan
    return PairedComparison(estimate, low, high, int(diff.size), verdict(low, high, claim))


def cluster_bootstrap(
    statistic: Callable[[np.ndarray], float], num_clusters: int, claim: str, reps: int = DEFAULT_REPS, seed: int = 0
) -> PairedComparison:
    """A difference computed by ``statistic`` from cluster weights, with a bootstrap over clusters.

    ``statistic(counts)`` gets ``[num_clusters]`` multiplicities (all ones for the full data) and returns the
    difference; resampling clusters (e.g. generated images, which contribute one condition per token) with
    replacement and passing the counts keeps every member of a pair on the same resample.

    Args:
        statistic: ``counts [C] -> difference``.
        num_clusters: Number of clusters ``C``.
        claim: ``"negative"`` or ``"positive"`` (see :func:`verdict`).
        reps: Bootstrap replicates.
        seed: Resampling seed.
    """
    estimate = float(statistic(np.ones(num_clusters)))

    def replicate(idx: np.ndarray) -> float:
        return float(statistic(np.bincount(idx, minlength=num_clusters).astype(float)))

    low, high = bootstrap_ci(replicate, num_clusters, reps, seed)
    return PairedComparison(estimate, low, high, num_clusters, verdict(low, high, claim))
