"""Queuing a trial again with its parameters and role, so that no configuration is lost: a trial interrupted by
Ctrl-C, or one whose result the storage gave up on (an outage longer than the worker waits).

The copy names the trial it replaces in `requeued_from`; a trial already copied (by a worker, or by Optuna's
heartbeat retry) is not copied twice. Also: a trial that another worker completed first is not an error.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, Trial, TrialState

from tuner.errors import DartTunerError
from tuner.results.record import BASELINE_ROLE, FAILURE_ATTR, REQUEUED_FROM_ATTR, ROLE_ATTR

logger = logging.getLogger(__name__)

STORAGE_LOST = "the storage stayed away for longer than the worker waits, so the result was not stored; queued again"


class TrialLost(DartTunerError, RuntimeError):
    """A trial's result could not be stored and the storage stayed away: the one line names the trial to re-run."""


def copy_of(study: optuna.Study, number: int) -> int | None:
    """The trial that runs trial `number` again (a re-queued copy or a heartbeat retry), if there is one."""
    for other in study.get_trials(deepcopy=False):
        if other.user_attrs.get(REQUEUED_FROM_ATTR) == number or \
                RetryHeartbeatStaleTrialCallback.retried_trial_number(other) == number:
            return other.number
    return None


def stored_trial(study: optuna.Study, number: int) -> FrozenTrial:
    """Trial `number` as the storage holds it now."""
    return next(t for t in study.get_trials(deepcopy=False) if t.number == number)


def fail_and_requeue(study: optuna.Study, trial: Trial, reason: str,
                     failed_for_it: Callable[[FrozenTrial], bool]) -> int | None:
    """Fail `trial` with `reason` if its end was never stored, and queue a copy of it unless one exists; a trial
    already failed is copied only when `failed_for_it`. The copy's number; None when nothing was lost (it ended
    before, or it was stored after all: a commit that reached the server as the connection broke)."""
    stored = stored_trial(study, trial.number)
    if stored.state == TrialState.RUNNING:
        trial.set_user_attr(FAILURE_ATTR, reason)
        with contextlib.suppress(UpdateFinishedTrialError):  # another worker failed it as stale meanwhile
            study.tell(trial, state=TrialState.FAIL)
        stored = stored_trial(study, trial.number)
    elif stored.state != TrialState.FAIL or not failed_for_it(stored):
        return None
    existing = copy_of(study, stored.number)
    return existing if existing is not None else requeue(study, stored)


def requeue(study: optuna.Study, stored: FrozenTrial) -> int:
    """Queue a copy of `stored` with its parameters (those it was given to run included: a trial can fail before
    drawing them all) and role; returns the copy's number."""
    params = {**stored.system_attrs.get("fixed_params", {}), **stored.params}
    role = {ROLE_ATTR: stored.user_attrs[ROLE_ATTR]} if ROLE_ATTR in stored.user_attrs else {}
    study.enqueue_trial(params, user_attrs={**role, REQUEUED_FROM_ATTR: stored.number}, skip_if_exists=False)
    return next(t.number for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
                if t.user_attrs.get(REQUEUED_FROM_ATTR) == stored.number)


def requeue_lost(study: optuna.Study, stored: FrozenTrial) -> int | None:
    """Queue again a trial whose result the storage gave up on, unless it has a copy; the new copy's number."""
    if copy_of(study, stored.number) is not None:
        return None
    number = requeue(study, stored)
    logger.warning("trial %d: %s as trial %d", stored.number, STORAGE_LOST, number)
    return number


def requeue_stored_losses(study: optuna.Study) -> None:
    """Queue again the trials stored as lost to the storage that have no copy yet (the storage went away again
    before the worker could queue them, or the worker died in between)."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        if trial.user_attrs.get(FAILURE_ATTR) == STORAGE_LOST:
            requeue_lost(study, trial)


def completed_by_another_worker(error: Exception) -> bool:
    """Whether Optuna refused to record this worker's trial because another worker had already completed the
    same trial: under load, SQLite can let two workers take one waiting trial. The stored result measured the
    same configuration, so this worker drops its own and goes on."""
    if not (isinstance(error, ValueError) and str(error).startswith("Cannot tell a COMPLETE trial")):
        return False
    logger.warning("a trial this worker ran was completed by another worker that took it too; this worker's "
                   "measurement is dropped")
    return True


def lost_line(number: int, params: dict[str, object], role: str | None, outage: BaseException) -> str:
    """TrialLost's message: which trial to re-run, with its configuration, and why it was not stored."""
    what = "the baseline" if role == BASELINE_ROLE else ", ".join(f"{k}={v}" for k, v in params.items())
    return (f"trial {number} ({what or 'no parameters drawn yet'}) was not stored: {outage}. Run the same command "
            "again once the storage is back: the next worker fails that trial (its heartbeats stopped) and queues "
            "it again")
