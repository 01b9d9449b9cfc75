"""The tuning service: an Optuna multi-objective study (accuracy up, measured prefill latency down) in any
SQLAlchemy storage, with the unpruned baseline first and nothing ever lost.

- Every trial stores its configuration, metrics and failure reason as user attributes (nothing only in memory).
- Heartbeats mark a trial whose worker died as failed, with that reason, and queue it again; a database that goes
  away for a while is waited out (`tuner.results.storage`). A Ctrl-C queues the interrupted trial again.
- A trial that raises is stored as failed with its reason; the study goes on, unless the baseline failed (no
  trial can be scored without it) or several trials in a row failed the same way: then it stops, saying why.
- Provenance (`tuner.search.provenance`) is stored on creation; a worker with another is refused unless told to mix.
- A space that draws a parameter in a way the stored trials rule out is refused before the model is loaded.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Callable, Sequence

import optuna
from optuna.storages import RDBStorage, fail_stale_trials
from optuna.trial import FrozenTrial, Trial, TrialState

from tuner.config import PruningConfig
from tuner.errors import DartTunerError
from tuner.evaluation.tasks import PreparedTask
from tuner.models.loading import LoadedModel
from tuner.models.processor_budget import without_loaded_values
from tuner.results import config_of, is_baseline
from tuner.results.evidence import stored_scores
from tuner.results.interrupts import sigint_ignored
from tuner.results.record import (
    BASELINE_ATTR,
    BASELINE_ROLE,
    DIRECTIONS,
    DUPLICATE_OF_ATTR,
    FAILURE_ATTR,
    FAILURE_TYPE_ATTR,
    OBJECTIVES,
    OBJECTIVES_ATTR,
    PAPER_DEFAULT_ROLE,
    PROVENANCE_ATTR,
    REQUEUED_FROM_ATTR,
    ROLE_ATTR,
    WORKLOAD_ATTR,
    TrialRecord,
    objective_value,
)
from tuner.results.storage import DEFAULT_STORAGE, HEARTBEAT_FAILURE, gave_up, open_for_tuning
from tuner.results.trials import study_objective
from tuner.search.dominance import best_accuracy_at, best_speedup_at
from tuner.search.guards import FailureGuard, RepeatGuard
from tuner.search.portable import check_family, record_target
from tuner.search.provenance import ProvenanceMismatch, check_same_setup
from tuner.search.requeue import (
    STORAGE_LOST,
    TrialLost,
    completed_by_another_worker,
    fail_and_requeue,
    lost_line,
    requeue_stored_losses,
    stored_trial,
)
from tuner.search.samplers import make_sampler
from tuner.search.setup import MeasuringSetup
from tuner.search.space import SearchSpace
from tuner.search.space_changes import SpaceChanged, check_space_fits
from tuner.search.stored_timings import StoredTimings

logger = logging.getLogger(__name__)

__all__ = ["DIRECTIONS", "INTERRUPTED", "OBJECTIVES", "REQUEUED_FROM_ATTR", "STORAGE_LOST", "ProvenanceMismatch",
           "SpaceChanged", "TrialLost", "Tuner", "TuningStopped", "WorkloadMismatch"]

INTERRUPTED = "interrupted (Ctrl-C); queued again for the next run"


class WorkloadMismatch(DartTunerError, ValueError):
    """A study resumed at another latency objective or batch than it was tuned for."""


class TuningStopped(DartTunerError, RuntimeError):
    """The study cannot make progress (its baseline failed, or every trial fails the same way); says why."""


class Tuner:
    """Drives one study over one search space: creates or loads it (baseline first) and runs the objective loop with
    its races between workers and Ctrl-C, measuring each configuration on this worker's `MeasuringSetup` (built
    once). The space must fit the stored trials (`space_changes`), checked before anything is loaded; `target`:
    the engine a `--portable` space runs on."""

    _lost: Trial | None = None  # the running trial whose result the storage gave up on, until it is queued again
    _interrupted = False  # a Ctrl-C reached the running trial (whether or not its reason could be stored)

    def __init__(self, space: SearchSpace, storage: str | RDBStorage = DEFAULT_STORAGE, *,
                 study_name: str | None = None, allow_mixed: bool = False, heartbeat_interval: int = 30,
                 grace_period: int | None = None, loaded: LoadedModel | None = None,
                 tasks: list[PreparedTask] | None = None, allow_repeats: bool = False,
                 setup: MeasuringSetup | None = None, target: str = "transformers") -> None:
        self.space = space
        self.allow_repeats = allow_repeats  # measure a configuration again although a complete trial holds it
        self.storage = storage if isinstance(storage, RDBStorage) else open_for_tuning(
            storage, heartbeat_interval=heartbeat_interval, grace_period=grace_period)
        self.study_name = study_name or space.study
        check_space_fits(self.storage, self.study_name, space, self.storage.url)  # before anything is loaded
        self.setup = setup or MeasuringSetup.load(space, loaded=loaded, tasks=tasks)
        check_family(space, target, self.setup.loaded.family)  # `tune --portable`: the family's own settings
        self.loaded, self.tasks, self.measurer = self.setup.loaded, self.setup.tasks, self.setup.measurer
        self.provenance = self.setup.provenance
        self.goal = space.latency.goal  # the study's second objective, in its direction
        self.study = optuna.create_study(storage=self.storage, study_name=self.study_name,
                                         directions=["maximize", self.goal.direction], sampler=make_sampler(space),
                                         load_if_exists=True)
        record_target(self.study, target)  # before the provenance, which marks the study as not new
        self._check_workload()
        self._check_provenance(allow_mixed)
        self.stored_timings = StoredTimings(self.study, across=space.latency.share_timings == "storage")
        self._running: Trial | None = None  # the trial objective() runs now, to queue again on Ctrl-C
        self.requeued: int | None = None  # the trial queued again by the last interrupted run()

    def _check_workload(self) -> None:
        """Refuse, in one line, to resume a study at another objective (its directions and stored values would
        mean something else) or, for a batched objective, at another batch size."""
        attrs = self.study.user_attrs
        if PROVENANCE_ATTR not in attrs:
            return  # a new study: this run sets its workload
        stored = study_objective(self.study)
        tuned = attrs.get(WORKLOAD_ATTR) or {}
        batch = tuned.get("batch_size", 1)
        wanted = self.space.latency
        if stored.name != wanted.objective or (stored.name != "prefill_ms" and batch != wanted.batch_size):
            raise WorkloadMismatch(f"study {self.study_name!r} was tuned for {stored.name} at batch {batch}; this "
                                   f"run asks for {wanted.objective} at batch {wanted.batch_size}: use another "
                                   "--study, or the study's own --objective and --latency-batch")

    def _check_provenance(self, allow_mixed: bool) -> None:
        stored = self.study.user_attrs.get(PROVENANCE_ATTR)
        if stored is None:
            self.study.set_user_attr(PROVENANCE_ATTR, self.provenance)
            self.study.set_user_attr(OBJECTIVES_ATTR, ["accuracy", self.goal.name])
            self.study.set_user_attr(WORKLOAD_ATTR, self.space.latency.shape())
            self.study.set_user_attr("space", self.space.source)
            self.study.set_user_attr("constraints", self.space.constraints.__dict__)
            self._enqueue_first_trials()
            return
        differences = check_same_setup(stored, self.provenance, self.study_name, allow_mixed=allow_mixed)
        if differences:
            logger.warning("mixing trials from another setup into %s: %s", self.study_name, "; ".join(differences))
        self._ensure_baseline()

    def _ensure_baseline(self) -> None:
        """Queue the baseline again when no trial holds or will hold it (it failed, or its worker was killed)."""
        alive = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)
        if not any(is_baseline(t) for t in self.study.get_trials(deepcopy=False, states=alive)):
            self.study.enqueue_trial({}, user_attrs={ROLE_ATTR: BASELINE_ROLE}, skip_if_exists=False)

    def _enqueue_first_trials(self) -> None:
        """The unpruned baseline is trial 0; DART's paper setting (K=2, 4+4 pivots) follows when in the space."""
        if self.study.trials:
            return
        # Two workers at once may both get here: skip_if_exists narrows the race, objective() prunes a second baseline.
        self.study.enqueue_trial({}, user_attrs={ROLE_ATTR: BASELINE_ROLE}, skip_if_exists=True)
        for paper in self.space.paper_defaults():
            self.study.enqueue_trial(paper, user_attrs={ROLE_ATTR: PAPER_DEFAULT_ROLE}, skip_if_exists=True)

    # -- one trial ------------------------------------------------------------------------------------------

    def baseline_accuracy(self) -> float:
        """From the study once the baseline trial completed; before that, evaluated here (deterministic)."""
        stored = self.study.user_attrs.get(BASELINE_ATTR)
        if stored:
            return float(stored["accuracy"])
        return self.measurer.baseline_result().accuracy

    def _baseline_scores(self) -> list[tuple[str, int, float]] | None:
        """The baseline's per-sample scores: from its stored trial, else this worker's own evaluation (None if
        neither exists yet)."""
        stored = self.study.user_attrs.get(BASELINE_ATTR)
        if stored:
            for trial in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
                if trial.number == stored.get("trial"):
                    return stored_scores(TrialRecord.from_trial(trial))
        local = self.measurer.baseline
        return local.scores() if local is not None else None

    def _constraints(self, accuracy: float, prefill_ms: float) -> dict[str, float]:
        """Constraint values (feasible when <= 0) for the space's constraints."""
        c = self.space.constraints
        values: dict[str, float] = {}
        if c.min_accuracy is not None:
            values["min_accuracy"] = c.min_accuracy - accuracy
        if c.min_relative_accuracy is not None:
            values["min_relative_accuracy"] = c.min_relative_accuracy * self.baseline_accuracy() - accuracy
        if c.max_prefill_ms is not None:
            values["max_prefill_ms"] = prefill_ms - c.max_prefill_ms
        return values

    def accuracy_floor(self) -> float | None:
        """The lowest accuracy the space's constraints allow (the higher of its absolute and relative floors)."""
        return self.space.constraints.accuracy_floor(self.baseline_accuracy)

    def measure(self, config: PruningConfig | None) -> TrialRecord:
        """Measure `config` (None: the baseline) with this worker's measurer, given what the study holds: the
        accuracy floor, the baseline's scores, the best stored speed-up or accuracy (dominance), stored timings."""
        pruned_and_stoppable = config is not None and self.space.early_stopping is not None
        return self.measurer.measure(config, accuracy_floor=self.accuracy_floor() if pruned_and_stoppable else None,
                                     baseline_scores=None if config is None else self._baseline_scores(),
                                     best_speedup=lambda accuracy: best_speedup_at(self.study, accuracy),
                                     best_accuracy=lambda speedup: best_accuracy_at(self.study, speedup),
                                     stored_timing=self.stored_timings)

    def objective(self, trial: Trial) -> tuple[float, float]:
        """Optuna objective: (accuracy, the workload's objective, prefill median ms by default); every number also
        goes into the trial's attributes.

        A Ctrl-C anywhere in it marks the trial as interrupted, so `run` queues it again.
        """
        self._running = trial
        try:
            return self._measure_trial(trial)
        except KeyboardInterrupt:
            self._interrupted = True
            with contextlib.suppress(Exception):  # a storage that cannot take the reason must not swallow the Ctrl-C
                trial.set_user_attr(FAILURE_ATTR, INTERRUPTED)
            raise
        except Exception as error:
            if gave_up(error) is not None:  # its result never reached the storage: `run` queues it again
                self._lost = trial
                with contextlib.suppress(Exception):  # waits for the storage once more; Optuna's tell waits too
                    trial.set_user_attr(FAILURE_ATTR, STORAGE_LOST)
            raise

    def _measure_trial(self, trial: Trial) -> tuple[float, float]:
        baseline = trial.user_attrs.get(ROLE_ATTR) == BASELINE_ROLE
        if baseline:
            earlier = self._earlier_baseline(trial.number)
            if earlier is not None:
                trial.set_user_attr(DUPLICATE_OF_ATTR, earlier)
                raise optuna.TrialPruned(f"trial {earlier} already measures the baseline")
        try:
            config = None if baseline else without_loaded_values(self.loaded, self.space.suggest(trial))
            if config is not None and not self.allow_repeats:
                earlier = self._complete_with(config)
                if earlier is not None:
                    trial.set_user_attr(DUPLICATE_OF_ATTR, earlier)
                    raise optuna.TrialPruned(f"trial {earlier} already measured this configuration")
            record = self.measure(config)
        except optuna.TrialPruned:
            raise
        except Exception as error:
            if gave_up(error) is not None:
                raise  # not the configuration's failure: objective() queues it again
            trial.set_user_attr(FAILURE_ATTR, f"{type(error).__name__}: {error}")
            trial.set_user_attr(FAILURE_TYPE_ATTR, type(error).__name__)
            raise
        for key, value in record.to_attrs().items():
            trial.set_user_attr(key, value)
        for key, value in self._constraints(record.accuracy, record.prefill_ms).items():
            trial.set_constraint(key, value)
        value = objective_value(record, self.goal)
        if baseline:
            self.study.set_user_attr(BASELINE_ATTR, {"trial": trial.number, "accuracy": record.accuracy,
                                                     "prefill_ms": record.prefill_ms,
                                                     "decode_ms_per_token": record.decode_ms_per_token,
                                                     "objective": self.goal.name, "objective_value": value})
        return record.accuracy, value

    def _complete_with(self, config: PruningConfig) -> int | None:
        """The first complete trial that ran exactly `config`, if any."""
        for other in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if config_of(other) == config:
                return other.number
        return None

    def _earlier_baseline(self, number: int) -> int | None:
        """A baseline trial before `number` that is running or complete (a racing worker enqueued a second one)."""
        for other in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.COMPLETE)):
            if other.number < number and is_baseline(other):
                return other.number
        return None

    # -- running -------------------------------------------------------------------------------------------

    def n_complete(self) -> int:
        return len(self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))

    def run(self, n_trials: int | None, timeout_s: float | None = None,
            callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]] = (), *,
            max_same_failures: int = 3) -> optuna.Study:
        """Run trials until the study holds `n_trials` complete ones (counting other workers') or time is up.

        Raises TuningStopped when the baseline fails or `max_same_failures` trials in a row fail with the same
        exception type; the failed trials stay stored with their reasons, and the next run resumes the study.
        An interrupted trial (Ctrl-C) is queued again with its parameters before the interrupt propagates, so the
        next run of the same command re-measures it. A trial whose result the storage gave up on (an outage
        longer than the worker waits) is queued again with its parameters and role once the storage answers; if
        it stays away, TrialLost names the trial (its heartbeats stopped: the next worker queues it again).
        Lost trials are failed and queued again first, also by a run that finds the target already met.
        """
        self.requeue_losses()
        guard = FailureGuard(max_same_failures)
        all_callbacks = [self._recorded, *callbacks, guard, RepeatGuard()]
        if n_trials is not None:
            all_callbacks.append(optuna.study.MaxTrialsCallback(n_trials, states=(TrialState.COMPLETE,)))
            if self.n_complete() >= n_trials:
                return self.study
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            try:
                # MaxTrialsCallback stops at n_trials complete trials; the cap only bounds a run of failing trials.
                self.study.optimize(self.objective, n_trials=None if n_trials is None else n_trials * 4,
                                    timeout=None if deadline is None else max(0.0, deadline - time.monotonic()),
                                    callbacks=all_callbacks, catch=(Exception,), gc_after_trial=False)
            except KeyboardInterrupt:
                with sigint_ignored():
                    self.requeued = self._requeue_interrupted()
                raise
            except Exception as error:
                if self._interrupted:  # Optuna could not store the interrupted trial's end: still a Ctrl-C
                    with sigint_ignored():
                        self.requeued = self._requeue_interrupted()
                    raise KeyboardInterrupt from error
                if gave_up(error) is not None and self._running is not None:
                    self._requeue_lost_or_stop(error)  # the storage gave up while a trial's end was not stored
                    continue
                if not (self._taken_over() or completed_by_another_worker(error)):
                    raise
                continue  # Optuna could not record a trial that another worker already recorded
            break
        if guard.reason is not None:
            raise TuningStopped(f"study {self.study_name!r} stopped: {guard.reason}. Fix the cause and run the same "
                                "command again to resume")
        return self.study

    def requeue_losses(self) -> None:
        """Fail the trials whose workers stopped sending heartbeats and queue them again (what Optuna does before
        each trial, done here too so that a run with nothing left to measure still does it), then queue again the
        trials stored as lost to the storage."""
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5; they are the point here
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            fail_stale_trials(self.study)
        requeue_stored_losses(self.study)

    def _taken_over(self) -> bool:
        """Whether the trial this worker ran was failed meanwhile by another worker that found its heartbeats stale
        (they could not reach a database that was away for longer than the grace period). Its retry is queued, so
        this worker drops its measurement and goes on. The trial is forgotten here, so that it is looked at once."""
        trial, self._running, self._lost = self._running, None, None
        if trial is None:
            return False
        stored = stored_trial(self.study, trial.number)
        if stored.state != TrialState.FAIL or stored.user_attrs.get(FAILURE_ATTR) != HEARTBEAT_FAILURE:
            return False
        logger.warning("trial %d was failed by another worker while this one could not reach the storage; its "
                       "measurement is dropped and the retry queued for it will measure it again", trial.number)
        return True

    # -- a storage that gave up while a trial ran -----------------------------------------------------------

    def _recorded(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """First callback after each trial, once Optuna stored its end: a trial whose result the storage gave up
        on (stored as failed when it came back) is queued again; then no trial is running."""
        if self._lost is not None and self._lost.number == trial.number:
            self._requeue_lost(self._lost)
        self._running = self._lost = None

    def _requeue_lost_or_stop(self, error: Exception) -> None:
        """The storage gave up while the running trial's end was not stored (or not re-queued): wait for it once
        more and queue the trial again; TrialLost, naming the trial, when it stays away."""
        trial = self._running
        assert trial is not None
        try:
            self._requeue_lost(trial)
        except Exception as again:
            outage = gave_up(again)
            if outage is None:
                raise
            raise TrialLost(lost_line(trial.number, trial.params, trial.user_attrs.get(ROLE_ATTR), outage)) \
                from error
        self._running = self._lost = None

    def _requeue_lost(self, trial: Trial) -> int | None:
        """Fail `trial` if its end was never stored, and queue a copy with its parameters and role (naming it in
        `requeued_from`) unless one exists; returns the copy's number (None when nothing was lost)."""
        number = fail_and_requeue(self.study, trial, STORAGE_LOST, lambda stored: self._lost is trial)
        if number is not None:
            logger.warning("trial %d: %s as trial %d", trial.number, STORAGE_LOST, number)
        return number

    def _requeue_interrupted(self) -> int | None:
        """Fail the trial this worker was running when interrupted, if Optuna had not yet, and queue it again with
        its parameters and role (the re-queued trial names it in `requeued_from`). Returns the new trial's number,
        or None when no trial was running (the interrupt came between trials)."""
        trial, self._running, self._lost = self._running, None, None
        interrupted, self._interrupted = self._interrupted, False
        if trial is None:
            return None
        return fail_and_requeue(self.study, trial, INTERRUPTED,
                                lambda stored: interrupted or stored.user_attrs.get(FAILURE_ATTR) == INTERRUPTED)
