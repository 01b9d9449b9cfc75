"""The confident early stop: its bound's coverage (exactly for 0/1 scores, by simulation for others), its
false-stop rate over looks at the level, its power next to the exact rule, the policy's checks, and the
false-stop replay's counting. No model: the scores are constructed."""

from __future__ import annotations

import math
import random

import pytest
from scipy.stats import hypergeom

from tuner.bench.false_stops import documents_until_stop, replay_false_stops
from tuner.measure.confident_stop import accuracy_upper_bound, hypergeometric_upper, task_upper_bound
from tuner.measure.early_stop import EarlyStopping, StopCheck, planned_looks
from tuner.search.replay import Measured, MeasuredGrid

CONFIDENT = EarlyStopping(8, "confident", 0.95)


@pytest.mark.parametrize(("size", "right", "n"), [(40, 24, 8), (40, 30, 16), (100, 50, 10), (20, 19, 5)])
def test_the_hypergeometric_bound_misses_at_most_delta_computed_exactly(size: int, right: int, n: int) -> None:
    """Summing the hypergeometric law over every k seen: the chance that the bound falls below the true fraction is
    at most delta (a bound one step too tight would exceed it at some of these populations)."""
    delta = 0.05
    miss = sum(hypergeom.pmf(k, size, right, n) for k in range(0, n + 1)
               if hypergeom.pmf(k, size, right, n) > 0 and hypergeometric_upper(k, n, size, delta) < right / size)
    assert miss <= delta
    tighter = sum(hypergeom.pmf(k, size, right, n) for k in range(0, n + 1)
                  if hypergeometric_upper(k, n, size, 0.5) < right / size)
    assert tighter > miss  # the level matters: at delta 0.5 it misses more often


def test_the_serfling_bound_covers_scores_between_0_and_1_by_simulation() -> None:
    """Scores in [0, 1] but not 0/1 (the finite-population Hoeffding bound): over 4,000 draws of 10 of 40, the
    bound is below the population mean in at most 5% (Hoeffding is conservative: far fewer)."""
    rng = random.Random(0)
    population = [rng.choice((0.0, 0.5, 1.0)) for _ in range(40)]
    mean = sum(population) / 40
    misses = sum(task_upper_bound(rng.sample(population, 10), 40, 0.05) < mean for _ in range(4000))
    assert misses / 4000 <= 0.05


def test_the_bound_is_capped_by_the_exact_one_and_is_exact_at_the_ends() -> None:
    """Never above perfect scores on the rest; exact with nothing or everything scored; two tasks average."""
    assert task_upper_bound([1.0] * 8, 40, 0.01) <= (8 + 32) / 40
    assert task_upper_bound([], 40, 0.05) == 1.0 and task_upper_bound([1.0, 0.0], 2, 0.05) == 0.5
    assert task_upper_bound([0.0] * 8, 40, 0.05) < 0.4  # far below the exact 32 / 40
    assert accuracy_upper_bound({"a": [0.0] * 8}, {"a": 40, "b": 10}, 0.05) == pytest.approx(
        (task_upper_bound([0.0] * 8, 40, 0.05) + 1.0) / 2)  # task b not started: perfect
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        task_upper_bound([1.5], 4, 0.05)


def _stops(population: list[float], policy: EarlyStopping, floor: float, orders: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    return sum(documents_until_stop({"t": rng.sample(population, len(population))}, policy, floor) is not None
               for _ in range(orders))


def test_a_trial_exactly_at_the_floor_is_stopped_at_most_at_the_rate_the_level_allows() -> None:
    """The worst case of a trial that meets the floor: its accuracy is the floor. Over 2,000 random orders of 40
    documents in 5 chunks (4 looks), it is stopped in at most 5% of them; spending the whole 5% at every look (no
    split over the looks) would stop it more often than the split rule does."""
    population = [1.0] * 24 + [0.0] * 16  # accuracy 0.6 == the floor
    stops = _stops(population, CONFIDENT, 0.6, 2000)
    assert stops / 2000 <= 0.05
    assert planned_looks({"t": 40}, 8) == 4
    unsplit = EarlyStopping(8, "confident", 1 - 4 * 0.05)  # each look at the full 5%
    assert _stops(population, unsplit, 0.6, 2000) > stops


def test_the_confident_rule_stops_a_hopeless_trial_long_before_the_exact_one() -> None:
    """Against a floor of 0.6 (24 of 40): a trial right on 1 of 8 per chunk stops after its first chunk, one right on
    2 of 8 after its second; the exact rule waits for both until 16 wrong answers are out of reach (after 24)."""
    one = {"t": [1.0] + [0.0] * 7}
    two = {"t": [1.0, 1.0] + [0.0] * 6}
    assert documents_until_stop({"t": one["t"] * 5}, CONFIDENT, 0.6) == 8
    assert documents_until_stop({"t": two["t"] * 5}, CONFIDENT, 0.6) == 16
    assert documents_until_stop({"t": one["t"] * 5}, EarlyStopping(8), 0.6) == 24
    assert documents_until_stop({"t": two["t"] * 5}, EarlyStopping(8), 0.6) == 24


def test_the_check_names_its_rule_and_dominance_stops_below_a_faster_point() -> None:
    """A floor it still meets and a faster stored point at 0.9: dominance stops it, the plain rule does not."""
    scores = {"t": [1.0] * 4 + [0.0] * 4}  # bound 0.825 at 5% over 4 looks
    plain = StopCheck({"t": 40}, CONFIDENT, 0.5, beaten_by=0.9)
    assert plain(scores) is None and plain.rule is None
    dominance = StopCheck({"t": 40}, EarlyStopping(8, "confident", 0.95, True), 0.5, beaten_by=0.9)
    reason = dominance(scores)
    assert dominance.rule == "confident-dominated" and "0.900 of a stored, faster trial" in reason
    assert dominance.bound == pytest.approx(accuracy_upper_bound(scores, {"t": 40}, 0.05 / 4))
    exact = StopCheck({"t": 40}, EarlyStopping(8), 0.9)
    assert exact(scores) is None  # 4 + 32 of 40 can still reach 0.9


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"chunk_size": 0}, "chunk_size must be an integer >= 1"),
    ({"chunk_size": 8, "rule": "bayes"}, "rule must be one of exact, confident"),
    ({"chunk_size": 8, "level": 1.0}, "level must be a number in \\[0.5, 1\\)"),
    ({"chunk_size": 8, "dominance": "yes"}, "dominance must be true or false"),
])
def test_a_bad_policy_is_one_line(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EarlyStopping(**kwargs)


def _measured(scores: list[float]) -> Measured:
    return Measured(accuracy=sum(scores) / len(scores), prefill_ms=1.0, constraints={}, stopped=False,
                    trial_seconds=1.0, eval_seconds=1.0, documents=len(scores),
                    scores=tuple(("t", i, s) for i, s in enumerate(scores)))


def test_the_replay_counts_false_and_true_stops_and_the_documents_skipped() -> None:
    """Three trials of 16: all right (meets 0.6: never stopped), all wrong (stopped after its first chunk of 8 in
    every order), and one exactly at 0.625 in a bad stored order (its first chunk all wrong)."""
    baseline = _measured([1.0] * 16)
    edge = [0.0] * 6 + [1.0] * 10
    grid = MeasuredGrid(baseline, {"right": _measured([1.0] * 16), "wrong": _measured([0.0] * 16),
                                   "edge": _measured(edge)})
    rate = replay_false_stops(grid, CONFIDENT, 0.6, orders=50)
    assert (rate.trials_meeting_floor, rate.trials_below_floor) == (2, 1)
    assert rate.true_stops == 50 and rate.own_order_true_stops == 1
    assert rate.false_stops <= 50 and rate.rate == rate.false_stops / 100
    assert rate.documents_total == 3 * 50 * 16 and rate.documents_scored <= rate.documents_total - 50 * 8
    first_chunk = task_upper_bound([0.0] * 6 + [1.0] * 2, 16, 0.05)  # the stored order's one look
    assert rate.own_order_false_stops == (1 if first_chunk < 0.6 else 0)
    assert "false stops of the confident at 0.95 rule" in rate.describe()
    assert math.isclose(replay_false_stops(grid, EarlyStopping(8), 0.6, orders=5).rate, 0.0)
