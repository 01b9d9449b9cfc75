"""A study's trials on a serving target: which run there (`tuner.config.ports`), the target a study was tuned for,
and, when the chosen trial does not port, the nearest trial of the same study that does.

"Nearest": what the same rule chooses among the portable trials; for a trial number (or when no portable trial meets
the rule), the portable trial of the portable front closest to the chosen one in (accuracy, latency objective),
each axis scaled by its spread. The unpruned baseline at the default processor always ports.
"""

from __future__ import annotations

import dataclasses
import math

import optuna
from optuna.trial import FrozenTrial

from tuner.config import processor_text
from tuner.config.ports import Verdict, check_target, launch_settings, launch_text, verdict
from tuner.config.preset import Preset
from tuner.errors import DartTunerError
from tuner.results.export import Rule, candidates, qualifying_trials
from tuner.results.record import BASELINE_ATTR, PROVENANCE_ATTR
from tuner.results.tables import describe_trial
from tuner.results.trials import pareto_trials, record_of, study_objective

__all__ = ["TARGET_ATTR", "NotPortable", "nearest_portable", "portable_trials", "ported_preset", "refusal",
           "study_family", "study_target", "trial_verdict", "launch_file_text"]

TARGET_ATTR = "target"  # the study user attribute naming what `tune --portable` restricted it to


class NotPortable(DartTunerError, ValueError):
    """A trial (or a study) that does not run on the asked target; the message names the part and what does."""


def study_family(study: optuna.Study) -> str:
    """The model family a study was tuned on (its provenance), or NotPortable when it recorded none."""
    family = (study.user_attrs.get(PROVENANCE_ATTR) or {}).get("family")
    if not family:
        raise NotPortable(f"study {study.study_name!r} records no model family, so where its trials run is unknown")
    return str(family)


def study_target(study: optuna.Study) -> str:
    """The target a study was restricted to (`tune --portable`); `transformers` for an unrestricted one."""
    return str(study.user_attrs.get(TARGET_ATTR) or "transformers")


def trial_verdict(study: optuna.Study, trial: FrozenTrial, target: str) -> Verdict:
    """Whether a trial's configuration runs on `target`, part by part (the baseline keeps everything: it ports)."""
    config = record_of(trial).config
    if check_target(target) == "transformers":  # runs everything, whatever the family: none needed
        family = str((study.user_attrs.get(PROVENANCE_ATTR) or {}).get("family") or "")
    else:
        family = study_family(study)
    return verdict(config, family, target) if config is not None else Verdict(target, family, ())


def portable_trials(study: optuna.Study, target: str) -> list[FrozenTrial]:
    """The exportable trials (`tuner.results.export.candidates`) whose configuration runs on `target`."""
    return [t for t in candidates(study) if trial_verdict(study, t, target).ports]


def nearest_portable(study: optuna.Study, rule: Rule, chosen: FrozenTrial, target: str) -> FrozenTrial | None:
    """The trial to offer instead of `chosen` on `target` (None: no pruned trial ports, only the baseline)."""
    portable = portable_trials(study, target)
    if not portable:
        return None
    if rule.trial is None:
        numbers = {t.number for t in portable}
        qualifying = [t for t in qualifying_trials(study, rule) if t.number in numbers]
        if qualifying:
            return qualifying[0]
    front = pareto_trials(study, portable) or portable
    pool = [*front, chosen]
    spans = [max(max(t.values[i] for t in pool) - min(t.values[i] for t in pool), 1e-12) for i in (0, 1)]
    return min(front, key=lambda t: math.hypot(*((t.values[i] - chosen.values[i]) / spans[i] for i in (0, 1))))


def _point(study: optuna.Study, trial: FrozenTrial) -> str:
    goal = study_objective(study)
    return (f"trial {trial.number} ({describe_trial(trial)}, accuracy {trial.values[0]:.3f}, {goal.label} "
            f"{trial.values[1]:.1f} {goal.unit})")


def refusal(study: optuna.Study, rule: Rule, chosen: FrozenTrial, target: str) -> str:
    """One line: the part of `chosen` that does not run on `target`, and the nearest trial that does."""
    found = trial_verdict(study, chosen, target)
    line = f"trial {chosen.number} does not run on {target}: {found.first_blocker()}; "
    nearest = nearest_portable(study, rule, chosen, target)
    if nearest is not None:
        return line + f"nearest that does: {_point(study, nearest)}: --trial {nearest.number} --target {target}"
    baseline = study.user_attrs.get(BASELINE_ATTR) or {}
    measured = (f" (trial {baseline.get('trial')}: accuracy {baseline['accuracy']:.3f}, prefill "
                f"{baseline['prefill_ms']:.1f} ms)" if baseline.get("accuracy") is not None
                and baseline.get("prefill_ms") is not None else "")
    return line + (f"no pruned trial of {study.study_name!r} does; only the unpruned baseline at the default "
                   f"processor{measured} ports: serve the model as is, or tune with --portable {target}")


def ported_preset(study: optuna.Study, rule: Rule, chosen: FrozenTrial, preset: Preset, target: str) -> Preset:
    """`preset` (of `chosen`) for `target`: unchanged for transformers; for an engine, its provenance records the
    target and the engine's launch settings, or NotPortable (`refusal`) when a part does not run there."""
    if check_target(target) == "transformers":
        return preset
    found = trial_verdict(study, chosen, target)
    if not found.ports:
        raise NotPortable(refusal(study, rule, chosen, target))
    model = str(preset.provenance.get("model_id") or "MODEL")
    launch = launch_settings(preset.config, found.family, target, model)
    return dataclasses.replace(preset, provenance={**preset.provenance, TARGET_ATTR: target, "launch": launch})


def launch_file_text(preset: Preset) -> str:
    """The shell file of a ported preset's launch: what it runs, checked against which engine version."""
    launch = preset.provenance["launch"]
    trial = preset.provenance.get("trial")
    return (f"#!/bin/sh\n# {launch['target']} launch of {preset.provenance.get('study')!r} trial {trial} "
            f"(dart-tuner export --target {launch['target']}): {processor_text(preset.config) or 'no pruning'}\n"
            f"# engine facts checked against {launch['target']} {launch['engine_version_checked']}\n"
            f"{launch_text(launch)}\n")
