"""A trial's uncertainty: computed from its per-sample scores and timed rounds when it is measured, stored as user
attributes, and read back for tables, export and the dashboard (torch-free, like `tuner.results.trials`).

Stored attributes (all 95%, see `tuner.results.stats`): `accuracy_low`/`accuracy_high` (+ `accuracy_interval`, the
method); against the baseline on the same samples `accuracy_diff`, `accuracy_diff_low`/`_high`
(+ `accuracy_diff_method`), `mcnemar_p` and the discordant counts (0/1 scores only); `prefill_ms_low`/`_high` and
its exact `prefill_ms_coverage`. The speed-up's interval (`speedup_low`/`_high`) comes from `tuner.measure.latency`.
A trial stored before these existed reads as unknown (None): it is shown as '-' and never counts as
distinguishable or as meeting a confidence bound.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from optuna.trial import FrozenTrial

from tuner.config.workload import objective_named
from tuner.results import stats
from tuner.results.record import CONFIRMATION_ATTR, SAMPLE_TASKS_ATTR, TrialRecord
from tuner.results.trials import record_of

__all__ = ["CONFIRMATION_ATTR", "SAMPLE_TASKS_ATTR", "accuracy_evidence", "accuracy_lower_bound", "confirmed",
           "confirmed_text", "indistinct_from", "interval", "interval_text", "latency_evidence", "pair_text",
           "stored_scores", "task_runs", "versus_baseline_text"]


def task_runs(tasks: Sequence[str]) -> list[list[Any]]:
    """Run-length form of the per-sample task names: [[task, count], ...]."""
    runs: list[list[Any]] = []
    for task in tasks:
        if runs and runs[-1][0] == task:
            runs[-1][1] += 1
        else:
            runs.append([task, 1])
    return runs


def stored_scores(record: TrialRecord | Mapping[str, Any]) -> list[tuple[str, int, float]] | None:
    """(task, doc index, score) of every scored sample a trial stored (its record, or its user attributes); None
    when unknown (no samples, or a task that does not score documents one by one)."""
    record = record if isinstance(record, TrialRecord) else TrialRecord.from_attrs(record)
    samples = record.samples
    if not samples or any(not isinstance(s, list | tuple) or len(s) < 2 or s[1] is None for s in samples):
        return None
    runs = record.sample_tasks or [["", len(samples)]]
    tasks = [task for task, count in runs for _ in range(count)]
    if len(tasks) != len(samples):
        return None
    return [(task, int(s[0]), float(s[1])) for task, s in zip(tasks, samples)]


def _groups(tasks: Sequence[str]) -> list[str] | None:
    return list(tasks) if len(set(tasks)) > 1 else None


def accuracy_evidence(scores: Sequence[tuple[str, int, float]],
                      baseline: Sequence[tuple[str, int, float]] | None) -> dict[str, Any]:
    """The accuracy attributes of a trial from its scores, paired with the baseline's on the samples both scored."""
    if not scores:
        return {}
    tasks = [task for task, _, _ in scores]
    values = [score for _, _, score in scores]
    interval = stats.mean_interval(values, _groups(tasks))
    attrs: dict[str, Any] = {"accuracy_low": interval.low, "accuracy_high": interval.high,
                             "accuracy_interval": interval.method, "accuracy_confidence": stats.CONFIDENCE}
    attrs[SAMPLE_TASKS_ATTR] = task_runs(tasks)
    if baseline is None:
        return attrs
    # one task on both sides: pair by document (a baseline stored before `sample_tasks` has no task names)
    by_doc = len(set(tasks)) == 1 and len({task for task, _, _ in baseline}) == 1
    reference = {(None if by_doc else task, doc): score for task, doc, score in baseline}
    paired = [(task, score, reference[(None if by_doc else task, doc)]) for task, doc, score in scores
              if (None if by_doc else task, doc) in reference]
    if not paired:
        return attrs
    diff = stats.paired_difference([c for _, c, _ in paired], [b for _, _, b in paired],
                                   _groups([t for t, _, _ in paired]))
    attrs.update({"accuracy_diff": diff.diff, "accuracy_diff_low": diff.low, "accuracy_diff_high": diff.high,
                  "accuracy_diff_method": diff.method, "mcnemar_p": diff.p_value,
                  "discordant_improved": diff.improved, "discordant_worsened": diff.worsened,
                  "n_paired": len(paired)})
    return attrs


def latency_evidence(prefill_samples_ms: Sequence[float]) -> dict[str, Any]:
    """The interval of the prefill median from the trial's timed rounds, with its exact coverage."""
    low, high, coverage = stats.median_interval(prefill_samples_ms)
    return {"prefill_ms_low": low, "prefill_ms_high": high, "prefill_ms_coverage": coverage}


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return None
    return float(value)


def interval(trial: FrozenTrial, name: str) -> tuple[float, float] | None:
    """A stored (low, high) pair, e.g. 'accuracy', 'prefill_ms', 'accuracy_diff' or 'speedup'; None if unknown.
    A stopped trial's accuracy interval is of its partial scores, not of the bound it reports as accuracy: None."""
    record = record_of(trial)
    if name == "accuracy" and record.stopped_early:
        return None
    low, high = (_finite(value) for value in record.interval(name))
    return None if low is None or high is None else (low, high)


def _overlap(a: tuple[float, float] | None, b: tuple[float, float] | None) -> bool:
    return a is not None and b is not None and a[0] <= b[1] and b[0] <= a[1]


def indistinct_from(trial: FrozenTrial, others: Sequence[FrozenTrial], objective: str = "prefill_ms") -> list[int]:
    """Numbers of the other trials that `trial` cannot be told apart from: their 95% intervals overlap on both
    accuracy and the latency objective's median (a conservative reading; unknown intervals never count)."""
    return [other.number for other in others if other.number != trial.number
            and _overlap(interval(trial, "accuracy"), interval(other, "accuracy"))
            and _overlap(interval(trial, objective), interval(other, objective))]


def accuracy_lower_bound(trial: FrozenTrial, confidence: float) -> float | None:
    """One-sided lower confidence bound of the trial's accuracy from its stored per-sample scores (None if
    unknown). A stopped trial's partial scores are not its accuracy: None."""
    record = record_of(trial)
    if record.stopped_early:
        return None
    scores = stored_scores(record)
    if scores is None:
        return None
    tasks = [task for task, _, _ in scores]
    return stats.lower_bound([score for _, _, score in scores], confidence, _groups(tasks))


def interval_text(trial: FrozenTrial, name: str, spec: str) -> str:
    """'[low-high]' of a stored interval in `spec` format ('' when unknown)."""
    pair = interval(trial, name)
    return "" if pair is None else pair_text(*pair, spec)


def pair_text(low: float, high: float, spec: str) -> str:
    """'[0.61-0.83]': how every stored interval is shown, in `spec` format."""
    return f"[{format(low, spec)}-{format(high, spec)}]"


def versus_baseline_text(trial: FrozenTrial) -> str:
    """'-0.050 [-0.12,+0.02] p=0.38': the paired difference with the baseline ('-' when unknown)."""
    record = record_of(trial)
    diff = _finite(record.accuracy_diff)
    pair = interval(trial, "accuracy_diff")
    if diff is None or pair is None:
        return "-"
    p_value = _finite(record.mcnemar_p)
    return f"{diff:+.3f} [{pair[0]:+.2f},{pair[1]:+.2f}]" + (f" p={p_value:.2g}" if p_value is not None else "")


def confirmed(study: Any, trial: FrozenTrial) -> dict[str, Any] | None:
    """The confirmation run's numbers for `trial` (`tuner.search.confirm`), or None (never confirmed, or it was not on
    the front then)."""
    record = study.user_attrs.get(CONFIRMATION_ATTR) or {}
    return (record.get("trials") or {}).get(str(trial.number))


def confirmed_text(study: Any, trial: FrozenTrial) -> str:
    """'21.0 ms 1.52x, acc 0.790 [0.67-0.88]': a trial's confirmed numbers in a few words ('-' when none)."""
    numbers = confirmed(study, trial)
    if not numbers:
        return "-"
    goal = objective_named(numbers.get("objective"))  # confirmations from before workloads: prefill
    text = f"{numbers.get(goal.name, numbers['prefill_ms']):.1f} {goal.unit} {numbers['speedup']:.2f}x" + (
        "*" if numbers.get("latency_noisy") else "")
    if numbers.get("accuracy") is not None:
        low, high = numbers.get("accuracy_low"), numbers.get("accuracy_high")
        text += f", acc {numbers['accuracy']:.3f}" + (f" {pair_text(low, high, '.2f')}" if low is not None else "")
    return text
