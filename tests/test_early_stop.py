"""Early stopping of hopeless trials: the exact bound, the chunk loop stopping at the first chunk where the bound
says so and not before, and stopped trials never chosen by export (no model: the scores are constructed)."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import CategoricalDistribution

from tuner import PruningConfig
from tuner.evaluation.runner import Evaluator, SampleResult
from tuner.measure.early_stop import EarlyStopping, Progress, StopCheck, best_reachable_accuracy, progress_of
from tuner.results import pareto_trials
from tuner.results.export import NoTrialQualifies, Rule, candidates, choose_trial

# 20 documents in chunks of 5, floor 0.6 (12 right needed). After chunk 1: 1 right, best (1 + 15) / 20 = 0.8.
# After chunk 2: 2 right, best (2 + 10) / 20 = 0.6, exactly the floor: still feasible, so not stopped.
# After chunk 3: 2 right, best (2 + 5) / 20 = 0.35 < 0.6: stop there, with 5 documents never scored.
CHUNKS = [[0, 0, 1, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
FLOOR = 0.6


def test_bound_is_exact_arithmetic() -> None:
    """Two tasks: the bound averages per-task bounds the way a trial's accuracy averages per-task means."""
    progress = [Progress(score_sum=3, n_scored=4, size=10), Progress(score_sum=0, n_scored=0, size=5)]
    assert best_reachable_accuracy(progress) == pytest.approx(((3 + 6) / 10 + 1.0) / 2)
    assert progress_of({"a": [1.0, 0.0]}, {"a": 4, "b": 2}) == [Progress(1.0, 2, 4), Progress(0.0, 0, 2)]
    assert StopCheck({"a": 10, "b": 5}, EarlyStopping(5), None)({"a": [1.0, 1.0, 1.0, 0.0]}) is None
    finished = {"t": [1.0] * 12 + [0.0] * 8}  # a finished trial exactly at the floor is feasible
    assert StopCheck({"t": 20}, EarlyStopping(5), FLOOR)(finished) is None


class _Task:
    """The bits of a PreparedTask the chunk loop reads."""

    def __init__(self, name: str, size: int) -> None:
        self.name, self.subset = name, type("Subset", (), {"size": size})()


def _evaluator(chunks: list[list[int]]) -> tuple[Evaluator, list[tuple[int, int]]]:
    """An Evaluator whose lmms-eval run is replaced by the constructed chunk scores; records each (offset, limit)."""
    evaluator = Evaluator.__new__(Evaluator)
    evaluator.tasks = [_Task("t", sum(len(c) for c in chunks))]
    calls: list[tuple[int, int]] = []

    def score(tasks: list, *, limit: int, offset: int) -> tuple[dict, list[SampleResult]]:
        calls.append((offset, limit))
        values = chunks[offset // limit if limit else 0][:limit]
        samples = [SampleResult("t", offset + i, None, "", "", float(v), 4, 2) for i, v in enumerate(values)]
        return {"t": {"exact_match": sum(values) / len(values)}}, samples

    evaluator._score = score
    return evaluator, calls


def test_chunks_stop_at_the_first_chunk_the_bound_allows_and_not_before() -> None:
    """Catches a rule that stops at the floor itself (chunk 2), one that waits for the end, or one that scores a
    chunk more than needed."""
    evaluator, calls = _evaluator(CHUNKS)
    metrics, samples, stopped = evaluator._score_in_chunks(5, StopCheck({"t": 20}, EarlyStopping(5), FLOOR))
    assert calls == [(0, 5), (5, 5), (10, 5)]
    assert len(samples) == 15 and stopped.startswith("stopped after 15 of 20 documents")
    assert "at most 0.350" in stopped and "floor 0.600" in stopped
    assert metrics["t"]["exact_match"] == pytest.approx(2 / 15)  # document-weighted over the scored chunks
    evaluator, calls = _evaluator(CHUNKS)
    _, samples, stopped = evaluator._score_in_chunks(5, StopCheck({"t": 20}, EarlyStopping(5), 0.35))
    assert stopped is None and len(calls) == 4 and len(samples) == 20  # a floor it can still reach: never stopped


def test_a_trial_that_misses_the_floor_only_in_its_last_chunk_is_complete_not_stopped() -> None:
    """Nothing is left to skip after the last chunk: the trial has its full accuracy (an ordinary infeasible
    trial), so it must not be stored as stopped with a bound."""
    chunks = [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [0, 0, 1, 0, 0]]  # 11 of 20 < 12 only at the end
    evaluator, calls = _evaluator(chunks)
    _, samples, stopped = evaluator._score_in_chunks(5, StopCheck({"t": 20}, EarlyStopping(5), FLOOR))
    assert stopped is None and len(calls) == 4 and len(samples) == 20


def _study() -> optuna.Study:
    """Baseline 0.8 @ 100 ms; trial 1 complete and feasible (0.78 @ 50 ms); trial 2 stopped early, reporting its
    bound 0.75 @ 10 ms and infeasible through the constraint, as `Tuner.measure` stores it."""
    study = optuna.create_study(directions=["maximize", "minimize"], study_name="stop")
    study.set_user_attr("baseline", {"trial": 0, "accuracy": 0.8, "prefill_ms": 100.0})
    study.add_trial(optuna.create_trial(values=[0.8, 100.0], user_attrs={"role": "baseline", "config": None},
                                        constraints={"min_relative_accuracy": -0.2}))
    for accuracy, ms, stopped in ((0.78, 50.0, False), (0.75, 10.0, True)):
        config = PruningConfig(method="random", layer=2, keep_ratio=ms / 100)
        attrs = {"config": config.to_dict(), "prefill_ms": ms}
        if stopped:
            attrs.update(stopped_early=True, stop_reason="stopped after 6 of 60 documents", accuracy_partial=0.0,
                         accuracy_low=0.0, accuracy_high=0.39)  # the Wilson interval of its 0 of 6
        study.add_trial(optuna.create_trial(
            values=[accuracy, ms], params={"method": "random"},
            distributions={"method": CategoricalDistribution(["random"])}, user_attrs=attrs,
            constraints={"min_relative_accuracy": 0.76 - accuracy}))
    return study


def test_a_stopped_trial_is_never_chosen_by_export() -> None:
    """The stopped trial is the fastest, and its bound meets a low floor, yet no rule picks it; asked for by number
    it is refused with its reason. It is complete but infeasible (the sampler ranks it among the bad trials) and
    outside the Pareto set."""
    study = _study()
    stopped = study.trials[2]
    assert stopped.state == optuna.trial.TrialState.COMPLETE and max(stopped.constraints.values()) > 0
    assert [t.number for t in pareto_trials(study)] == [1, 0]  # feasible: trial 1 and the baseline
    assert [t.number for t in candidates(study)] == [1]
    assert choose_trial(study, Rule(min_accuracy=0.5)).number == 1
    assert choose_trial(study, Rule(max_prefill_ms=60)).number == 1
    with pytest.raises(NoTrialQualifies, match="stopped early.*6 of 60"):
        choose_trial(study, Rule(trial=2))


def test_the_dashboard_says_why_a_trial_stopped() -> None:
    """The hover gives the reason, and no interval next to the bound it reports (that interval is of its partial
    scores)."""
    from tuner.dashboard import trial_frame
    from tuner.results.evidence import interval

    study = _study()
    hover = trial_frame(study).set_index("number").loc[2, "hover"]
    assert "stopped early: stopped after 6 of 60 documents" in hover and "95% [" not in hover
    # the rule lives in `evidence.interval`, so every table that shows an interval keeps it
    assert interval(study.trials[2], "accuracy") is None
