"""How sure a trial's numbers are: intervals for accuracy, a paired comparison with the baseline, and the median.

Torch-free and exact where the question allows it:
- a mean of 0/1 scores gets a Wilson score interval; any other mean a seeded percentile bootstrap;
- a paired difference of 0/1 scores gets Newcombe's score interval (method 10, 1998) and an exact McNemar p-value
  (two-sided binomial test on the discordant pairs); other scores a seeded paired bootstrap;
- a median gets the distribution-free order-statistic interval (binomial with p = 1/2), with its exact coverage.
Several tasks (groups) are averaged the way a trial's accuracy is: the mean of the per-task means, resampled within
each task.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

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


def _z(confidence: float) -> float:
    """The standard normal quantile of a two-sided `confidence`."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def is_binary(scores: Sequence[float]) -> bool:
    """Whether every score is 0 or 1 (then the exact binomial methods apply)."""
    return all(s in (0.0, 1.0) for s in scores)


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (two-sided `confidence`)."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got {successes} of {n}")
    z = _z(confidence)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


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
    """Percentile interval of the mean of group means, resampling within each group (seeded)."""
    rng = np.random.default_rng(seed)
    stats = np.zeros(resamples)
    for group in ids:
        picks = rng.integers(0, len(group), size=(resamples, len(group)))
        stats += values[group][picks].mean(axis=1)
    stats /= len(ids)
    alpha = (1 - confidence) / 2
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))


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
    _z(confidence)
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
    n = improved + worsened
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(improved, worsened) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def newcombe_paired_interval(both: int, improved: int, worsened: int, neither: int,
                             confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Newcombe's (1998, method 10) score interval for a difference of paired proportions, candidate - baseline.

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
    _z(confidence)
    low, high = _bootstrap(cand - base, ids, confidence, seed, resamples)
    return PairedDifference(diff, min(low, diff), max(high, diff), "paired bootstrap", None)


def median_coverage(n: int, rank: int) -> float:
    """P(x_(rank) <= median < x_(n - rank + 1)) for n draws of a continuous distribution (binomial, p = 1/2)."""
    return 1 - 2 * sum(math.comb(n, j) for j in range(rank)) / 2 ** n


def median_rank(n: int, confidence: float) -> int:
    """The largest rank k whose order statistics x_(k), x_(n-k+1) hold the median with `confidence` (1 if none)."""
    rank = 1
    for k in range(1, (n + 1) // 2 + 1):
        if median_coverage(n, k) >= confidence:
            rank = k
    return rank


def median_interval(samples: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(low, high, coverage): the distribution-free interval of the median; min..max (with its smaller coverage)
    when there are too few samples to reach `confidence`."""
    if not samples:
        raise ValueError("no samples to bound")
    ordered = sorted(samples)
    n = len(ordered)
    rank = median_rank(n, confidence)
    return ordered[rank - 1], ordered[n - rank], median_coverage(n, rank)
