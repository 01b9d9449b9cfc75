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


def test_a_front_without_pruned_trials_is_still_printed() -> None:
    """tune ends with the front even when confirmation has nothing to re-measure (only the baseline is on it)."""
    from types import SimpleNamespace

    from rich.console import Console

    from tuner.cli.confirming import run_confirmation

    study = optuna.create_study(directions=["maximize", "minimize"], study_name="only-baseline")
    study.add_trial(optuna.create_trial(values=[0.8, 100.0], user_attrs={"role": "baseline", "config": None}))
    console = Console(record=True, width=200)
    run_confirmation(console, SimpleNamespace(study=study, tasks=[]), repeats=3, fresh_limit=None, fresh_seed=1)
    text = console.export_text()
    assert "Pareto front of only-baseline" in text and "nothing to confirm" in text
