"""The speed-up a new trial must beat: the best one stored at no lower accuracy, for adaptive rounds' dominated stop
(`tuner.results.sequential`)."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from tuner.results.record import RecordSchemaError, TrialRecord


def best_speedup_at(study: optuna.Study, accuracy: float) -> float | None:
    """The highest speed-up of the latency objective among the study's complete pruned trials whose accuracy is at
    least `accuracy` (trials stopped early hold only an accuracy bound, so they are left out); None when none."""
    best = None
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        try:
            record = TrialRecord.from_trial(trial)
        except RecordSchemaError:
            continue  # a newer dart-tuner's trial: its numbers may not mean the same
        if (record.is_baseline or record.config is None or record.stopped_early or record.accuracy is None
                or record.speedup_same_run is None or record.accuracy < accuracy):
            continue
        best = record.speedup_same_run if best is None else max(best, record.speedup_same_run)
    return best
