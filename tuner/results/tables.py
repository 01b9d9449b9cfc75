"""Tables of stored studies (rich): a study's Pareto front, and every study in a storage with its best points."""

from __future__ import annotations

import math

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.table import Table

from tuner.config import methods_text, options_text, schedule_text
from tuner.results.evidence import (
    CONFIRMATION_ATTR,
    confirmed_text,
    indistinct_from,
    interval_text,
    versus_baseline_text,
)
from tuner.results.record import BASELINE_ATTR, PROVENANCE_ATTR, TrialRecord
from tuner.results.trials import accuracy_relative, config_of, is_baseline, pareto_trials

NOISY_MARK = "*"
INTERVAL_FOOTNOTE = ("[95%]: accuracy Wilson (0/1 scores) or bootstrap; vs baseline: paired on the same samples, "
                     "exact McNemar p; prefill: distribution-free interval of the median. Not distinguishable: "
                     "intervals overlap on both axes; '-' = unknown or none")
NOISY_FOOTNOTE = f"{NOISY_MARK} noisy latency: speed-up within its timed rounds' spread; re-measure on an idle machine"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def trial_label(trial: FrozenTrial) -> tuple[str, str, str, str]:
    """(method, K, options, amount) of a stored trial; the baseline reads 'unpruned', a schedule '2>4' and
    '0.5>0.5'; options as `options_text` writes them ('-' for none)."""
    config = config_of(trial)
    if config is None:
        return ("unpruned" if is_baseline(trial) else "?", "-", "-", "all")
    options = options_text(config) or "-"
    amount = f"{config.keep_ratio:.3g}" if config.keep_ratio is not None else (
        f"{config.budget} tok" if config.budget is not None else "all")
    if config.stages:
        stages = config.stage_configs()
        amount = ">".join(f"{s.keep_ratio:.3g}" if s.keep_ratio is not None else f"{s.budget}t" if s.budget else "all"
                          for s in stages)
        return methods_text(config), ">".join(str(layer) for layer in config.layers), options, amount
    return config.method, str(config.layer), options, amount


def describe_trial(trial: FrozenTrial) -> str:
    """Method, K, options and amount in a few words ('unpruned baseline' for the baseline; a schedule reads
    'fastv@2:0.5>4:0.5')."""
    config = config_of(trial)
    if config is None:
        return "unpruned baseline" if is_baseline(trial) else "no configuration"
    options = options_text(config)
    if config.stages:
        return schedule_text(config, exact=False) + (f" {options}" if options else "")
    parts = [config.method, f"K={config.layer}", *([options] if options else [])]
    if config.keep_ratio is not None:
        parts.append(f"keep {config.keep_ratio:.3g}")
    elif config.budget is not None:
        parts.append(f"budget {config.budget}")
    return " ".join(parts)


def speedup(trial: FrozenTrial, study: optuna.Study) -> float:
    """Prefill speed-up over the baseline measured in the same trial (robust to machine drift), else the
    study's baseline."""
    same_run = TrialRecord.from_trial(trial).speedup_same_run
    if same_run:
        return float(same_run)
    baseline = study.user_attrs.get(BASELINE_ATTR) or {}
    return baseline.get("prefill_ms", math.nan) / trial.values[1] if trial.values else math.nan


def latency_noise(trial: FrozenTrial) -> str | None:
    """Why the trial's speed-up is hidden by its latency spread; None when it is not, or was never judged (trials
    stored before `latency_noisy` existed)."""
    record = TrialRecord.from_trial(trial)
    if record.latency_noisy is not True:
        return None
    return str(record.latency_warning or "its rounds spread too widely")


def speedup_text(trial: FrozenTrial, study: optuna.Study) -> str:
    """The speed-up as tables print it ('1.27x'), marked with NOISY_MARK when the spread hides it."""
    return _fmt(speedup(trial, study), ".2f") + "x" + (NOISY_MARK if latency_noise(trial) else "")


def noise_warning(trial: FrozenTrial, study: optuna.Study) -> str | None:
    """One sentence for whoever deploys a noisy trial: its speed-up, interval and why it cannot be told apart."""
    reason = latency_noise(trial)
    if reason is None:
        return None
    low, high = TrialRecord.from_trial(trial).interval("speedup")
    interval = f" (interval {low:.2f}-{high:.2f}x)" if low is not None and high is not None else ""
    return (f"trial {trial.number}'s prefill speed-up {speedup(trial, study):.2f}x{interval} is not distinguishable "
            f"from the latency spread: {reason}. Re-measure it with more repeats on an idle machine")


def with_interval(trial: FrozenTrial, name: str, value: float | None, spec: str) -> str:
    """'0.733 [0.61-0.83]': a value and its stored 95% interval (just the value when the interval is unknown)."""
    text = interval_text(trial, name, spec)
    return _fmt(value, spec) + (f" {text}" if text else "")


def pareto_table(study: optuna.Study) -> Table:
    """The feasible Pareto front, fastest first, with 95% intervals, the paired comparison with the baseline and
    the front's trials each one cannot be told apart from."""
    table = Table(title=f"Pareto front of {study.study_name} (feasible trials; accuracy up, prefill down)")
    confirmation = study.user_attrs.get(CONFIRMATION_ATTR)
    columns = ["trial", "method", "K", "options", "keep", "kept vision", "accuracy [95%]", "rel. acc",
               "vs baseline [95%] p", "prefill ms [95%]", "speed-up", "not distinguishable from"]
    if confirmation:
        columns.append(f"confirmed ({confirmation.get('repeats')} rounds"
                       + (", fresh subset)" if confirmation.get("fresh_subset") else ")"))
    for column in columns:
        table.add_column(column, justify="left" if column in ("method",) else "right")
    front = pareto_trials(study)
    for trial in front:
        method, layer, options, amount = trial_label(trial)
        record = TrialRecord.from_trial(trial)
        kept, vision = record.kept_vision_mean, record.vision_mean
        indistinct = ", ".join(f"#{n}" for n in indistinct_from(trial, front)) or "-"
        cells = [str(trial.number), method, layer, options, amount, f"{_fmt(kept, '.0f')}/{_fmt(vision, '.0f')}",
                 with_interval(trial, "accuracy", trial.values[0], ".3f"), _fmt(accuracy_relative(trial, study), ".1%"),
                 versus_baseline_text(trial), with_interval(trial, "prefill_ms", trial.values[1], ".1f"),
                 speedup_text(trial, study), indistinct]
        table.add_row(*cells, *([confirmed_text(study, trial)] if confirmation else []))
    notes = [INTERVAL_FOOTNOTE]
    if any(latency_noise(t) for t in front):
        notes.append(NOISY_FOOTNOTE)
    table.caption = "\n".join(notes)
    return table


def study_rows(storage: str | optuna.storages.BaseStorage) -> list[dict]:
    """One summary per study: trial counts by state, baseline, most accurate and fastest feasible points."""
    rows = []
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        trials = study.get_trials(deepcopy=False)
        counts = {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}
        baseline = study.user_attrs.get(BASELINE_ATTR) or {}
        front = pareto_trials(study) if len(study.directions) == 2 else []
        best_acc = max(front, key=lambda t: t.values[0], default=None)
        fastest = min(front, key=lambda t: t.values[1], default=None)
        provenance = study.user_attrs.get(PROVENANCE_ATTR) or {}
        rows.append({"study": summary.study_name, "model": provenance.get("model_id"),
                     "tasks": ",".join(t["name"] for t in provenance.get("tasks", [])),
                     "device": provenance.get("device"), "counts": counts,
                     "baseline_accuracy": baseline.get("accuracy"), "baseline_prefill_ms": baseline.get("prefill_ms"),
                     "most_accurate": best_acc, "fastest": fastest, "pareto_size": len(front), "study_obj": study})
    return rows


def _point(trial: FrozenTrial | None, study: optuna.Study) -> str:
    if trial is None:
        return "-"
    method, layer, _options, amount = trial_label(trial)
    return (f"#{trial.number} {method} K={layer} {amount}: {with_interval(trial, 'accuracy', trial.values[0], '.3f')}"
            f" @ {with_interval(trial, 'prefill_ms', trial.values[1], '.1f')} ms ({speedup_text(trial, study)})")


def studies_table(storage: str | optuna.storages.BaseStorage) -> Table:
    """Every study in the storage with its trial counts, baseline and best points."""
    table = Table(title="Studies")
    for column in ("study", "model", "tasks", "device", "complete", "failed", "running", "baseline",
                   "most accurate (Pareto)", "fastest (Pareto)"):
        table.add_column(column)
    rows = study_rows(storage)
    for row in rows:
        counts = row["counts"]
        baseline = (f"{row['baseline_accuracy']:.3f} @ {row['baseline_prefill_ms']:.1f} ms"
                    if row["baseline_accuracy"] is not None else "-")
        table.add_row(row["study"], str(row["model"]), row["tasks"], str(row["device"]), str(counts["complete"]),
                      str(counts["fail"]), str(counts["running"] + counts["waiting"]), baseline,
                      _point(row["most_accurate"], row["study_obj"]), _point(row["fastest"], row["study_obj"]))
    shown = [t for row in rows for t in (row["most_accurate"], row["fastest"]) if t is not None]
    table.caption = NOISY_FOOTNOTE if any(latency_noise(t) for t in shown) else None
    return table
