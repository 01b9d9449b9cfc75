"""What a new trial must beat: the best speed-up stored at no lower accuracy, for adaptive rounds' dominated stop
(`tuner.results.sequential`), and the best accuracy stored at no lower speed-up, for early stopping's dominance
(`tuner.measure.early_stop`)."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from tuner.results.record import RecordSchemaError, TrialRecord


def _measured(study: optuna.Study) -> list[tuple[float, float]]:
    """(accuracy, speed-up) of the study's complete pruned trials measured in full (trials stopped early hold only
    an accuracy bound, so they are left out)."""
    points = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        try:
            record = TrialRecord.from_trial(trial)
        except RecordSchemaError:
            continue  # a newer dart-tuner's trial: its numbers may not mean the same
        if (record.is_baseline or record.config is None or record.stopped_early or record.accuracy is None
                or record.speedup_same_run is None):
            continue
        points.append((record.accuracy, record.speedup_same_run))
    return points


def best_speedup_at(study: optuna.Study, accuracy: float) -> float | None:
    """The highest speed-up of the latency objective among the study's trials measured in full whose accuracy is at
    least `accuracy`; None when none."""
    return max((speedup for acc, speedup in _measured(study) if acc >= accuracy), default=None)


def best_accuracy_at(study: optuna.Study, speedup: float) -> float | None:
    """The highest accuracy among the study's trials measured in full whose speed-up is at least `speedup`; None
    when none."""
    return max((acc for acc, fast in _measured(study) if fast >= speedup), default=None)
