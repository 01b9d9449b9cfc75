"""Where the shown points run: the dashboard's target filter ("all", or one of `tuner.config.ports.TARGETS`).

A target hides the trials whose configuration does not run there, so the front drawn is the front of what the
target runs, and the recommendation is what `dart-tuner export --target` exports (or the nearest trial that runs
there, with the one line `export` refuses the chosen trial with).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import optuna
from optuna.trial import FrozenTrial

from tuner.config.ports import TARGETS
from tuner.config.preset import preset_to_yaml
from tuner.dashboard.choice import Recommendation
from tuner.results.export import Rule, choose_trial, preset_from_trial
from tuner.results.ports import (
    NotPortable,
    nearest_portable,
    ported_preset,
    refusal,
    study_target,
    trial_verdict,
)

__all__ = ["TARGET_CHOICES", "default_target", "recommend_on", "target_preset_yaml", "trials_on"]

TARGET_CHOICES = ("all", *TARGETS)


def default_target(study: optuna.Study) -> str:
    """The study's own target when `tune --portable` recorded one, else "all"."""
    target = study_target(study)
    return "all" if target == "transformers" else target


def trials_on(study: optuna.Study, trials: Sequence[FrozenTrial], target: str) -> list[FrozenTrial]:
    """The trials whose configuration runs on `target` ("all": every trial). The baseline and trials without a
    configuration stay; a study that recorded no model family keeps only those."""
    if target == "all":
        return list(trials)
    try:
        return [t for t in trials if trial_verdict(study, t, target).ports]
    except NotPortable:  # no family stored: only what has no configuration is known to run
        return [t for t in trials if t.user_attrs.get("config") is None]


def recommend_on(study: optuna.Study, recommendation: Recommendation, target: str) -> Recommendation:
    """`recommendation` on `target`: unchanged when its trial runs there; else the nearest trial that does, with
    `export`'s refusal as its message (no trial: only the baseline runs there)."""
    chosen = recommendation.trial
    if target == "all" or chosen is None or recommendation.rule is None:
        return recommendation
    try:
        if trial_verdict(study, chosen, target).ports:
            return _only_portable(study, recommendation, target)
        nearest = nearest_portable(study, recommendation.rule, chosen, target)
        message = refusal(study, recommendation.rule, chosen, target)
    except NotPortable as error:
        return dataclasses.replace(recommendation, trial=None, qualifying=[], message=str(error))
    rule = Rule(trial=nearest.number) if nearest is not None else recommendation.rule  # what `export` takes
    return dataclasses.replace(_only_portable(study, recommendation, target), rule=rule, trial=nearest,
                               message=message, latency_warning="")


def _only_portable(study: optuna.Study, recommendation: Recommendation, target: str) -> Recommendation:
    kept = [t for t in recommendation.qualifying if trial_verdict(study, t, target).ports]
    return dataclasses.replace(recommendation, qualifying=kept)


def target_preset_yaml(study: optuna.Study, trial_number: int, target: str) -> str:
    """The preset `dart-tuner export --trial N --target T` writes ("all": transformers', as `export`'s default)."""
    trial = choose_trial(study, Rule(trial=trial_number))
    preset = preset_from_trial(study, trial)
    if target != "all":
        preset = ported_preset(study, Rule(trial=trial_number), trial, preset, target)
    return preset_to_yaml(preset)
