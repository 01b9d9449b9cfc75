"""Reading a stored study: what `studies`, `export` and the dashboard need, without the evaluation stack.

Optuna keeps samplers, storages and visualisation apart, and reading a study needs no objective function; so here:
this module imports neither lmms-eval nor `tuner.evaluation`, and `tuner.search.study` (the tuning side) builds on it.
"""

from __future__ import annotations

import math

import optuna
from optuna.trial import FrozenTrial

from tuner.config import PruningConfig
from tuner.errors import DartTunerError
from tuner.results.record import BASELINE_ATTR, BASELINE_ROLE, ROLE_ATTR, STOPPED_ATTR, TrialRecord

__all__ = ["ROLE_ATTR", "STOPPED_ATTR", "StudyNotFound", "accuracy_relative", "config_of", "is_baseline",
           "open_study", "pareto_trials"]


class StudyNotFound(DartTunerError, ValueError):
    """No study of that name in the storage; the message lists the ones there."""


def open_study(storage: str | optuna.storages.BaseStorage, name: str) -> optuna.Study:
    """Load an existing study, or raise StudyNotFound naming the studies the storage holds."""
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = sorted(s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False))
        raise StudyNotFound(f"no study {name!r} in this storage; studies there: {', '.join(names) or 'none'}") \
            from None


def config_of(trial: FrozenTrial) -> PruningConfig | None:
    """The PruningConfig a finished trial ran (None for the unpruned baseline), read through its `TrialRecord`
    (trials stored before `config_schema` existed hold schema 1, which is upgraded on read)."""
    return TrialRecord.from_trial(trial).config


def is_baseline(trial: FrozenTrial) -> bool:
    """Whether the trial measures the unpruned baseline."""
    return trial.user_attrs.get(ROLE_ATTR) == BASELINE_ROLE


def pareto_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The feasible Pareto set (Optuna excludes infeasible trials), fastest first."""
    return sorted(study.best_trials, key=lambda t: t.values[1])


def accuracy_relative(trial: FrozenTrial, study: optuna.Study) -> float:
    """The trial's accuracy as a fraction of the baseline's (NaN before the baseline completed)."""
    baseline = study.user_attrs.get(BASELINE_ATTR)
    if not baseline or not baseline.get("accuracy"):
        return math.nan
    return trial.values[0] / baseline["accuracy"]
