"""Reading a stored study: what `studies`, `export` and the dashboard need, without the evaluation stack.

Optuna keeps samplers, storages and visualisation apart, and reading a study needs no objective function; so here:
this module imports neither lmms-eval nor `tuner.evaluation`, and `tuner.search.study` (the tuning side) builds on it.
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from tuner.config import PruningConfig
from tuner.config.workload import Objective, objective_named
from tuner.errors import DartTunerError
from tuner.results.record import (
    BASELINE_ATTR,
    BASELINE_ROLE,
    OBJECTIVES_ATTR,
    ROLE_ATTR,
    STOPPED_ATTR,
    WORKLOAD_ATTR,
    TrialRecord,
)

__all__ = ["ROLE_ATTR", "STOPPED_ATTR", "StudyNotFound", "accuracy_relative", "config_of", "is_baseline",
           "open_study", "pareto_front", "pareto_trials", "readable_trials", "record_of", "skipped_text",
           "study_objective", "study_workload",
           "unreadable_reason", "unreadable_trials"]


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


# id(trial) -> (a weak reference to the trial, its record or the error reading it): a study's trials are read
# once however many readers (front, table, hover text, export rule) ask, and a trial that is gone drops out.
_READ: dict[int, tuple[weakref.ref, TrialRecord | Exception]] = {}


def _read_record(trial: FrozenTrial) -> TrialRecord | Exception:
    known = _READ.get(id(trial))
    if known is not None and known[0]() is trial:
        return known[1]
    try:
        result: TrialRecord | Exception = TrialRecord.from_trial(trial)
    except (ValueError, TypeError) as error:  # a method not installed here, a newer schema, a damaged value
        result = error
    key = id(trial)
    _READ[key] = (weakref.ref(trial, lambda _, key=key: _READ.pop(key, None)), result)
    return result


def record_of(trial: FrozenTrial) -> TrialRecord:
    """The trial's `TrialRecord`, read once per trial object; the error reading it (`unreadable_reason`) raised."""
    result = _read_record(trial)
    if isinstance(result, Exception):
        raise result
    return result


def config_of(trial: FrozenTrial) -> PruningConfig | None:
    """The PruningConfig a finished trial ran (None for the unpruned baseline); trials stored before
    `config_schema` existed hold schema 1, which is upgraded on read. ValueError / TypeError when this install
    cannot read it (`unreadable_reason`)."""
    return record_of(trial).config


def unreadable_reason(trial: FrozenTrial) -> str | None:
    """Why this install cannot read the trial's stored configuration (a method from a plugin not installed here,
    or from a newer dart-tuner), or None when it can."""
    result = _read_record(trial)
    return " ".join(str(result).split()) if isinstance(result, Exception) else None


def readable_trials(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The trials whose configuration this install can read: what every reader shows, ranks and exports."""
    return [t for t in trials if unreadable_reason(t) is None]


def unreadable_trials(trials: Sequence[FrozenTrial]) -> dict[int, str]:
    """Trial number -> why it cannot be read here, for the trials `readable_trials` leaves out."""
    return {t.number: reason for t in trials if (reason := unreadable_reason(t)) is not None}


def skipped_text(study_name: str, skipped: dict[int, str]) -> str:
    """One line naming the trials of a study that were skipped because they cannot be read here ('' for none)."""
    if not skipped:
        return ""
    listed = "; ".join(f"trial {number}: {reason}" for number, reason in sorted(skipped.items())[:3])
    more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    return (f"study {study_name!r}: skipped {len(skipped)} trial{'s' if len(skipped) > 1 else ''} this install "
            f"cannot read (a plugin method not installed here, or a newer dart-tuner): {listed}{more}")


class StudySnapshot:
    """A study whose user attributes are read from the storage once.

    Optuna queries the database on every `study.user_attrs`, and the per-trial readers (speed-up, relative
    accuracy, confirmation) ask for them once per trial; everything else is the study's own.
    """

    def __init__(self, study: optuna.Study) -> None:
        self.study = study
        self.user_attrs = study.user_attrs

    def __getattr__(self, name: str) -> Any:
        return getattr(self.study, name)


def study_objective(study: Any) -> Objective:
    """The study's latency objective (its stored `objectives`; studies made before workloads: prefill_ms)."""
    names = study.user_attrs.get(OBJECTIVES_ATTR) or []
    return objective_named(names[1] if len(names) > 1 else None)


def study_workload(study: Any) -> dict[str, Any]:
    """The workload shape the study was tuned for ({"batch_size", "new_tokens", "objective"}; older studies:
    one request at prefill_ms, new tokens from the provenance)."""
    stored = study.user_attrs.get(WORKLOAD_ATTR)
    if stored:
        return dict(stored)
    latency = (study.user_attrs.get("provenance") or {}).get("latency") or {}
    return {"batch_size": 1, "new_tokens": latency.get("new_tokens", 8), "objective": study_objective(study).name}


def pareto_front(trials: Sequence[FrozenTrial], goal: Objective | None = None) -> list[FrozenTrial]:
    """The feasible Pareto set (accuracy up, the latency objective `goal` in its direction; default prefill ms
    down) of `trials`, in trial order: the set Optuna's `study.best_trials` gives, without its deep copy of every
    trial of the study on each call."""
    cost = (goal or objective_named(None)).cost
    feasible = [t for t in trials if t.state == TrialState.COMPLETE and t.values is not None
                and all(v <= 0 for v in t.constraints.values())]
    best_faster = -math.inf  # the best accuracy of the trials strictly faster than the ones looked at
    front: set[int] = set()
    ordered = sorted(feasible, key=lambda t: (cost(t.values[1]), -t.values[0]))
    for _, group in itertools.groupby(ordered, key=lambda t: cost(t.values[1])):
        same = list(group)
        top = same[0].values[0]  # the most accurate at this latency; equal ones tie, neither dominates
        if top > best_faster:
            front |= {t.number for t in same if t.values[0] == top}
            best_faster = top
    return [t for t in feasible if t.number in front]


def is_baseline(trial: FrozenTrial) -> bool:
    """Whether the trial measures the unpruned baseline."""
    return trial.user_attrs.get(ROLE_ATTR) == BASELINE_ROLE


def pareto_trials(study: optuna.Study, trials: Sequence[FrozenTrial] | None = None) -> list[FrozenTrial]:
    """The feasible Pareto set of the study's trials this install can read (`readable_trials`), best latency
    objective first."""
    trials = study.get_trials(deepcopy=False) if trials is None else trials
    goal = study_objective(study)
    return sorted(pareto_front(readable_trials(trials), goal), key=lambda t: goal.cost(t.values[1]))


def at_default_processor(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The readable trials that ran the processor as loaded (no `processor` settings; the baseline among them):
    what a search without the processor knob could have found."""
    return [t for t in readable_trials(trials) if (config := config_of(t)) is None or not config.processor]


def searched_processor(trials: Sequence[FrozenTrial]) -> bool:
    """Whether any readable trial ran with processor settings (the study searched the processor's budget)."""
    return any((config := config_of(t)) is not None and config.processor for t in readable_trials(trials))


def accuracy_relative(trial: FrozenTrial, study: optuna.Study) -> float:
    """The trial's accuracy as a fraction of the baseline's (NaN before the baseline completed)."""
    baseline = study.user_attrs.get(BASELINE_ATTR)
    if not baseline or not baseline.get("accuracy"):
        return math.nan
    return trial.values[0] / baseline["accuracy"]
