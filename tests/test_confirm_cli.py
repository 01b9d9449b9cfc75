"""`dart-tuner confirm` refuses what it cannot confirm with one line, before loading any model (no model here)."""

from __future__ import annotations

from pathlib import Path

import optuna
from typer.testing import CliRunner

from tuner.cli import app

DEMO_SPACE = Path(__file__).resolve().parent.parent / "search_spaces" / "demo.yaml"


def test_confirm_never_creates_a_study(tmp_path: Path) -> None:
    """A study name that is not in the storage is one line listing the ones there, exit 2, and nothing is added."""
    storage = f"sqlite:///{tmp_path / 's.db'}"
    optuna.create_study(storage=storage, study_name="other", directions=["maximize", "minimize"])
    result = CliRunner().invoke(app, ["confirm", "--space", str(DEMO_SPACE), "--storage", storage])
    assert result.exit_code == 2, result.output
    assert "no study 'demo'" in result.output and "other" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == ["other"]


def test_confirm_options_are_checked(tmp_path: Path) -> None:
    """--repeats 0 is refused by the option itself, naming it."""
    result = CliRunner().invoke(app, ["confirm", "--space", str(DEMO_SPACE), "--repeats", "0"])
    assert result.exit_code == 2 and "--repeats" in result.output
