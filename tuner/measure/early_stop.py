"""Stopping a hopeless trial early, the multi-objective way: an exact bound on the accuracy it can still reach.

Optuna's pruners compare one intermediate value with other trials' and are single-objective; here the question is
only whether the trial can still meet the study's accuracy constraint. After each chunk of documents, the best
accuracy the trial could finish with is its score so far plus a perfect score (`max_score`) on every document not
yet scored, per task, averaged over tasks like the trial's accuracy. When even that is below the floor, no outcome
of the remaining documents can make the trial feasible, so stopping it changes no decision: the bound is exact, not
statistical. The `confident` rule (`tuner.measure.confident_stop`) stops sooner, at a stated risk; either rule may
also stop a trial that a stored, faster point beats on accuracy (`dominance`). Torch-free.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tuner.measure.confident_stop import accuracy_upper_bound

RULES = ("exact", "confident")


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


def progress_of(scores: Mapping[str, Sequence[float]], sizes: Mapping[str, int]) -> list[Progress]:
    """Per-task progress from the scores seen so far (tasks not started yet count as unscored)."""
    return [Progress(float(sum(scores.get(task, ()))), len(scores.get(task, ())), size)
            for task, size in sizes.items()]


def bound_applies(task: Any) -> bool:
    """Whether a task's accuracy is a mean of per-document scores, higher being better (a `PreparedTask`): the bound
    holds only then, and only while the scores stay in [0, 1], which `StopCheck` checks as they arrive."""
    metrics = task.task.config.metric_list or [{}]
    return task.higher_is_better and metrics[0].get("aggregation", "mean") == "mean"


@dataclass(frozen=True)
class EarlyStopping:
    """How trials stop early: scored `chunk_size` documents at a time, stopped by `rule` (`exact`: no outcome of
    the rest reaches the floor; `confident`: the accuracy's upper bound at `level` is below it), and with
    `dominance` also once a stored point that is faster has a higher accuracy than that bound."""

    chunk_size: int
    rule: str = "exact"
    level: float = 0.95
    dominance: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"early_stopping.chunk_size must be an integer >= 1, got {self.chunk_size!r}")
        if self.rule not in RULES:
            raise ValueError(f"early_stopping.rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        if isinstance(self.level, bool) or not isinstance(self.level, (int, float)) or not 0.5 <= self.level < 1:
            raise ValueError(f"early_stopping.level must be a number in [0.5, 1), got {self.level!r}")
        if not isinstance(self.dominance, bool):
            raise ValueError(f"early_stopping.dominance must be true or false, got {self.dominance!r}")


def planned_looks(sizes: Mapping[str, int], chunk_size: int) -> int:
    """How many times the chunk loop asks whether to stop: after every chunk but the very last."""
    return max(1, sum(math.ceil(size / chunk_size) for size in sizes.values()) - 1)


class StopCheck:
    """The check the evaluator runs after each chunk of one trial (`Evaluator.evaluate`'s `stop_check`): the reason
    to stop, or None; after a stop, `bound` and `rule` say what stopped it.

    The confident rule spends its risk 1 - level evenly over the planned looks (a union bound), so the chance that
    a trial whose full accuracy meets the floor is ever stopped stays below 1 - level, however many chunks it has.
    `beaten_by`: the best stored accuracy of a point faster than this trial (dominance), if any; or a function that
    finds it, called once, at the first look the floor does not stop (it may measure the trial's latency first).
    """

    def __init__(self, sizes: Mapping[str, int], policy: EarlyStopping, floor: float | None,
                 beaten_by: float | Callable[[], float | None] | None = None) -> None:
        self.sizes, self.policy, self.floor = dict(sizes), policy, floor
        self._beaten_by = beaten_by
        self.delta = (1 - policy.level) / planned_looks(self.sizes, policy.chunk_size)
        self.bound: float | None = None
        self.rule: str | None = None

    def beaten_by(self) -> float | None:
        """The accuracy a faster stored point holds (found on the first call), or None."""
        if callable(self._beaten_by):
            self._beaten_by = self._beaten_by()
        return self._beaten_by

    def upper_bound(self, scores: Mapping[str, Sequence[float]]) -> float:
        """The accuracy this trial can still finish with: exact, or at the policy's confidence."""
        if self.policy.rule == "exact":
            return best_reachable_accuracy(progress_of(scores, self.sizes))
        return accuracy_upper_bound(scores, self.sizes, self.delta)

    def __call__(self, scores: dict[str, list[float]]) -> str | None:
        if any(not 0.0 <= s <= 1.0 for values in scores.values() for s in values):
            return None  # a score outside [0, 1]: neither bound holds, so never stop
        bound = self.upper_bound(scores)
        scored, total = sum(len(v) for v in scores.values()), sum(self.sizes.values())
        how = ("even a perfect score on the rest reaches" if self.policy.rule == "exact" else
               f"at {100 * self.policy.level:g}% confidence the accuracy is")
        if self.floor is not None and bound < self.floor:
            target = f"the accuracy floor {self.floor:.3f}"
            self.rule = self.policy.rule
        elif self.policy.dominance and (beaten_by := self.beaten_by()) is not None and bound < beaten_by:
            target = f"the accuracy {beaten_by:.3f} of a stored, faster trial"
            self.rule = f"{self.policy.rule}-dominated"
        else:
            return None
        self.bound = bound
        return f"stopped after {scored} of {total} documents: {how} at most {bound:.3f}, below {target}"
