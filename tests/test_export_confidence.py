"""Export rules with confidence: an accuracy floor met by the trial's lower confidence bound, not its point value
(hand-built study with per-sample scores; no model)."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from typer.testing import CliRunner

from tuner import PruningConfig
from tuner.cli import app
from tuner.dashboard import recommend
from tuner.results.evidence import accuracy_lower_bound
from tuner.results.export import NoTrialQualifies, Rule, choose_trial
from tuner.results.stats import wilson_interval

N = 50


def _samples(right: int) -> list[list]:
    return [[doc, 1.0 if doc < right else 0.0, 8] for doc in range(N)]


def _study(storage: str | None = None) -> optuna.Study:
    """Baseline 40/50 = 0.80. Trial 1: 39/50 at 20 ms. Trial 2: 50/50 at 40 ms. Trial 3: 0.90 at 30 ms, stored
    before per-sample scores existed (no `samples`)."""
    study = optuna.create_study(directions=["maximize", "minimize"], storage=storage, study_name="conf")
    study.set_user_attr("baseline", {"trial": 0, "accuracy": 0.80, "prefill_ms": 100.0})
    study.add_trial(optuna.create_trial(values=[0.80, 100.0], user_attrs={"role": "baseline", "config": None,
                                                                          "samples": _samples(40)}))
    for accuracy, ms, samples in ((39 / N, 20.0, _samples(39)), (1.0, 40.0, _samples(50)), (0.9, 30.0, None)):
        config = PruningConfig(method="random", layer=2, keep_ratio=ms / 100)
        attrs = {"config": config.to_dict(), "prefill_ms": ms, **({"samples": samples} if samples else {})}
        study.add_trial(optuna.create_trial(values=[accuracy, ms], params={"method": "random"},
                                            distributions={"method": CategoricalDistribution(["random"])},
                                            user_attrs=attrs))
    return study


def test_lower_bound_is_the_one_sided_wilson_bound() -> None:
    """A 90% one-sided bound is the low end of the 80% two-sided Wilson interval: 39/50 gives 0.697 (below the
    floor 0.76 although 0.78 is above it); 50/50 gives 50 / (50 + 1.2816^2) = 0.9682."""
    study = _study()
    trials = {t.number: t for t in study.trials}
    assert accuracy_lower_bound(trials[1], 0.9) == pytest.approx(wilson_interval(39, N, 0.8)[0])
    assert accuracy_lower_bound(trials[1], 0.9) == pytest.approx(0.6967, abs=1e-4)
    assert accuracy_lower_bound(trials[2], 0.9) == pytest.approx(0.9682, abs=1e-4)
    assert accuracy_lower_bound(trials[3], 0.9) is None  # no per-sample scores: unknown


def test_confidence_changes_the_choice_only_when_asked() -> None:
    """Default: the fastest whose measured accuracy meets 95% of the baseline (trial 1). With --confidence 0.9:
    the fastest whose lower bound does (trial 2); trial 3, which cannot be bounded, never qualifies."""
    study = _study()
    assert choose_trial(study, Rule(min_relative_accuracy=0.95)).number == 1
    assert choose_trial(study, Rule(min_relative_accuracy=0.95, confidence=0.9)).number == 2
    assert choose_trial(study, Rule(min_accuracy=0.5, confidence=0.9)).number == 1
    with pytest.raises(NoTrialQualifies, match="90% lower bound unknown"):
        choose_trial(study, Rule(min_accuracy=0.99, confidence=0.9))
    rule = Rule(min_relative_accuracy=0.95, confidence=0.9)
    assert rule.cli_options() == "--min-relative-accuracy 0.95 --confidence 0.9"
    assert "90% lower bound" in rule.describe()
    assert recommend(study, min_relative_accuracy=0.95, confidence=0.9).trial.number == 2


@pytest.mark.parametrize(("args", "culprit"), [
    (["--confidence", "0.9"], "--confidence bounds an accuracy floor"),
    (["--min-relative-accuracy", "0.95", "--confidence", "1.5"], "--confidence must be at least 0.5"),
    (["--min-relative-accuracy", "0.95", "--confidence", "0.2"], "--confidence must be at least 0.5"),
    (["--trial", "1", "--confidence", "0.9"], "not both"),
])
def test_bad_confidence_input_is_one_line(tmp_path, args: list[str], culprit: str) -> None:
    """Each mistake exits 2 with one line naming the option, before anything is written."""
    storage = f"sqlite:///{tmp_path / 'c.db'}"
    _study(storage)
    result = CliRunner().invoke(app, ["export", "--study", "conf", "--storage", storage, *args,
                                      "-o", str(tmp_path / "p.yaml")])
    assert result.exit_code == 2, result.output
    assert culprit in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "p.yaml").exists()


def test_cli_export_with_confidence(tmp_path) -> None:
    """The command line picks what the rule picks."""
    storage = f"sqlite:///{tmp_path / 'c.db'}"
    _study(storage)
    result = CliRunner().invoke(app, ["export", "--study", "conf", "--storage", storage, "--min-relative-accuracy",
                                      "0.95", "--confidence", "0.9", "-o", str(tmp_path / "p.yaml")])
    assert result.exit_code == 0, result.output
    assert "trial 2" in result.output
