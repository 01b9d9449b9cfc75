"""How often an early-stopping rule stops a trial that would have met the floor: replayed on stored scores.

A measured grid (bench-search's plain grid, scored in full) stores every trial's per-document scores. Each trial's
documents are replayed in K random orders (and once in the evaluation's own order), in chunks as `Evaluator` scores
them, asking the rule after each chunk; a stop of a trial whose full accuracy meets the floor is a false stop. The
rule's own guarantee (`tuner.measure.confident_stop`) is a false-stop chance below 1 - level per trial.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tuner.measure.early_stop import EarlyStopping, StopCheck
from tuner.search.replay import MeasuredGrid


def documents_until_stop(scores: Mapping[str, Sequence[float]], policy: EarlyStopping, floor: float) -> int | None:
    """Documents scored when `policy` (without dominance) stops a trial whose tasks score `scores`, in that order
    and chunk by chunk as `Evaluator` asks; None when it runs to the end."""
    sizes = {task: len(values) for task, values in scores.items()}
    check = StopCheck(sizes, dataclasses.replace(policy, dominance=False), floor)
    seen: dict[str, list[float]] = {}
    last = list(sizes)[-1]
    for task, values in scores.items():
        for offset in range(0, len(values), policy.chunk_size):
            seen.setdefault(task, []).extend(values[offset:offset + policy.chunk_size])
            if task == last and offset + policy.chunk_size >= len(values):
                return None  # nothing left to skip: the loop never asks after the last chunk
            if check(seen):
                return sum(len(v) for v in seen.values())
    return None


@dataclass(frozen=True)
class FalseStopRate:
    """A rule's stops over the replays of a grid's trials, split by whether the trial's full accuracy met the floor."""

    rule: str
    level: float
    chunk_size: int
    floor: float
    orders: int  # random orders per trial
    trials_meeting_floor: int
    trials_below_floor: int
    false_stops: int  # over trials_meeting_floor * orders replays
    true_stops: int  # over trials_below_floor * orders replays
    documents_scored: int  # over every random replay
    documents_total: int
    own_order_false_stops: int  # in the evaluation's own order, one replay per trial
    own_order_true_stops: int

    @property
    def rate(self) -> float:
        """False stops per replay of a trial that meets the floor (0 when no trial does)."""
        replays = self.trials_meeting_floor * self.orders
        return self.false_stops / replays if replays else 0.0

    def describe(self) -> str:
        """One line for the report."""
        rule = "exact" if self.rule == "exact" else f"confident at {self.level:g}"
        replays = self.trials_meeting_floor * self.orders
        below = self.trials_below_floor * self.orders
        saved = 1 - self.documents_scored / self.documents_total if self.documents_total else 0.0
        return (f"false stops of the {rule} rule (chunks of {self.chunk_size}, floor {self.floor:.3f}), replayed on "
                f"the plain grid's scores in {self.orders} random orders: {self.false_stops} of {replays} replays of "
                f"the {self.trials_meeting_floor} trials meeting the floor ({100 * self.rate:.2f}%; allowed "
                f"{f'{100 * (1 - self.level):g}%' if self.rule == 'confident' else 'none'}); stopped "
                f"{self.true_stops} of {below} replays of the {self.trials_below_floor} below it; "
                f"{100 * saved:.0f}% of documents skipped; in the evaluation's own order {self.own_order_false_stops} "
                f"false and {self.own_order_true_stops} true stops")


def _by_task(scores: Sequence[tuple[str, int, float]]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for task, _, score in scores:
        out.setdefault(task, []).append(score)
    return out


def replay_false_stops(grid: MeasuredGrid, policy: EarlyStopping, floor: float, *, orders: int,
                       seed: int = 0) -> FalseStopRate:
    """Replay `policy`'s floor rule over every grid point that stored its scores, in `orders` seeded random orders
    of each task's documents and in the stored order; ValueError when no point stored scores."""
    if orders < 1:
        raise ValueError(f"orders must be >= 1, got {orders}")
    rng = np.random.default_rng(seed)
    trials = [_by_task(m.scores) for m in grid.points.values() if m.scores]
    if not trials:
        raise ValueError("no grid point stored per-document scores to replay")
    counts = {"meeting": 0, "below": 0, "false": 0, "true": 0, "scored": 0, "total": 0, "own_false": 0, "own_true": 0}
    for scores in trials:
        meets = np.mean([np.mean(v) for v in scores.values()]) >= floor  # a trial's accuracy: mean of task means
        counts["meeting" if meets else "below"] += 1
        kind = "false" if meets else "true"
        if documents_until_stop(scores, policy, floor) is not None:
            counts[f"own_{kind}"] += 1
        total = sum(len(v) for v in scores.values())
        for _ in range(orders):
            shuffled = {task: rng.permutation(values).tolist() for task, values in scores.items()}
            stopped_at = documents_until_stop(shuffled, policy, floor)
            counts[kind] += stopped_at is not None
            counts["scored"] += total if stopped_at is None else stopped_at
            counts["total"] += total
    return FalseStopRate(policy.rule, policy.level, policy.chunk_size, floor, orders, counts["meeting"],
                         counts["below"], counts["false"], counts["true"], counts["scored"], counts["total"],
                         counts["own_false"], counts["own_true"])
