"""How sure a trial's numbers are: intervals for accuracy, a paired comparison with the baseline, and the median.

Torch-free and exact where the question allows it; scipy.stats does the arithmetic:
- a mean of 0/1 scores gets a Wilson score interval (`binomtest(...).proportion_ci`); any other mean a seeded
  percentile bootstrap (`bootstrap`);
- a paired difference of 0/1 scores gets Newcombe's score interval (method 10, 1998; scipy has none, so it is
  written here from two Wilson intervals) and an exact McNemar p-value (a two-sided `binomtest` on the discordant
  pairs); other scores a seeded paired bootstrap;
- a median gets the distribution-free order-statistic interval (`binom` with p = 1/2), with its exact coverage.
Several tasks (groups) are averaged the way a trial's accuracy is: the mean of the per-task means, resampled within
each task (each task one sample of a multi-sample `bootstrap`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

CONFIDENCE = 0.95  # two-sided coverage of the intervals stored with every trial
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class Interval:
    """A point estimate, its interval, and how the interval was made ('wilson', 'bootstrap', ...)."""

    value: float
    low: float
    high: float
    method: str


@dataclass(frozen=True)
class PairedDifference:
    """Candidate minus baseline on the same samples: the difference, its interval, and McNemar's p (0/1 only)."""

    diff: float
    low: float
    high: float
    method: str
    p_value: float | None
    improved: int | None = None  # discordant pairs: candidate right, baseline wrong (0/1 scores only)
    worsened: int | None = None  # candidate wrong, baseline right


def _check_confidence(confidence: float) -> None:
    """A two-sided confidence must lie strictly between 0 and 1 (one line naming it, before scipy's own message)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def is_binary(scores: Sequence[float]) -> bool:
    """Whether every score is 0 or 1 (then the exact binomial methods apply)."""
    return all(s in (0.0, 1.0) for s in scores)


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (two-sided `confidence`)."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got {successes} of {n}")
    _check_confidence(confidence)
    interval = scipy_stats.binomtest(successes, n).proportion_ci(confidence, method="wilson")
    return max(0.0, float(interval.low)), min(1.0, float(interval.high))


def _group_ids(n: int, groups: Sequence[str] | None) -> list[np.ndarray]:
    """Indices of each group's samples (one group when `groups` is None)."""
    if groups is None:
        return [np.arange(n)]
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} labels for {n} samples")
    labels = np.asarray(groups, dtype=object)
    return [np.flatnonzero(labels == label) for label in dict.fromkeys(groups)]


def _grouped_mean(values: np.ndarray, ids: list[np.ndarray]) -> float:
    return float(np.mean([values[i].mean() for i in ids]))


def _bootstrap(values: np.ndarray, ids: list[np.ndarray], confidence: float, seed: int,
               resamples: int) -> tuple[float, float]:
    """Percentile interval of the mean of group means, resampling within each group (seeded).

    Each group is one sample of scipy's multi-sample `bootstrap`, which resamples every sample on its own. The
    percentile method, not scipy's default BCa: BCa's jackknife fails on the constant and near-constant scores
    pruning often gives, and the percentile interval is the one stored with older trials. scipy refuses a sample of
    one value; such a group's mean cannot change under resampling, so it enters the statistic as a constant."""
    varying = [values[group] for group in ids if len(group) > 1]
    fixed = sum(float(values[group[0]]) for group in ids if len(group) == 1)
    if not varying:
        point = fixed / len(ids)
        return point, point

    def mean_of_group_means(*samples: np.ndarray, axis: int = -1) -> np.ndarray:
        return (sum(sample.mean(axis=axis) for sample in samples) + fixed) / len(ids)

    result = scipy_stats.bootstrap(varying, mean_of_group_means, n_resamples=resamples, confidence_level=confidence,
                                   method="percentile", vectorized=True, rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def mean_interval(scores: Sequence[float], groups: Sequence[str] | None = None, confidence: float = CONFIDENCE, *,
                  seed: int = BOOTSTRAP_SEED, resamples: int = BOOTSTRAP_RESAMPLES) -> Interval:
    """Interval of the mean score (of the per-group means): Wilson for 0/1 scores of one group, else bootstrap."""
    if not scores:
        raise ValueError("no scores to bound")
    values = np.asarray(scores, dtype=float)
    ids = _group_ids(len(values), groups)
    point = _grouped_mean(values, ids)
    if len(ids) == 1 and is_binary(scores):
        low, high = wilson_interval(int(values.sum()), len(values), confidence)
        return Interval(point, low, high, "wilson")
    _check_confidence(confidence)
    low, high = _bootstrap(values, ids, confidence, seed, resamples)
    return Interval(point, min(low, point), max(high, point), "bootstrap")


def lower_bound(scores: Sequence[float], confidence: float, groups: Sequence[str] | None = None) -> float:
    """One-sided lower confidence bound of the mean score: the low end of the two-sided (2c - 1) interval."""
    if not 0.5 <= confidence < 1:
        raise ValueError(f"a one-sided confidence must be in [0.5, 1), got {confidence}")
    if confidence == 0.5:
        return mean_interval(scores, groups, 0.5).value
    return mean_interval(scores, groups, 2 * confidence - 1).low


def mcnemar_exact_p(improved: int, worsened: int) -> float:
    """Exact two-sided McNemar p-value: a binomial test of the discordant pairs against p = 1/2."""
    if improved < 0 or worsened < 0:
        raise ValueError(f"discordant counts must be >= 0, got {improved} and {worsened}")
    if improved + worsened == 0:
        return 1.0
    return float(scipy_stats.binomtest(min(improved, worsened), improved + worsened, 0.5).pvalue)


def newcombe_paired_interval(both: int, improved: int, worsened: int, neither: int,
                             confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Newcombe's (1998, method 10) score interval for a difference of paired proportions, candidate - baseline.
    scipy has no paired-proportion interval, so it is built here from scipy's two Wilson intervals.

    `both`: both right; `improved`: only the candidate right; `worsened`: only the baseline right; `neither`.
    """
    n = both + improved + worsened + neither
    p1, p2 = (both + improved) / n, (both + worsened) / n
    l1, u1 = wilson_interval(both + improved, n, confidence)
    l2, u2 = wilson_interval(both + worsened, n, confidence)
    margins = (both + improved) * (worsened + neither) * (both + worsened) * (improved + neither)
    # Newcombe's phi: the correlation of the two responses, a positive one shrunk by n/2 (and floored at 0)
    cross = both * neither - improved * worsened
    cross = max(0.0, cross - n / 2) if cross > 0 else cross
    phi = cross / math.sqrt(margins) if margins else 0.0
    diff = p1 - p2
    delta = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    epsilon = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return diff - delta, diff + epsilon


def paired_difference(candidate: Sequence[float], baseline: Sequence[float], groups: Sequence[str] | None = None,
                      confidence: float = CONFIDENCE, *, seed: int = BOOTSTRAP_SEED,
                      resamples: int = BOOTSTRAP_RESAMPLES) -> PairedDifference:
    """Candidate minus baseline on the same samples: Newcombe + exact McNemar for 0/1 scores of one group, else a
    seeded paired bootstrap (no p-value)."""
    if len(candidate) != len(baseline) or not candidate:
        raise ValueError(f"paired scores need the same non-zero length, got {len(candidate)} and {len(baseline)}")
    cand, base = np.asarray(candidate, dtype=float), np.asarray(baseline, dtype=float)
    ids = _group_ids(len(cand), groups)
    diff = _grouped_mean(cand, ids) - _grouped_mean(base, ids)
    if len(ids) == 1 and is_binary(candidate) and is_binary(baseline):
        both = int(np.sum((cand == 1) & (base == 1)))
        improved = int(np.sum((cand == 1) & (base == 0)))
        worsened = int(np.sum((cand == 0) & (base == 1)))
        neither = len(cand) - both - improved - worsened
        low, high = newcombe_paired_interval(both, improved, worsened, neither, confidence)
        return PairedDifference(diff, low, high, "newcombe", mcnemar_exact_p(improved, worsened), improved, worsened)
    _check_confidence(confidence)
    low, high = _bootstrap(cand - base, ids, confidence, seed, resamples)
    return PairedDifference(diff, min(low, diff), max(high, diff), "paired bootstrap", None)


def median_coverage(n: int, rank: int) -> float:
    """P(x_(rank) <= median < x_(n - rank + 1)) for n draws of a continuous distribution (binomial, p = 1/2)."""
    return float(1 - 2 * scipy_stats.binom.cdf(rank - 1, n, 0.5))


def median_rank(n: int, confidence: float) -> int:
    """The largest rank k whose order statistics x_(k), x_(n-k+1) hold the median with `confidence` (1 if none).
    (scipy's `quantile_test(...).confidence_interval` picks the same order statistics but gives no interval, only
    NaN, when even min..max falls short; the fallback to min..max with its coverage is what latency rounds need.)"""
    ranks = np.arange(1, (n + 1) // 2 + 1)
    enough = ranks[1 - 2 * scipy_stats.binom.cdf(ranks - 1, n, 0.5) >= confidence]
    return int(enough.max()) if enough.size else 1


def median_interval(samples: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(low, high, coverage): the distribution-free interval of the median; min..max (with its smaller coverage)
    when there are too few samples to reach `confidence`."""
    if not samples:
        raise ValueError("no samples to bound")
    ordered = sorted(samples)
    n = len(ordered)
    rank = median_rank(n, confidence)
    return ordered[rank - 1], ordered[n - rank], median_coverage(n, rank)
