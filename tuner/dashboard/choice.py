"""Choosing a point: the trial a deployer's bounds select (as `dart-tuner export` would) and its preset file."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from tuner.config.preset import preset_to_yaml
from tuner.results.export import (
    NoTrialQualifies,
    Rule,
    accuracy_floor,
    choose_trial,
    preset_from_trial,
    qualifying_trials,
)
from tuner.results.tables import noise_warning


@dataclass
class Recommendation:
    """The trial a deployer's bounds select, the trials meeting them (best first), or why there is none."""

    rule: Rule | None
    floor: float | None = None
    max_prefill_ms: float | None = None
    trial: FrozenTrial | None = None
    qualifying: list[FrozenTrial] = field(default_factory=list)
    message: str = ""
    latency_warning: str = ""  # the chosen trial's speed-up is hidden by its latency spread (`noise_warning`)


def recommend(study: optuna.Study, *, min_accuracy: float | None = None,
              min_relative_accuracy: float | None = None, max_prefill_ms: float | None = None,
              confidence: float | None = None) -> Recommendation:
    """What `dart-tuner export` would pick with the same bounds (the same Rule through `choose_trial`)."""
    try:
        rule = Rule(min_accuracy=min_accuracy, min_relative_accuracy=min_relative_accuracy,
                    max_prefill_ms=max_prefill_ms, confidence=confidence)
    except ValueError as error:
        return Recommendation(rule=None, max_prefill_ms=max_prefill_ms, message=str(error))
    try:
        floor = accuracy_floor(study, rule)
    except NoTrialQualifies:  # a relative bound without a measured baseline; choose_trial says so below
        floor = None
    try:
        trial = choose_trial(study, rule)
        qualifying = qualifying_trials(study, rule)
    except NoTrialQualifies as error:
        return Recommendation(rule=rule, floor=floor, max_prefill_ms=max_prefill_ms, message=str(error))
    return Recommendation(rule=rule, floor=floor, max_prefill_ms=max_prefill_ms, trial=trial, qualifying=qualifying,
                          message=f"{rule.describe()}: trial {trial.number}",
                          latency_warning=noise_warning(trial, study) or "")


def export_rule_args(recommendation: Recommendation) -> str:
    """The `dart-tuner export` options that pick the same trial from the command line."""
    return recommendation.rule.cli_options() if recommendation.rule is not None else ""


def preset_file_name(study_name: str, trial_number: int) -> str:
    """A safe file name for a trial's preset."""
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', study_name)}-trial{trial_number}.yaml"


def preset_yaml(study: optuna.Study, trial_number: int) -> str:
    """The preset file `dart-tuner export --trial N` writes for this trial, as text."""
    trial = choose_trial(study, Rule(trial=trial_number))
    return preset_to_yaml(preset_from_trial(study, trial))


def default_bounds(study: optuna.Study) -> dict[str, Any]:
    """Starting values of the deployer's bounds: the study's own constraints, else 95% of the baseline."""
    constraints = study.user_attrs.get("constraints") or {}
    if constraints.get("min_accuracy") is not None:
        mode, value = "absolute", float(constraints["min_accuracy"])
    else:
        mode, value = "relative", float(constraints.get("min_relative_accuracy") or 0.95)
    return {"mode": mode, "value": value, "max_prefill_ms": constraints.get("max_prefill_ms")}
