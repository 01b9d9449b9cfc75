"""A stored trial whose configuration this install cannot read (a plugin's method, a newer dart-tuner) is skipped
and named once by every reader (dashboard, Compare, `export`, `studies`), instead of breaking the whole study; and
the read side's own Pareto front is Optuna's `best_trials`."""

from __future__ import annotations

import random
from pathlib import Path

import dashboard_study
import optuna
import pytest
from optuna.trial import TrialState
from typer.testing import CliRunner

from tuner import load_preset
from tuner.cli import app
from tuner.results import pareto_trials
from tuner.results.trials import pareto_front, unreadable_trials

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from tuner import dashboard as dd  # noqa: E402

APP = Path(__file__).resolve().parent.parent / "tuner" / "dashboard" / "app.py"
PLUGIN_TRIAL = 13  # after dashboard_study's trials 0..12


def _add_plugin_trial(study: optuna.Study) -> None:
    """A trial as a plugin's method stores it: faster and more accurate than every trial (it would head the
    front), with a method this install does not know."""
    attrs = dashboard_study.trial_attrs(None, 0.795, 20.0, dashboard_study.BASELINE[1])
    attrs.update({"config": {"method": "plugin_x", "layer": 2, "keep_ratio": 0.2, "options": {"alpha": 3}},
                  "config_schema": 2})
    study.add_trial(optuna.trial.create_trial(values=[0.795, 20.0], user_attrs=attrs,
                                              constraints={"min_relative_accuracy": dashboard_study.FLOOR - 0.795}))


@pytest.fixture
def storage(tmp_path: Path) -> str:
    """Studies 'dash' and its sibling 'dash_gpu' (same model, another GPU), each with one plugin trial."""
    url = f"sqlite:///{tmp_path / 'plugin.db'}"
    _add_plugin_trial(dashboard_study.build_study(url))
    _add_plugin_trial(dashboard_study.build_study(url, "dash_gpu", device="NVIDIA H100", scale_ms=0.5))
    return url


def test_the_frame_and_the_front_skip_the_unreadable_trial(storage: str) -> None:
    study = optuna.load_study(study_name="dash", storage=storage)
    assert study.trials[PLUGIN_TRIAL].number == PLUGIN_TRIAL  # stored, and Optuna itself reads it
    assert set(unreadable_trials(study.trials)) == {PLUGIN_TRIAL}
    assert "plugin_x" in unreadable_trials(study.trials)[PLUGIN_TRIAL]
    frame = dd.trial_frame(study)
    assert PLUGIN_TRIAL not in set(frame["number"]) and len(frame) == PLUGIN_TRIAL
    front = {t.number for t in pareto_trials(study)}
    assert PLUGIN_TRIAL not in front and front == set(frame[frame["pareto"]]["number"])
    readable = [t for t in study.trials if t.number != PLUGIN_TRIAL]
    assert front == {t.number for t in pareto_front(readable)} == {0, 1, 3, 4, 6, 8}


def test_the_dashboard_and_compare_name_the_skipped_trial_once(storage: str, monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    monkeypatch.setenv(dd.STORAGE_ENV, storage)
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not at.exception, [e.value for e in at.exception]
    named = [w.value.replace("\\", "") for w in at.warning if f"trial {PLUGIN_TRIAL}" in w.value]  # markdown-escaped
    assert len(named) == 1 and "'dash'" in named[0] and "plugin_x" in named[0]
    assert any(c.key == "compare_chart" or "compare_chart" in c.proto.id for c in at.get("plotly_chart"))
    captions = [c.value.replace("\\", "") for c in at.caption]  # markdown-escaped
    compare_notes = [c for c in captions if "'dash_gpu'" in c and f"trial {PLUGIN_TRIAL}" in c]
    assert len(compare_notes) == 1, captions
    assert at.metric[0].value != f"#{PLUGIN_TRIAL}"  # the recommendation is a readable trial


def test_export_and_studies_work_and_name_the_skipped_trial_once(storage: str, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "p.yaml"
    result = runner.invoke(app, ["export", "--storage", storage, "--study", "dash", "--trial", "4", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert load_preset(out).provenance["trial"] == 4
    assert result.output.count("skipped 1 trial") == 1 and "plugin_x" in result.output
    result = runner.invoke(app, ["export", "--storage", storage, "--study", "dash", "--min-relative-accuracy", "0.9",
                                 "-o", str(out)])
    assert result.exit_code == 0 and load_preset(out).provenance["trial"] != PLUGIN_TRIAL, result.output
    result = runner.invoke(app, ["export", "--storage", storage, "--study", "dash", "--trial", str(PLUGIN_TRIAL)])
    assert result.exit_code == 2 and "cannot be read" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["studies", "--storage", storage])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # the table wraps its caption to the terminal
    for name in ("dash", "dash_gpu"):
        assert text.count(f"study '{name}': skipped 1 trial") == 1, result.output


@pytest.mark.parametrize("seed", range(5))
def test_the_front_is_optunas_best_trials(seed: int) -> None:
    """On random studies with ties, infeasible, failed and duplicate trials: the same set as `best_trials`."""
    rng = random.Random(seed)
    study = optuna.create_study(directions=["maximize", "minimize"])
    for _ in range(300):
        if rng.random() < 0.05:
            study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL))
            continue
        values = [rng.choice([0.5, 0.6, 0.7, 0.8, rng.random()]), rng.choice([10.0, 20.0, 30.0, 100 * rng.random()])]
        study.add_trial(optuna.trial.create_trial(values=values, constraints={"c": rng.choice([-1.0, 0.0, 0.5])}))
    assert {t.number for t in pareto_front(study.trials)} == {t.number for t in study.best_trials}
