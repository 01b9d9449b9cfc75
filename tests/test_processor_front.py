"""A study that searched the processor's budget shows its front twice, with the knob and at the default processor
(the search without it), in `front` and at the end of `tune`; `--default-processor` shows only the latter."""

from __future__ import annotations

import json

import dashboard_study
import optuna
import pytest
from optuna.distributions import IntDistribution
from typer.testing import CliRunner

from tuner.cli import app
from tuner.config import PruningConfig
from tuner.results import pareto_trials
from tuner.results.trials import at_default_processor, searched_processor


@pytest.fixture
def storage(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'p.db'}"
    study = dashboard_study.build_study(url, "proc")
    config = PruningConfig(method="random", layer=2, keep_ratio=0.5, processor={"image_size": 84})  # dominates 6
    study.add_trial(optuna.trial.create_trial(
        values=[0.76, 20.0], params={"method": "random", "layer": 2, "keep_ratio": 0.5, "processor.image_size": 84},
        distributions={**dashboard_study.distributions("random"), "processor.image_size": IntDistribution(56, 112)},
        user_attrs=dashboard_study.trial_attrs(config, 0.76, 20.0, 100.0),
        constraints={"min_relative_accuracy": dashboard_study.FLOOR - 0.76}))
    return url


def _front_numbers(output: str) -> list[list[str]]:
    """The trial numbers of each table in `output`, table by table."""
    tables, rows = [], None
    for line in output.splitlines():
        if "Pareto front of" in line:
            rows = []
            tables.append(rows)
        elif rows is not None and line.count("│") > 2 and line.split("│")[1].strip().isdigit():
            rows.append(line.split("│")[1].strip())
    return tables


def test_the_front_with_the_knob_and_at_the_default_processor(storage: str) -> None:
    """Catches a default-processor front that still holds processor trials (the comparison would show no
    difference) and a front that drops them (the knob's point would vanish)."""
    study = optuna.load_study(study_name="proc", storage=storage)
    trials = study.get_trials()
    assert searched_processor(trials)
    downsample = trials[-1].number
    with_knob = [t.number for t in pareto_trials(study)]
    without = [t.number for t in pareto_trials(study, at_default_processor(trials))]
    assert downsample in with_knob and downsample not in without and 6 in without and 6 not in with_knob
    result = CliRunner().invoke(app, ["front", "--study", "proc", "--storage", storage], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert _front_numbers(result.output) == [[str(n) for n in with_knob], [str(n) for n in without]]
    assert "feasible trials at the default processor" in " ".join(result.output.split())
    assert "image_size=84" in result.output  # the processor point says so
    only = CliRunner().invoke(app, ["front", "--study", "proc", "--storage", storage, "--default-processor",
                                    "--json"])
    assert [row["number"] for row in json.loads(only.stdout)["rows"]] == without


def test_a_study_without_processor_settings_shows_one_front(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'd.db'}"
    dashboard_study.build_study(url, "plain")
    result = CliRunner().invoke(app, ["front", "--study", "plain", "--storage", url], terminal_width=200)
    assert result.exit_code == 0 and len(_front_numbers(result.output)) == 1, result.output
