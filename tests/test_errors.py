"""One error base: every error a user can cause or cure is a DartTunerError the CLI prints as one line; anything
else is a bug and keeps its traceback."""

from __future__ import annotations

import optuna
import pytest
from typer.testing import CliRunner

import tuner.results.tables
from tuner.cli import app
from tuner.config.preset import PresetError
from tuner.errors import DartTunerError
from tuner.evaluation.lmms_compat import LmmsEvalUnavailable
from tuner.evaluation.tasks import TaskNotFoundError
from tuner.models.loading import ModelLoadError
from tuner.results import StudyNotFound
from tuner.results.export import NoTrialQualifies
from tuner.results.storage import StorageError
from tuner.search.provenance import ProvenanceMismatch
from tuner.search.space import SpaceError
from tuner.search.study import TuningStopped


@pytest.mark.parametrize("error", [SpaceError, PresetError, ModelLoadError, StorageError, NoTrialQualifies,
                                   ProvenanceMismatch, StudyNotFound, TaskNotFoundError, LmmsEvalUnavailable,
                                   TuningStopped])
def test_user_facing_errors_share_one_base(error: type) -> None:
    assert issubclass(error, DartTunerError)


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch) -> None:
    """`studies` turns storage errors into one line, but must not hide a bug behind one."""
    path = tmp_path / "s.db"
    optuna.create_study(storage=f"sqlite:///{path}", study_name="s")

    def broken(storage):  # noqa: ANN001
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(tuner.results.tables, "studies_sheet", broken)
    result = CliRunner().invoke(app, ["studies", "--storage", f"sqlite:///{path}"])
    assert isinstance(result.exception, ZeroDivisionError)
