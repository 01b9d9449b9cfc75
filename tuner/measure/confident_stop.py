"""A statistical early stop: a one-sided upper confidence bound on the accuracy a trial would finish with.

The exact stop (`tuner.measure.early_stop`) waits until even perfect scores on the rest cannot reach the floor; this
bound stops much sooner, at a stated risk. A task's accuracy is the mean score over its N subset documents. After n
of them are scored, the scored ones are treated as a sample drawn without replacement from the N (the evaluation
order carries no information about difficulty; `tuner.bench.false_stops` measures the rate over random orders and
the stored one). The bound on the mean of all N, at risk `delta`:

- scores all 0 or 1: the exact hypergeometric bound. With K right answers among the N, the number right among the n
  scored is hypergeometric(N, K, n); the bound is the largest K whose lower tail P(X <= k) at the k seen exceeds
  `delta`, over N. It is exact for the finite population, with no approximation (Clopper-Pearson's construction).
- other scores in [0, 1]: Serfling's (1974) Hoeffding inequality for sampling without replacement,
  mean + sqrt((1 - (n - 1) / N) * ln(1 / delta) / (2 n)); it needs only that every score lies in [0, 1].

Either is capped by the exact bound (perfect scores on the rest), so the confident stop never waits longer than the
exact one. Torch-free.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import hypergeom


@functools.lru_cache(maxsize=65536)  # a replay asks the same few (k, n, size, delta) many times
def hypergeometric_upper(k: int, n: int, size: int, delta: float) -> float:
    """The (1 - delta) upper bound on the fraction right among `size` documents, with `k` right of `n` drawn."""
    candidates = np.arange(k, k + size - n + 1)  # right answers the whole subset can hold, given those seen
    tails = hypergeom.cdf(k, size, candidates, n)  # decreasing in the candidate
    return float(candidates[tails > delta].max()) / size  # the smallest candidate has tail 1 > delta


def serfling_upper(scores: Sequence[float], size: int, delta: float) -> float:
    """The (1 - delta) upper bound on the mean of `size` scores in [0, 1], from the `len(scores)` drawn without
    replacement (Serfling's finite-population Hoeffding bound)."""
    n = len(scores)
    return sum(scores) / n + math.sqrt((1 - (n - 1) / size) * math.log(1 / delta) / (2 * n))


def task_upper_bound(scores: Sequence[float], size: int, delta: float) -> float:
    """A (1 - delta) upper confidence bound on a task's accuracy (the mean over its `size` documents) from the
    scores seen so far, never above the exact bound (perfect scores on the rest); ValueError outside [0, 1]."""
    n = len(scores)
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if n > size:
        raise ValueError(f"{n} scores for a task of {size} documents")
    if any(not 0.0 <= s <= 1.0 for s in scores):
        raise ValueError("the bound needs scores in [0, 1]")
    exact = (sum(scores) + size - n) / size
    if n == 0 or n == size:
        return exact
    if all(s in (0.0, 1.0) for s in scores):
        bound = hypergeometric_upper(int(sum(scores)), n, size, delta)
    else:
        bound = serfling_upper(scores, size, delta)
    return min(bound, exact)


def accuracy_upper_bound(scores: Mapping[str, Sequence[float]], sizes: Mapping[str, int], delta: float) -> float:
    """A (1 - delta) upper bound on a trial's accuracy (the mean over tasks of each task's mean): `delta` is split
    evenly over the tasks with scores (a union bound); a task not started yet counts as perfect."""
    started = [task for task in sizes if scores.get(task)]
    share = delta / max(1, len(started))
    return sum(task_upper_bound(scores.get(task, ()), size, share) if task in started else 1.0
               for task, size in sizes.items()) / len(sizes)
