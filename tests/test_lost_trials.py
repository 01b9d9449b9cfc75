"""Trials lost to a dead worker or to a storage outage, on a tiny LLaVA loaded once: each is failed with its reason
and queued again with its parameters, even by a run that has nothing left to measure, and a later run measures
it; nothing stays running."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy.exc
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from sqlalchemy import event

from tuner.evaluation.tasks import load_tasks
from tuner.models.loading import load_model
from tuner.results.record import REQUEUED_FROM_ATTR, ROLE_ATTR
from tuner.results.storage import HEARTBEAT_FAILURE, RECONNECT_ENV
from tuner.search.space import parse_space
from tuner.search.study import STORAGE_LOST, TrialLost, Tuner

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = [pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
              pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")]


@pytest.fixture(scope="module")
def model_and_tasks(saved_dirs: dict[str, Path]) -> tuple:
    loaded = load_model(str(saved_dirs["llava"]), dtype="float32", device="cpu", attn_implementation="sdpa")
    return loaded, load_tasks(["dart_shapes"], subset_size=3, seed=0)


def _tuner(saved_dirs: dict[str, Path], model_and_tasks: tuple, storage: object, **kwargs: object) -> Tuner:
    data = {"study": "lost", "model": str(saved_dirs["llava"]), "tasks": ["dart_shapes"],
            "subset": {"size": 3, "seed": 0}, "methods": ["random", "pooling"], "layer": [1, 2],
            "keep_ratio": {"low": 0.2, "high": 0.6}, "attn_implementation": "sdpa", "dtype": "float32",
            "device": "cpu", "batch_size": 3, "sampler": {"name": "random", "seed": 0},
            "latency": {"new_tokens": 2, "repeats": 1, "warmup": 0}}
    loaded, tasks = model_and_tasks
    return Tuner(parse_space(data, "lost.yaml"), storage, loaded=loaded, tasks=tasks, **kwargs)


def _retries_of(study: optuna.Study, number: int) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials() if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == number]


def test_a_run_whose_target_is_met_still_fails_and_requeues_a_dead_worker_s_trial(saved_dirs, model_and_tasks,
                                                                                  tmp_path) -> None:
    """A worker died measuring the baseline after the study reached its target (here one complete trial): the next
    run has nothing to measure and returns at once, but first fails that trial with its reason and queues it
    again, which a run with a larger target then measures, as the baseline."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    tuner = _tuner(saved_dirs, model_and_tasks, url, heartbeat_interval=1, grace_period=1)
    dead = tuner.study.ask()  # the queued baseline, taken by a worker that sent one heartbeat and died
    tuner.storage.record_heartbeat(dead._trial_id)
    tuner.study.add_trial(optuna.trial.create_trial(params={"method": "random"}, values=[0.5, 1.0], distributions={
        "method": optuna.distributions.CategoricalDistribution(["random", "pooling"])}))  # another worker's
    time.sleep(2.1)  # past the grace period, on SQLite's clock of whole seconds
    tuner.run(1)
    stored = {t.number: t for t in tuner.study.get_trials()}
    assert stored[dead.number].state == TrialState.FAIL
    assert stored[dead.number].user_attrs["failure"] == HEARTBEAT_FAILURE
    [retry] = _retries_of(tuner.study, dead.number)
    assert retry.state == TrialState.WAITING and retry.user_attrs[ROLE_ATTR] == "baseline"
    tuner.run(2)
    [retry] = _retries_of(tuner.study, dead.number)
    assert retry.state == TrialState.COMPLETE and tuner.study.user_attrs["baseline"]["trial"] == retry.number
    assert not tuner.study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))


class Outage:
    """A database server that is down while `down` is set: every new connection of the storage's engine is refused,
    as a stopped PostgreSQL refuses it (a transient error, waited out)."""

    def __init__(self, storage: RDBStorage) -> None:
        self.engine, self.down = storage.engine, threading.Event()
        event.listen(self.engine, "do_connect", self._refuse)

    def _refuse(self, dialect, conn_rec, cargs, cparams) -> None:  # noqa: ANN001
        if self.down.is_set():
            raise sqlalchemy.exc.OperationalError("connect", {}, Exception("Connection refused (injected)"))

    def start(self, seconds: float | None = None) -> None:
        """Go down (for `seconds`, else until `end`); pooled connections are dropped, so the next call connects."""
        self.down.set()
        self.engine.dispose()
        if seconds is not None:
            threading.Timer(seconds, self.down.clear).start()

    def end(self) -> None:
        self.down.clear()


def _down_after_first_measurement(tuner: Tuner, monkeypatch: pytest.MonkeyPatch, outage: Outage,
                                  seconds: float | None) -> list[optuna.Trial]:
    """The storage goes down right after the first trial (the baseline) is measured, before its result is stored;
    the list gets that trial."""
    real, lost = tuner.measure, []

    def measure_then_lose_the_storage(config):  # noqa: ANN001
        record = real(config)
        if not lost:
            lost.append(tuner._running)
            outage.start(seconds)
        return record

    monkeypatch.setattr(tuner, "measure", measure_then_lose_the_storage)
    return lost


def test_a_result_the_storage_gave_up_on_is_queued_again_and_measured_once_it_is_back(
        saved_dirs, model_and_tasks, tmp_path, monkeypatch) -> None:
    """The storage gives up on the measured baseline's result (2 s) and is back a second later: the trial is stored
    as failed with that reason, and a copy with its role, naming it, is measured in the same run."""
    monkeypatch.setenv(RECONNECT_ENV, "2")
    tuner = _tuner(saved_dirs, model_and_tasks, f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=1)
    outage = Outage(tuner.storage)
    lost = _down_after_first_measurement(tuner, monkeypatch, outage, seconds=3.0)
    study = tuner.run(1)
    stored = {t.number: t for t in study.get_trials()}
    [number] = [trial.number for trial in lost]
    assert stored[number].state == TrialState.FAIL and stored[number].user_attrs["failure"] == STORAGE_LOST
    [copy] = [t for t in stored.values() if t.user_attrs.get(REQUEUED_FROM_ATTR) == number]
    assert copy.state == TrialState.COMPLETE and copy.params == stored[number].params
    assert copy.user_attrs[ROLE_ATTR] == stored[number].user_attrs[ROLE_ATTR] == "baseline"
    assert study.user_attrs["baseline"]["trial"] == copy.number
    assert [t.number for t in stored.values() if t.state == TrialState.FAIL] == [number]
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))


def test_a_trial_lost_while_the_storage_stays_away_is_measured_by_the_next_run(
        saved_dirs, model_and_tasks, tmp_path, monkeypatch) -> None:
    """The storage stays away past the worker's last wait: `run` raises TrialLost naming the trial (tune exits 1),
    which stays running in the storage; once the storage is back, the next run fails it (its heartbeats stopped)
    and measures it again, as the baseline."""
    monkeypatch.setenv(RECONNECT_ENV, "0.5")
    tuner = _tuner(saved_dirs, model_and_tasks, f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=1)
    outage = Outage(tuner.storage)
    lost = _down_after_first_measurement(tuner, monkeypatch, outage, seconds=None)
    with pytest.raises(TrialLost) as raised:
        tuner.run(1)
    [trial] = lost
    assert str(raised.value).startswith(f"trial {trial.number} (") and "was not stored" in str(raised.value)
    outage.end()
    time.sleep(2.1)  # its heartbeats stopped longer ago than the grace period, on SQLite's clock of whole seconds
    study = tuner.run(1)
    stored = {t.number: t for t in study.get_trials()}
    assert stored[trial.number].state == TrialState.FAIL
    assert stored[trial.number].user_attrs["failure"] == HEARTBEAT_FAILURE
    [retry] = _retries_of(study, trial.number)
    assert retry.state == TrialState.COMPLETE and retry.user_attrs[ROLE_ATTR] == "baseline"
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
