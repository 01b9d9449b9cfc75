"""A trial's stored uncertainty: computed from per-sample scores and rounds, shown by tables, export and the
dashboard, and read as unknown for trials stored before it existed (hand-built studies, no model)."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from rich.console import Console

from tuner import PruningConfig
from tuner.dashboard import pareto_figure, trial_frame
from tuner.results.evidence import (
    accuracy_evidence,
    indistinct_from,
    latency_evidence,
    stored_scores,
    versus_baseline_text,
)
from tuner.results.export import preset_from_trial
from tuner.results.tables import pareto_table, studies_table

BASE = [1.0] * 8 + [0.0] * 2  # the baseline: 8 of 10 right


def _scores(values: list[float], task: str = "t") -> list[tuple[str, int, float]]:
    return [(task, doc, value) for doc, value in enumerate(values)]


def test_accuracy_evidence_pairs_with_the_baseline_by_document() -> None:
    """Candidate right on doc 8, wrong on docs 0-2: 1 improved, 3 worsened; the McNemar p of that table is
    2 * (1 + 4) / 16; a baseline stored before task names (task '') still pairs by document."""
    candidate = [0.0, 0.0, 0.0] + [1.0] * 5 + [1.0, 0.0]
    attrs = accuracy_evidence(_scores(candidate), _scores(BASE, task=""))
    assert attrs["accuracy_interval"] == "wilson" and attrs["accuracy_low"] < 0.6 < attrs["accuracy_high"]
    assert (attrs["discordant_improved"], attrs["discordant_worsened"], attrs["n_paired"]) == (1, 3, 10)
    assert attrs["accuracy_diff"] == pytest.approx(-0.2)
    assert attrs["mcnemar_p"] == pytest.approx(10 / 16)
    assert attrs["accuracy_diff_low"] < -0.2 < attrs["accuracy_diff_high"]
    assert attrs["sample_tasks"] == [["t", 10]]
    partial = accuracy_evidence(_scores(candidate[:4]), _scores(BASE))  # a stopped trial: pairs what it scored
    assert partial["n_paired"] == 4 and partial["accuracy_diff"] == pytest.approx(-0.75)


def test_stored_scores_round_trip_and_unknown() -> None:
    """What measure() stores reads back with its tasks; no samples or an unscored sample read as unknown."""
    attrs = {"samples": [[3, 1.0, 5], [7, 0.0, 5], [2, 1.0, 5]], "sample_tasks": [["a", 2], ["b", 1]]}
    assert stored_scores(attrs) == [("a", 3, 1.0), ("a", 7, 0.0), ("b", 2, 1.0)]
    assert stored_scores({}) is None
    assert stored_scores({"samples": [[1, None, 3]]}) is None


def _trial(number_acc: float, ms: float, evidence: dict, ratio: float) -> optuna.trial.FrozenTrial:
    config = PruningConfig(method="random", layer=2, keep_ratio=ratio)
    return optuna.create_trial(values=[number_acc, ms], params={"method": "random"},
                               distributions={"method": CategoricalDistribution(["random"])},
                               user_attrs={"config": config.to_dict(), "prefill_ms": ms, **evidence})


def _study(with_evidence: bool) -> optuna.Study:
    """Baseline 0.8 @ 100 ms; trial 1 (0.7 @ 30 ms) and 2 (0.72 @ 31 ms) overlap on both axes; trial 3 (0.5 @
    10 ms) is clearly faster and less accurate."""
    study = optuna.create_study(directions=["maximize", "minimize"], study_name="ev")
    study.set_user_attr("baseline", {"trial": 0, "accuracy": 0.8, "prefill_ms": 100.0})
    study.add_trial(optuna.create_trial(values=[0.8, 100.0], user_attrs={"role": "baseline", "config": None}))
    points = [(0.70, 30.0, (0.6, 0.8), (28.0, 33.0)), (0.72, 31.0, (0.62, 0.82), (29.0, 34.0)),
              (0.50, 10.0, (0.4, 0.6), (9.0, 11.0))]
    for index, (acc, ms, (a_low, a_high), (p_low, p_high)) in enumerate(points):
        evidence = {"accuracy_low": a_low, "accuracy_high": a_high, "prefill_ms_low": p_low, "prefill_ms_high": p_high,
                    "accuracy_diff": acc - 0.8, "accuracy_diff_low": acc - 0.9, "accuracy_diff_high": acc - 0.75,
                    "mcnemar_p": 0.031} if with_evidence else {}
        study.add_trial(_trial(acc, ms, evidence, 0.2 + 0.1 * index))
    return study


def _render(table: object) -> str:
    console = Console(width=250, record=True)
    console.print(table)
    return console.export_text()


def test_front_shows_intervals_and_indistinguishable_trials() -> None:
    """Catches intervals that never reach the printed front, and 'not distinguishable' that ignores an axis."""
    study = _study(with_evidence=True)
    by_number = {t.number: t for t in study.trials}
    assert indistinct_from(by_number[1], study.trials) == [2]
    assert indistinct_from(by_number[3], study.trials) == []
    text = _render(pareto_table(study))
    assert "0.700 [0.600-0.800]" in text and "30.0 [28.0-33.0]" in text
    assert "-0.100 [-0.20,-0.05] p=0.031" in text
    row_1 = next(line for line in text.splitlines() if "30.0 [28.0-33.0]" in line)
    assert row_1.rstrip(" │").endswith("#2")
    metrics = preset_from_trial(study, by_number[1]).metrics
    assert (metrics["accuracy_low"], metrics["prefill_ms_high"], metrics["mcnemar_p"]) == (0.6, 33.0, 0.031)


def test_old_trials_without_evidence_still_display_as_unknown(tmp_path) -> None:
    """A study stored before the intervals: the front, `studies`, export and the dashboard all work, show '-'
    and call nothing indistinguishable."""
    storage = f"sqlite:///{tmp_path / 'old.db'}"
    study = optuna.create_study(directions=["maximize", "minimize"], study_name="ev", storage=storage)
    for trial in _study(with_evidence=False).trials:
        study.add_trial(trial)
    study.set_user_attr("baseline", {"trial": 0, "accuracy": 0.8, "prefill_ms": 100.0})
    text = _render(pareto_table(study))
    assert "0.700 " in text and "[0." not in text
    assert all(indistinct_from(t, study.trials) == [] for t in study.trials)
    assert versus_baseline_text(study.trials[1]) == "-"
    assert "#3 random K=2 0.4: 0.500 @ 10.0 ms" in _render(studies_table(storage))
    assert preset_from_trial(study, study.trials[1]).metrics["accuracy_low"] is None
    frame = trial_frame(study)
    assert frame["accuracy_low"].isna().all() and (frame["indistinct"] == "").all()
    pareto_figure(frame)  # no interval: no error bar, but no error either


def test_dashboard_draws_error_bars_and_names_indistinct_trials() -> None:
    """The Pareto plot's error bars are the stored intervals (asymmetric), and the hover says which trial a point
    cannot be told apart from."""
    study = _study(with_evidence=True)
    frame = trial_frame(study)
    figure = pareto_figure(frame)
    trace = next(t for t in figure.data if t.name == "random")
    by_x = {x: i for i, x in enumerate(trace.x)}
    i = by_x[30.0]
    assert trace.error_y.array[i] == pytest.approx(0.1) and trace.error_y.arrayminus[i] == pytest.approx(0.1)
    assert trace.error_x.array[i] == pytest.approx(3.0) and trace.error_x.arrayminus[i] == pytest.approx(2.0)
    hover = frame.set_index("number").loc[1, "hover"]
    assert "not distinguishable from trial 2" in hover and "95% [0.600-0.800]" in hover


def test_latency_evidence_is_the_median_interval() -> None:
    """Five rounds: min..max with coverage 93.75%."""
    assert latency_evidence([9.0, 8.0, 12.0, 8.5, 8.7]) == {"prefill_ms_low": 8.0, "prefill_ms_high": 12.0,
                                                            "prefill_ms_coverage": 0.9375}


def test_confirmed_numbers_are_shown_next_to_the_search_ones() -> None:
    """A stored confirmation reaches the printed front, the dashboard frame, its Pareto plot and the preset; a
    front trial it did not cover shows '-'."""
    study = _study(with_evidence=True)
    numbers = {"prefill_ms": 29.0, "speedup": 3.45, "speedup_low": 3.3, "speedup_high": 3.6, "latency_noisy": False,
               "accuracy": 0.69, "accuracy_low": 0.58, "accuracy_high": 0.79}
    study.set_user_attr("confirmation", {"repeats": 20, "fresh_subset": [{"name": "t", "size": 60}],
                                         "trials": {"1": numbers}})
    text = _render(pareto_table(study))
    assert "confirmed (20 rounds, fresh subset)" in text and "29.0 ms 3.45x, acc 0.690 [0.58-0.79]" in text
    frame = trial_frame(study).set_index("number")
    assert frame.loc[1, "confirmed_prefill_ms"] == 29.0 and frame.loc[1, "confirmed_accuracy"] == 0.69
    assert "confirmed (re-measured after the search)" in frame.loc[1, "hover"]
    assert frame["confirmed_prefill_ms"].isna().sum() == 3
    trace = next(t for t in pareto_figure(trial_frame(study)).data if t.name == "confirmed (re-measured)")
    assert list(trace.x) == [29.0] and list(trace.y) == [0.69]
    assert preset_from_trial(study, study.trials[1]).metrics["confirmed"] == numbers
    assert preset_from_trial(study, study.trials[2]).metrics["confirmed"] is None
