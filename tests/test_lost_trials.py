"""Trials lost to a dead worker or to a storage outage, on a tiny LLaVA loaded once: each is failed with its reason
and queued again with its parameters, even by a run that has nothing left to measure, and a later run measures
it; nothing stays running."""

from __future__ import annotations

import time
from pathlib import Path

import optuna
import pytest
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from tuner.evaluation.tasks import load_tasks
from tuner.models.loading import load_model
from tuner.results.storage import HEARTBEAT_FAILURE
from tuner.search.space import parse_space
from tuner.search.study import Tuner

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
    """A worker died mid-trial after the study reached its target: the next run has nothing to measure and returns
    at once, but first fails that trial with its reason and queues it again, which a run with a larger target
    then measures."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    tuner = _tuner(saved_dirs, model_and_tasks, url, heartbeat_interval=1, grace_period=1)
    tuner.run(1)  # the baseline
    dead = tuner.study.ask()  # a worker that drew its parameters, sent one heartbeat and died
    tuner.space.suggest(dead)
    tuner.storage.record_heartbeat(dead._trial_id)
    time.sleep(2.1)  # past the grace period, on SQLite's clock of whole seconds
    tuner.run(1)
    stored = {t.number: t for t in tuner.study.get_trials()}
    assert stored[dead.number].state == TrialState.FAIL
    assert stored[dead.number].user_attrs["failure"] == HEARTBEAT_FAILURE
    [retry] = _retries_of(tuner.study, dead.number)
    assert retry.state == TrialState.WAITING and retry.params == dead.params
    tuner.run(2)
    [retry] = _retries_of(tuner.study, dead.number)
    assert retry.state == TrialState.COMPLETE and retry.params == dead.params
    assert not tuner.study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))

