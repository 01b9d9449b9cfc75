"""Where the dashboard's studies come from: the storage URL, the study picker, loading one, its trial states."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

from tuner.results import StudyNotFound, open_study
from tuner.results.storage import DEFAULT_STORAGE, StorageError

STORAGE_ENV = "DART_TUNER_STORAGE"


def storage_from_argv(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> str:
    """The storage URL from `--storage URL` in argv (after streamlit's `--`), else $DART_TUNER_STORAGE, else the
    default."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--storage")
    known, _ = parser.parse_known_args(list(argv))
    environ = os.environ if environ is None else environ
    return known.storage or environ.get(STORAGE_ENV) or DEFAULT_STORAGE


_OURS = (["MAXIMIZE", "MINIMIZE"], ["MAXIMIZE", "MAXIMIZE"])  # accuracy up; latency down or throughput up


@dataclass(frozen=True)
class StudyChoice:
    """One study of a storage, as the picker lists it."""

    name: str
    n_trials: int
    label: str
    dart_tuner: bool  # two objectives (accuracy up, latency down): a study `dart-tuner tune` made
    model_id: str | None = None


def list_studies(storage: optuna.storages.BaseStorage) -> list[StudyChoice]:
    """Every study in the storage with a label (model, tasks, device, trial count), by name."""
    choices = []
    for study in storage.get_all_studies():
        provenance = study.user_attrs.get("provenance") or {}
        tasks = ",".join(t.get("name", "?") for t in provenance.get("tasks") or [])
        details = [str(v) for v in (provenance.get("model_id"), tasks, provenance.get("device")) if v]
        ours = [d.name for d in study.directions] in _OURS
        n_trials = storage.get_n_trials(storage.get_study_id_from_name(study.study_name))
        label = f"{study.study_name} ({', '.join(details + [f'{n_trials} trials'])})"
        choices.append(StudyChoice(study.study_name, n_trials, label, ours, provenance.get("model_id")))
    return sorted(choices, key=lambda c: c.name)


def load_study(storage: optuna.storages.BaseStorage, name: str) -> optuna.Study:
    """The named study; StorageError naming the studies there when it does not exist or is not dart-tuner's."""
    try:
        study = open_study(storage, name)
    except StudyNotFound as error:
        raise StorageError(str(error)) from None
    if [d.name for d in study.directions] not in _OURS:
        raise StorageError(f"study {name!r} has directions {[d.name.lower() for d in study.directions]}, not "
                             "(maximize accuracy, minimize latency or maximize throughput): it was not made by "
                             "dart-tuner tune")
    return study


def state_counts(trials: Sequence[FrozenTrial]) -> dict[str, int]:
    """Trials by state (complete, running, waiting, fail, pruned)."""
    return {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}


def is_running(trials: Sequence[FrozenTrial]) -> bool:
    """Whether some trial is running or queued (the study is still being tuned)."""
    return any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)


def related_studies(choices: Sequence[StudyChoice], current: optuna.Study, limit: int = 5) -> list[str]:
    """Other studies of the same model (other tasks or GPUs): what to compare with by default."""
    model = (current.user_attrs.get("provenance") or {}).get("model_id")
    return [c.name for c in choices if c.name != current.study_name and c.model_id == model][:limit]
