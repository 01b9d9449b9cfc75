"""Adaptive latency rounds: the sequential rule's schedule and coverage (simulated, no model), the workload's options,
rounds ended after a complete round, the best stored speed-up, and a measured trial's record of its rounds."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import create_trial

from tuner.config import PruningConfig
from tuner.config.workload import Workload, WorkloadError
from tuner.evaluation.tasks import load_tasks
from tuner.measure.latency import _run_interleaved
from tuner.measure.trial import TrialMeasurer
from tuner.models.loading import load_model
from tuner.results.record import BASELINE_ROLE, TrialRecord
from tuner.results.sequential import (
    ALPHA,
    STOP_DOMINATED,
    STOP_MAX,
    STOP_TOLERANCE,
    SequentialSpeedup,
    look_schedule,
)
from tuner.results.stats import median_rank
from tuner.search.dominance import best_speedup_at

optuna.logging.set_verbosity(optuna.logging.WARNING)
MAX_ROUNDS = 20


def test_looks_are_fixed_in_advance_and_spend_at_most_alpha() -> None:
    """Catches a schedule that looks where no interval reaches its level (alpha wasted or overspent)."""
    looks = look_schedule(3, MAX_ROUNDS)
    assert [look.rounds for look in looks][:3] == [6, 8, 9]  # 5 rounds' min..max misses 1/16 > alpha_1 = 0.061
    assert looks[-1].rounds == MAX_ROUNDS and sum(look.miss for look in looks) <= ALPHA + 1e-12
    assert [look.rounds for look in look_schedule(5, 5)] == [5]  # min == max: one look, at the end


def _skewed_rounds(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Paired round times with a right tail (stalls): exp of gamma-distributed noise on 100 ms and 50 ms."""
    return 100 * np.exp(rng.gamma(2.0, 0.05, n)), 50 * np.exp(rng.gamma(2.0, 0.05, n))


def test_interval_at_the_stopping_round_keeps_its_stated_coverage() -> None:
    """Simulates paired rounds from a skewed distribution with a known median ratio, stops them with the rule, and
    checks that the interval at the stopping round holds that median at least at the stated level (less 3
    Monte-Carlo standard errors); a naive rule (a fixed-n 90% interval, looked at after every round) covers less.
    Catches an alpha spent twice, a look outside the schedule, or an interval that ignores the look's rank."""
    rng = np.random.default_rng(0)
    big_b, big_c = _skewed_rounds(rng, 1_000_000)
    true = float(np.median(big_b / big_c))
    rule, tolerance, n_sequences = SequentialSpeedup(3, MAX_ROUNDS, 0.08), 0.08, 2000
    sequential = naive = 0
    stops = []
    for _ in range(n_sequences):
        base, cand = _skewed_rounds(rng, MAX_ROUNDS)
        ratios = list(base / cand)
        for n in range(1, MAX_ROUNDS + 1):
            point = statistics.median(base[:n]) / statistics.median(cand[:n])
            if rule.decide(ratios[:n], point) is not None:
                low, high = rule.interval(ratios[:n], point)
                sequential += low <= true <= high
                stops.append(n)
                break
        for n in range(3, MAX_ROUNDS + 1):
            ordered, rank = sorted(ratios[:n]), median_rank(n, 1 - ALPHA)
            point = statistics.median(base[:n]) / statistics.median(cand[:n])
            low, high = min(ordered[rank - 1], point), max(ordered[n - rank], point)
            if (high - low) / 2 <= tolerance * point or n == MAX_ROUNDS:
                naive += low <= true <= high
                break
    slack = 3 * (ALPHA * (1 - ALPHA) / n_sequences) ** 0.5
    assert len(stops) == n_sequences and min(stops) < MAX_ROUNDS  # it does stop early, sometimes
    assert sequential / n_sequences >= rule.confidence - slack
    assert rule.confidence >= 1 - ALPHA
    assert naive / n_sequences < 1 - ALPHA - slack  # peeking at a fixed-n interval is detectably worse


def test_decide_stops_for_tolerance_dominance_and_the_last_round() -> None:
    rule = SequentialSpeedup(3, 8, 0.05)
    tight = [2.0, 2.01, 1.99, 2.0, 2.02, 1.98]
    assert rule.decide(tight[:5], 2.0) is None  # round 5 is no look
    assert rule.decide(tight, 2.0) == STOP_TOLERANCE
    wide = [1.0, 3.0, 1.5, 2.5, 2.0, 1.2]
    assert rule.decide(wide, 2.0) is None and rule.decide(wide, 2.0, to_beat=3.5) == STOP_DOMINATED
    assert rule.decide([*wide, 1.1, 2.9], 2.0) == STOP_MAX


@pytest.mark.parametrize(("data", "culprit"), [
    ({"tolerance": -0.1}, "latency.tolerance"), ({"tolerance": 1.0}, "latency.tolerance"),
    ({"tolerance": True}, "latency.tolerance"), ({"min_repeats": 0}, "latency.min_repeats"),
    ({"repeats": 4, "min_repeats": 5}, "latency.min_repeats"),
])
def test_bad_adaptive_options_are_one_line_naming_them(data: dict, culprit: str) -> None:
    with pytest.raises(WorkloadError) as caught:
        Workload(**data)
    assert str(caught.value).startswith(culprit) and "\n" not in str(caught.value)


def test_adaptive_is_off_with_no_tolerance_or_no_room() -> None:
    assert Workload(repeats=10).adaptive and Workload(repeats=10).min_rounds == 3
    assert not Workload(repeats=10, tolerance=0).adaptive
    assert not Workload(repeats=10, min_repeats=10).adaptive
    assert not Workload(repeats=2).adaptive and Workload(repeats=2).min_rounds == 2  # the default minimum is capped


def test_rounds_end_after_a_complete_round() -> None:
    """Catches a stop in the middle of a round (one configuration one run short) or warm-up rounds counted."""
    calls = []
    runs = _run_interleaved({"a": None, "b": None}, lambda: calls.append(1) or len(calls), repeats=6, warmup=1,
                            until=lambda timed: len(timed["a"]) == 2)
    assert [len(v) for v in runs.values()] == [2, 2] and len(calls) == 6


def _trial(accuracy: float, speedup: float, **record: object) -> optuna.trial.FrozenTrial:
    config = PruningConfig(method="random", layer=2, keep_ratio=0.5)
    attrs = TrialRecord(config=config, accuracy=accuracy, speedup_same_run=speedup, **record).to_attrs()
    return create_trial(values=[accuracy, 1.0], params={"x": 0.0}, distributions={"x": FloatDistribution(0, 1)},
                        user_attrs=attrs)


def test_best_speedup_is_of_trials_at_no_lower_accuracy() -> None:
    """Catches a baseline or a stopped-early trial (its accuracy only a bound) setting the speed-up to beat."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    for trial in (_trial(0.8, 2.0), _trial(0.6, 3.0), _trial(0.9, 5.0, stopped_early=True),
                  _trial(0.95, 9.0, role=BASELINE_ROLE)):
        study.add_trial(trial)
    assert best_speedup_at(study, 0.7) == 2.0 and best_speedup_at(study, 0.5) == 3.0
    assert best_speedup_at(study, 0.85) is None


@pytest.fixture(scope="module")
def measurer_parts(saved_dirs: dict[str, Path]) -> tuple:
    loaded = load_model(str(saved_dirs["llava"]), dtype="float32", device="cpu", attn_implementation="sdpa")
    return loaded, load_tasks(["dart_shapes"], subset_size=2, seed=0)


def test_a_trial_records_its_rounds_and_why_they_stopped(measurer_parts: tuple) -> None:
    """Catches rounds that ignore the speed-up to beat, a record without its rounds' reason, or fixed rounds
    (tolerance 0) that stop early."""
    loaded, tasks = measurer_parts
    config = PruningConfig(method="random", layer=2, keep_ratio=0.5)
    adaptive = TrialMeasurer(loaded, tasks, Workload(new_tokens=2, repeats=8, warmup=0))
    record = adaptive.measure(config, best_speedup=lambda accuracy: 1e9)
    assert (record.latency_stop, record.prefill_repeats, record.latency_speedup_to_beat) == (STOP_DOMINATED, 6, 1e9)
    assert record.latency_confidence == pytest.approx(SequentialSpeedup(3, 8, 0.05).confidence)
    fixed = TrialMeasurer(loaded, tasks, Workload(new_tokens=2, repeats=4, warmup=0, tolerance=0))
    measured, rule, fields = fixed._time(config, to_beat=1e9)  # the rounds alone: accuracy is as above
    assert [m.single.prefill.repeats for m in measured.values()] == [4, 4] and rule is None
    assert set(fields) == {"latency_seconds"}
