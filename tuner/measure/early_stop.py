"""Stopping a hopeless trial early, the multi-objective way: an exact bound on the accuracy it can still reach.

Optuna's pruners compare one intermediate value with other trials' and are single-objective; here the question is
only whether the trial can still meet the study's accuracy constraint. After each chunk of documents, the best
accuracy the trial could finish with is its score so far plus a perfect score (`max_score`) on every document not
yet scored, per task, averaged over tasks like the trial's accuracy. When even that is below the floor, no outcome
of the remaining documents can make the trial feasible, so stopping it changes no decision: the bound is exact, not
statistical. Torch-free.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Progress:
    """What one task has scored so far: the sum of its per-document scores over `n_scored` of `size` documents."""

    score_sum: float
    n_scored: int
    size: int


def best_reachable_accuracy(progress: Sequence[Progress], max_score: float = 1.0) -> float:
    """The highest accuracy (mean over tasks of each task's mean score) the trial can still finish with."""
    if not progress:
        raise ValueError("no task to bound")
    return sum((p.score_sum + (p.size - p.n_scored) * max_score) / p.size for p in progress) / len(progress)


def stop_reason(progress: Sequence[Progress], floor: float | None, max_score: float = 1.0) -> str | None:
    """Why the trial cannot meet `floor` whatever the remaining documents score, or None while it still can (or
    when there is no floor)."""
    if floor is None:
        return None
    best = best_reachable_accuracy(progress, max_score)
    if best >= floor:
        return None
    scored = sum(p.n_scored for p in progress)
    total = sum(p.size for p in progress)
    return (f"stopped after {scored} of {total} documents: even a perfect score on the other {total - scored} "
            f"reaches at most {best:.3f}, below the accuracy floor {floor:.3f}")


def progress_of(scores: Mapping[str, Sequence[float]], sizes: Mapping[str, int]) -> list[Progress]:
    """Per-task progress from the scores seen so far (tasks not started yet count as unscored)."""
    return [Progress(float(sum(scores.get(task, ()))), len(scores.get(task, ())), size)
            for task, size in sizes.items()]


def bound_applies(task: Any) -> bool:
    """Whether a task's accuracy is a mean of per-document scores, higher being better (a `PreparedTask`): the bound
    holds only then, and only while the scores stay in [0, 1], which `stop_check_for` checks as they arrive."""
    metrics = task.task.config.metric_list or [{}]
    return task.higher_is_better and metrics[0].get("aggregation", "mean") == "mean"


def stop_check_for(sizes: Mapping[str, int], floor: float) -> Callable[[dict[str, list[float]]], str | None]:
    """The check the evaluator runs after each chunk: the reason to stop (see `stop_reason`), or None."""

    def stop_check(scores: dict[str, list[float]]) -> str | None:
        if any(not 0.0 <= s <= 1.0 for values in scores.values() for s in values):
            return None  # a score outside [0, 1]: the bound would not hold, so never stop
        return stop_reason(progress_of(scores, sizes), floor)

    return stop_check
