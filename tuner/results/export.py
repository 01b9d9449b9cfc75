"""Choosing a study's trial the way a deployer thinks, and turning it into a preset with its evidence.

Rules: a trial number; the fastest trial with accuracy at least X (absolute) or a fraction of the baseline; the
most accurate trial under a prefill latency of Y ms; or both bounds at once (then the fastest that meets both).
With a confidence C, an accuracy floor is met by the one-sided C lower confidence bound of the trial's accuracy
(from its stored per-sample scores, `tuner.results.evidence.accuracy_lower_bound`), not by its point value.
The unpruned baseline, failed trials and trials stopped early are never chosen. When nothing qualifies, the error
shows the closest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

from tuner import __version__
from tuner.config.preset import SCHEMA_VERSION, Preset
from tuner.config.workload import Objective
from tuner.errors import DartTunerError
from tuner.results.evidence import accuracy_lower_bound, confirmed
from tuner.results.record import BASELINE_ATTR, PROVENANCE_ATTR
from tuner.results.tables import describe_trial
from tuner.results.trials import (
    config_of,
    is_baseline,
    readable_trials,
    record_of,
    study_objective,
    study_workload,
    unreadable_reason,
)

# The uncertainty `tuner.results.evidence` stores with a trial, carried into the preset (None for older trials).
EVIDENCE_METRICS = ("accuracy_low", "accuracy_high", "accuracy_interval", "accuracy_diff", "accuracy_diff_low",
                    "accuracy_diff_high", "accuracy_diff_method", "mcnemar_p", "prefill_ms_low", "prefill_ms_high",
                    "prefill_ms_coverage")
# The workload's numbers (`tuner.measure.workload`), carried into the preset (None for trials from before them).
WORKLOAD_METRICS = ("ttft_ms", "ttft_iqr_ms", "e2e_ms", "e2e_iqr_ms", "throughput", "throughput_iqr",
                    "decode_batch_ms_per_token", "memory_bytes", "memory_source", "max_concurrent_requests",
                    "max_concurrent_source", "memory_budget_bytes")


class NoTrialQualifies(DartTunerError, ValueError):
    """No stored trial meets the rule; the message lists the closest ones."""


@dataclass(frozen=True)
class Rule:
    """How to pick a trial: by number, or by accuracy floor and/or latency ceiling."""

    trial: int | None = None
    min_accuracy: float | None = None
    min_relative_accuracy: float | None = None
    max_prefill_ms: float | None = None
    confidence: float | None = None  # one-sided level of the accuracy floor's lower bound; None: the point value

    def __post_init__(self) -> None:
        bounds = (self.min_accuracy, self.min_relative_accuracy, self.max_prefill_ms)
        if self.trial is not None and any(b is not None for b in (*bounds, self.confidence)):
            raise ValueError("give a trial number or accuracy/latency bounds (and --confidence), not both")
        if self.confidence is not None:
            if self.min_accuracy is None and self.min_relative_accuracy is None:
                raise ValueError("--confidence bounds an accuracy floor: give --min-accuracy or "
                                 "--min-relative-accuracy with it")
            if not 0.5 <= self.confidence < 1:
                raise ValueError(f"--confidence must be at least 0.5 and below 1 (a one-sided level such as 0.9), "
                                 f"got {self.confidence:g}")
        if self.trial is None and all(b is None for b in bounds):
            raise ValueError("choose a trial: give a trial number, a minimum accuracy (absolute or relative to the "
                             "baseline) or a maximum prefill latency")
        if self.min_accuracy is not None and self.min_relative_accuracy is not None:
            raise ValueError("give an absolute or a relative minimum accuracy, not both")

    def cli_options(self) -> str:
        """The `dart-tuner export` options that select by this rule."""
        if self.trial is not None:
            return f"--trial {self.trial}"
        options = {"--min-accuracy": self.min_accuracy, "--min-relative-accuracy": self.min_relative_accuracy,
                   "--max-latency-ms": self.max_prefill_ms, "--confidence": self.confidence}
        return " ".join(f"{flag} {value:g}" for flag, value in options.items() if value is not None)

    def describe(self) -> str:
        if self.trial is not None:
            return f"trial {self.trial}"
        parts = []
        subject = "accuracy" if self.confidence is None else f"accuracy's {self.confidence:.0%} lower bound"
        if self.min_accuracy is not None:
            parts.append(f"{subject} >= {self.min_accuracy:g}")
        if self.min_relative_accuracy is not None:
            parts.append(f"{subject} >= {self.min_relative_accuracy:.1%} of the baseline")
        if self.max_prefill_ms is not None:
            parts.append(f"prefill <= {self.max_prefill_ms:g} ms")
        goal = "most accurate" if self.max_prefill_ms is not None and len(parts) == 1 else "fastest"
        return f"{goal} trial with {' and '.join(parts)}"


def candidates(study: optuna.Study) -> list[FrozenTrial]:
    """Complete, pruned (non-baseline) trials that scored their whole subset: what a preset can be made from (a
    trial stopped early reports a bound, not an accuracy; one whose configuration this install cannot read is left
    out, `tuner.results.trials.unreadable_trials`)."""
    return [t for t in readable_trials(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
            if not is_baseline(t) and config_of(t) is not None and not record_of(t).stopped_early]


def floor_evidence(trial: FrozenTrial, rule: Rule) -> float | None:
    """The accuracy a rule's floor is compared with: the point value, or with a confidence its lower bound (None
    when the trial stored no per-sample scores to bound)."""
    if rule.confidence is None:
        return trial.values[0]
    return accuracy_lower_bound(trial, rule.confidence)


def baseline_accuracy(study: optuna.Study) -> float:
    baseline = study.user_attrs.get(BASELINE_ATTR)
    if not baseline:
        raise NoTrialQualifies(f"study {study.study_name!r} has no completed baseline trial, so a relative "
                               "accuracy bound cannot be evaluated")
    return float(baseline["accuracy"])


def _label(trial: FrozenTrial, goal: Objective) -> str:
    return (f"#{trial.number} {describe_trial(trial)}: accuracy {trial.values[0]:.3f}, {goal.label} "
            f"{trial.values[1]:.1f} {goal.unit}")


def prefill_of(trial: FrozenTrial) -> float:
    """The trial's single-request prefill median, what --max-latency-ms bounds, whichever the study's objective."""
    value = record_of(trial).prefill_ms
    return trial.values[1] if value is None else float(value)


def accuracy_floor(study: optuna.Study, rule: Rule) -> float | None:
    """The absolute accuracy a bounds rule requires (a relative bound times the baseline's), or None."""
    if rule.min_relative_accuracy is not None:
        return rule.min_relative_accuracy * baseline_accuracy(study)
    return rule.min_accuracy


def qualifying_trials(study: optuna.Study, rule: Rule) -> list[FrozenTrial]:
    """The candidates meeting a bounds rule, best first (the first is what `choose_trial` picks).

    With an accuracy floor the best at the study's latency objective comes first (ties: the more accurate); with
    only a prefill ceiling the most accurate comes first (ties: the better objective).
    """
    if rule.trial is not None:
        raise ValueError("qualifying_trials takes accuracy/latency bounds, not a trial number")
    floor = accuracy_floor(study, rule)
    qualifying = [t for t in candidates(study) if (floor is None or (floor_evidence(t, rule) or -math.inf) >= floor)
                  and (rule.max_prefill_ms is None or prefill_of(t) <= rule.max_prefill_ms)]
    cost = study_objective(study).cost
    if floor is None:
        return sorted(qualifying, key=lambda t: (-t.values[0], cost(t.values[1])))
    return sorted(qualifying, key=lambda t: (cost(t.values[1]), -t.values[0]))


def choose_trial(study: optuna.Study, rule: Rule) -> FrozenTrial:
    """The trial `rule` selects, or NoTrialQualifies naming the closest trials."""
    pool = candidates(study)
    if rule.trial is not None:
        trials = study.get_trials(deepcopy=False)
        matches = [t for t in trials if t.number == rule.trial]
        if not matches:
            raise NoTrialQualifies(f"study {study.study_name!r} has no trial {rule.trial} "
                                   f"(trials 0..{len(trials) - 1})")
        trial = matches[0]
        if unreadable_reason(trial) is not None:
            raise NoTrialQualifies(f"trial {rule.trial} cannot be read by this install: {unreadable_reason(trial)}")
        record = record_of(trial)
        if trial.state != TrialState.COMPLETE:
            raise NoTrialQualifies(f"trial {rule.trial} is {trial.state.name.lower()}, not complete"
                                   f"{': ' + record.failure if record.failure is not None else ''}")
        if is_baseline(trial) or record.config is None:
            raise NoTrialQualifies(f"trial {rule.trial} is the unpruned baseline; there is nothing to deploy")
        if record.stopped_early:
            raise NoTrialQualifies(f"trial {rule.trial} was stopped early, so it has no accuracy to deploy on: "
                                   f"{record.stop_reason or 'it could not meet the accuracy floor'}")
        return trial
    floor = accuracy_floor(study, rule)
    qualifying = qualifying_trials(study, rule)
    if qualifying:
        return qualifying[0]
    if not pool:
        raise NoTrialQualifies(f"study {study.study_name!r} has no complete pruned trial yet")

    def shortfall(t: FrozenTrial) -> float:
        evidence = floor_evidence(t, rule)
        evidence = t.values[0] if evidence is None else evidence
        accuracy_gap = max(0.0, (floor - evidence) / max(abs(floor), 1e-9)) if floor is not None else 0.0
        latency_gap = max(0.0, (prefill_of(t) - rule.max_prefill_ms) / rule.max_prefill_ms) \
            if rule.max_prefill_ms is not None else 0.0
        return accuracy_gap + latency_gap

    closest = sorted(pool, key=shortfall)[:3]
    bound = f" (accuracy floor {floor:.3f})" if floor is not None else ""
    raise NoTrialQualifies(f"no trial of {study.study_name!r} meets: {rule.describe()}{bound}. Closest:\n  "
                           + "\n  ".join(_label(t, study_objective(study)) + _bound_label(t, rule) for t in closest))


def _bound_label(trial: FrozenTrial, rule: Rule) -> str:
    """', 90% lower bound 0.712' for a confidence rule ('no per-sample scores' when it cannot be bounded)."""
    if rule.confidence is None:
        return ""
    bound = accuracy_lower_bound(trial, rule.confidence)
    return f", {rule.confidence:.0%} lower bound " + ("unknown (no per-sample scores)" if bound is None
                                                      else f"{bound:.3f}")


def preset_from_trial(study: optuna.Study, trial: FrozenTrial) -> Preset:
    """A preset holding the trial's config, its metrics next to the baseline's (with the speed-up's interval and
    noise flag; None for trials stored before them), and the study's provenance."""
    record = record_of(trial)
    config = record.config
    if config is None:
        raise NoTrialQualifies(f"trial {trial.number} is the unpruned baseline; there is nothing to deploy")
    baseline = study.user_attrs.get(BASELINE_ATTR) or {}
    goal = study_objective(study)
    metrics = {  # the preset's own metric names, from the trial record's fields
        "accuracy": trial.values[0], "baseline_accuracy": baseline.get("accuracy"),
        "prefill_ms_median": record.prefill_ms, "prefill_ms_iqr": record.prefill_iqr_ms,
        "prefill_repeats": record.prefill_repeats, "baseline_prefill_ms": baseline.get("prefill_ms"),
        "speedup": record.speedup_same_run, "speedup_low": record.speedup_low, "speedup_high": record.speedup_high,
        "latency_noisy": record.latency_noisy, "latency_warning": record.latency_warning,
        "decode_ms_per_token": record.decode_ms_per_token, "decode_ms_iqr": record.decode_iqr_ms,
        "kept_vision_mean": record.kept_vision_mean, "vision_mean": record.vision_mean,
        "keep_ratio_achieved": record.keep_ratio_achieved, "prefill_flops": record.prefill_flops,
        "kv_cache_bytes": record.kv_cache_bytes, "n_samples": record.n_samples,
        "objective": goal.name, "objective_unit": goal.unit, "objective_value": trial.values[1],
        "baseline_objective_value": record.baseline_objective_same_run,
        **{key: getattr(record, key) for key in WORKLOAD_METRICS},
        **{key: getattr(record, key) for key in EVIDENCE_METRICS},
        "confirmed": confirmed(study, trial),  # the confirmation run's numbers (`tuner.search.confirm`), if any
    }
    stored = study.user_attrs.get(PROVENANCE_ATTR) or {}
    versions = dict(stored.get("versions") or {})
    provenance = {key: stored.get(key) for key in ("model_id", "revision", "family", "dtype", "attn_implementation",
                                                    "device")}
    provenance.update({
        "versions": {key: versions.get(key) for key in ("torch", "transformers", "lmms_eval", "optuna",
                                                        "dart_tuner")},
        "tasks": stored.get("tasks"), "study": study.study_name, "trial": trial.number,
        "exported_by": f"dart-tuner {__version__}",
    })
    provenance["workload"] = study_workload(study)  # what `apply` / `eval` compare their own workload with
    return Preset(config=config, metrics=metrics, provenance=provenance, schema_version=SCHEMA_VERSION)
