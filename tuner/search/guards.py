"""Optuna callbacks that end a run when going on cannot help: a failed baseline, the same failure again and
again, or a search space whose configurations are all measured already."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import optuna
from optuna.trial import FrozenTrial, TrialState

from tuner.results import is_baseline
from tuner.results.record import TrialRecord

logger = logging.getLogger(__name__)


@dataclass
class FailureGuard:
    """Optuna callback that stops the study when going on cannot help, and remembers why.

    A failed baseline leaves nothing to score the other trials against; `max_same_failures` trials in a row
    failing with the same exception type mean a broken setup (a missing module, a wrong task), not a bad
    configuration. Interrupted trials (Ctrl-C) are not failures of the setup.
    """

    max_same_failures: int = 3
    reason: str | None = None
    _streak: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.max_same_failures < 1:
            raise ValueError(f"max_same_failures must be at least 1, got {self.max_same_failures}")

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.state == TrialState.COMPLETE:
            self._streak.clear()
        record = TrialRecord.from_trial(trial)
        error_type = record.failure_type
        if trial.state != TrialState.FAIL or error_type is None:
            return
        failure = record.failure or error_type
        if is_baseline(trial):
            self.reason = (f"the unpruned baseline (trial {trial.number}) failed, so no trial can be scored: "
                           f"{failure}")
        else:
            if self._streak and self._streak[-1] != error_type:
                self._streak.clear()
            self._streak.append(error_type)
            if len(self._streak) < self.max_same_failures:
                return
            self.reason = f"{len(self._streak)} trials in a row failed with {error_type}; the last: {failure}"
        study.stop()


@dataclass
class RepeatGuard:
    """Optuna callback that ends a run when the sampler keeps proposing configurations that are already complete
    (a small space that is used up): `limit` such trials in a row, each pruned without being measured."""

    limit: int = 20
    _streak: int = 0

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if (trial.state == TrialState.PRUNED and TrialRecord.from_trial(trial).duplicate_of is not None
                and not is_baseline(trial)):
            self._streak += 1
        elif trial.state == TrialState.COMPLETE:
            self._streak = 0
        if self._streak >= self.limit:
            logger.warning("%s: the last %d proposed configurations were all measured already; the space looks "
                           "used up, stopping", study.study_name, self._streak)
            study.stop()


