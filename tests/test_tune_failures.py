"""`tune` fails loudly: a failed baseline or a run of identical failures stops the study with its reason and a
non-zero exit, the failed trials stay stored, and the same command resumes once the cause is fixed."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial
from typer.testing import CliRunner

from tuner.cli import app
from tuner.evaluation.runner import Evaluator
from tuner.results import is_baseline
from tuner.search.guards import FailureGuard, RepeatGuard

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _space(tmp_path: Path, model: Path) -> Path:
    data = {"study": "loud", "model": str(model), "tasks": ["dart_shapes"], "subset": {"size": 4, "seed": 0},
            "methods": ["random", "pooling"], "layer": [1, 2], "keep_ratio": [0.25, 0.5],
            "attn_implementation": "sdpa", "dtype": "float32", "device": "cpu", "batch_size": 4,
            "sampler": {"name": "random", "seed": 0}, "trials": 6,
            "latency": {"new_tokens": 2, "repeats": 1, "warmup": 0}}
    path = tmp_path / "loud.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _tune(space: Path, storage: str, *extra: str):
    return CliRunner().invoke(app, ["tune", "--space", str(space), "--storage", storage, *extra])


def _trials(storage: str) -> list:
    return optuna.load_study(study_name="loud", storage=storage).get_trials()


def test_every_evaluation_failing_stops_at_the_baseline_with_its_reason(saved_dirs, tmp_path, monkeypatch):
    def broken(self, config, on_progress=None):
        raise ModuleNotFoundError("No module named 'filelock._api'")

    monkeypatch.setattr(Evaluator, "evaluate", broken)
    storage = f"sqlite:///{tmp_path / 's.db'}"
    result = _tune(_space(tmp_path, saved_dirs["llava"]), storage)
    assert result.exit_code == 1, result.output
    assert "baseline (trial 0) failed" in result.output and "filelock._api" in result.output
    assert "Traceback" not in result.output
    trials = _trials(storage)
    assert len(trials) <= 3 and [t.state for t in trials] == [TrialState.FAIL]
    assert trials[0].user_attrs["failure"] == "ModuleNotFoundError: No module named 'filelock._api'"

    monkeypatch.undo()  # the cause is fixed: the same command resumes, baseline first, numbering kept
    resumed = _tune(_space(tmp_path, saved_dirs["llava"]), storage, "--trials", "2")
    assert resumed.exit_code == 0, resumed.output
    trials = _trials(storage)
    assert [t.number for t in trials] == list(range(len(trials)))
    assert trials[0].user_attrs["failure"].startswith("ModuleNotFoundError")  # kept with its reason
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 2 and is_baseline(complete[0]) and complete[0].number == 1


def test_the_same_failure_three_times_in_a_row_stops_the_study(saved_dirs, tmp_path, monkeypatch):
    real = Evaluator.evaluate

    def pruned_trials_fail(self, config, on_progress=None):
        if config is not None:
            raise ValueError("task 'dart_shapes' has no field 'answer' (simulated)")
        return real(self, config, on_progress=on_progress)

    monkeypatch.setattr(Evaluator, "evaluate", pruned_trials_fail)
    storage = f"sqlite:///{tmp_path / 's.db'}"
    result = _tune(_space(tmp_path, saved_dirs["llava"]), storage, "--trials", "20")
    assert result.exit_code == 1, result.output
    assert "3 trials in a row failed with ValueError" in result.output and "no field 'answer'" in result.output
    assert "run the same command again to resume" in result.output
    states = [t.state for t in _trials(storage)]
    assert states == [TrialState.COMPLETE] + [TrialState.FAIL] * 3

    other = tmp_path / "other.db"
    once = _tune(_space(tmp_path, saved_dirs["llava"]), f"sqlite:///{other}", "--max-same-failures", "1")
    assert once.exit_code == 1 and "1 trials in a row failed" in once.output
    assert len(_trials(f"sqlite:///{other}")) == 2


def _failed(number: int, error_type: str, *, baseline: bool = False):
    attrs = {"failure": f"{error_type}: boom", "failure_type": error_type, **({"role": "baseline"} if baseline else {})}
    trial = create_trial(state=TrialState.FAIL, user_attrs=attrs)
    trial.number = number
    return trial


def _complete(number: int):
    trial = create_trial(values=[0.5, 1.0], params={"x": 0.5}, distributions={"x": FloatDistribution(0, 1)})
    trial.number = number
    return trial


class _Study:
    stopped = False
    study_name = "s"

    def stop(self) -> None:
        self.stopped = True


@pytest.mark.parametrize(("sequence", "stops"), [
    (["A", "A", "A"], True),
    (["A", "B", "A", "B", "A"], False),  # different causes: configurations, not the setup
    (["A", "A", "ok", "A", "A"], False),  # a success in between resets the count
    (["ok", "A", "A", "A"], True),
])
def test_failure_guard_counts_identical_failures_in_a_row(sequence, stops):
    guard, study = FailureGuard(3), _Study()
    for number, item in enumerate(sequence, start=1):
        guard(study, _complete(number) if item == "ok" else _failed(number, item))
    assert study.stopped is stops and (guard.reason is not None) is stops


def test_failure_guard_stops_at_once_when_the_baseline_fails():
    guard, study = FailureGuard(3), _Study()
    guard(study, _failed(0, "OSError", baseline=True))
    assert study.stopped and "baseline (trial 0) failed" in guard.reason and "OSError: boom" in guard.reason


def test_failure_guard_ignores_interrupted_and_rejects_a_zero_limit():
    guard, study = FailureGuard(1), _Study()
    interrupted = create_trial(state=TrialState.FAIL, user_attrs={"failure": "interrupted (Ctrl-C)"})
    guard(study, interrupted)
    assert not study.stopped
    with pytest.raises(ValueError, match="max_same_failures"):
        FailureGuard(0)


def _skipped(number: int, baseline: bool = False):
    attrs = {"duplicate_of": 1, **({"role": "baseline"} if baseline else {})}
    trial = create_trial(state=TrialState.PRUNED, user_attrs=attrs)
    trial.number = number
    return trial


def test_repeat_guard_stops_only_after_a_run_of_skipped_repeats():
    """A used-up space must end the run; a measured trial in between, or skipped baselines, must not count."""
    guard, study = RepeatGuard(limit=3), _Study()
    for item in [_skipped(2), _skipped(3), _complete(4), _skipped(5), _skipped(6, baseline=True), _skipped(7)]:
        guard(study, item)
    assert not study.stopped
    guard(study, _skipped(8))
    assert study.stopped
