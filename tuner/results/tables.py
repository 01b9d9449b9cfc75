"""Tables of stored studies (rich): a study's Pareto front, and every study in a storage with its best points.

Every table the CLI prints is a `Sheet`: named columns of plain-text cells, shown compact (the few columns that
matter, short headers, fitting 80 columns), wide (every column) or as JSON. Cells are `Text`, never markup, so a
study named '[/]' prints as itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.table import Table
from rich.text import Text

from tuner.config import PruningConfig, methods_text, options_text, processor_text, schedule_text
from tuner.results.evidence import (
    CONFIRMATION_ATTR,
    confirmed,
    confirmed_text,
    indistinct_from,
    interval_text,
    versus_baseline_text,
)
from tuner.results.record import BASELINE_ATTR, PROVENANCE_ATTR
from tuner.results.trials import (
    accuracy_relative,
    at_default_processor,
    config_of,
    is_baseline,
    pareto_trials,
    record_of,
    skipped_text,
    study_objective,
    study_workload,
    unreadable_trials,
)

NOISY_MARK = "*"
INTERVAL_FOOTNOTE = ("[95%]: accuracy Wilson (0/1 scores) or bootstrap; vs baseline: paired on the same samples, "
                     "exact McNemar p; prefill: distribution-free interval of the median. Not distinguishable: "
                     "intervals overlap on both axes; '-' = unknown or none")
NOISY_FOOTNOTE = f"{NOISY_MARK} noisy latency: speed-up within its timed rounds' spread; re-measure on an idle machine"


@dataclass(frozen=True)
class Column:
    """One column: its JSON key, its wide header, its compact header (None: shown only with --wide)."""

    key: str
    header: str
    short: str | None = None
    justify: str = "right"


@dataclass
class Sheet:
    """A table as data: rows of text cells (one per column) with each row's raw values for JSON, and notes."""

    title: str
    columns: Sequence[Column]
    rows: list[list[str]] = field(default_factory=list)
    values: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add_row(self, cells: Sequence[str], values: dict[str, Any] | None = None) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"{self.title}: {len(cells)} cells for {len(self.columns)} columns")
        self.rows.append([str(cell) for cell in cells])
        self.values.append(values or {})

    def table(self, wide: bool = False) -> Table:
        """The rich table: every column when `wide`, else the compact ones. Cells fold instead of being cut."""
        shown = [i for i, column in enumerate(self.columns) if wide or column.short is not None]
        table = Table(title=Text(self.title), caption=Text("\n".join(self.notes)) if self.notes else None)
        for i in shown:
            column = self.columns[i]
            table.add_column(Text(column.header if wide else column.short), justify=column.justify,
                             overflow="fold")
        for row in self.rows:
            table.add_row(*(Text(row[i]) for i in shown))
        return table

    def as_json(self) -> dict[str, Any]:
        """Every column of every row: {"title", "columns", "rows": [{key: cell, ...raw values}], "notes"}."""
        keys = [column.key for column in self.columns]
        return {"title": self.title, "columns": {column.key: column.header for column in self.columns},
                "rows": [{"text": dict(zip(keys, row)), **values} for row, values in zip(self.rows, self.values)],
                "notes": self.notes}


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def trial_label(trial: FrozenTrial) -> tuple[str, str, str, str]:
    """(method, K, options, amount) of a stored trial; the baseline reads 'unpruned', a schedule '2>4' and
    '0.5>0.5'; options as `options_text` writes them ('-' for none); processor settings follow the method
    ('keep_all image_size=96'), as a downsampled point is another point than the default processor's."""
    config = config_of(trial)
    if config is None:
        return ("unpruned" if is_baseline(trial) else "?", "-", "-", "all")
    method, layer, options, amount = _pruning_label(config)
    processor = processor_text(config)
    return (f"{method} {processor}" if processor else method), layer, options, amount


def _pruning_label(config: PruningConfig) -> tuple[str, str, str, str]:
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
    options, processor = options_text(config), processor_text(config)
    settings = f" [{processor}]" if processor else ""  # the processor's own budget: 'keep_all K=2 [image_size=96]'
    if config.stages:
        return schedule_text(config, exact=False) + (f" {options}" if options else "") + settings
    parts = [config.method, f"K={config.layer}", *([options] if options else [])]
    if config.keep_ratio is not None:
        parts.append(f"keep {config.keep_ratio:.3g}")
    elif config.budget is not None:
        parts.append(f"budget {config.budget}")
    return " ".join(parts) + settings


def speedup(trial: FrozenTrial, study: optuna.Study) -> float:
    """Gain of the study's latency objective over the baseline (prefill speed-up by default; for throughput, times
    more tokens/s) measured in the same trial (robust to machine drift), else over the study's baseline."""
    same_run = record_of(trial).speedup_same_run
    if same_run:
        return float(same_run)
    baseline = study.user_attrs.get(BASELINE_ATTR) or {}
    reference = baseline.get("objective_value", baseline.get("prefill_ms"))
    if not trial.values or reference is None:
        return math.nan
    return study_objective(study).gain(reference, trial.values[1])


def latency_noise(trial: FrozenTrial) -> str | None:
    """Why the trial's speed-up is hidden by its latency spread; None when it is not, or was never judged (trials
    stored before `latency_noisy` existed)."""
    record = record_of(trial)
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
    low, high = record_of(trial).interval("speedup")
    interval = f" (interval {low:.2f}-{high:.2f}x)" if low is not None and high is not None else ""
    return (f"trial {trial.number}'s {study_objective(study).label} speed-up {speedup(trial, study):.2f}x{interval} "
            f"is not distinguishable from the latency spread: {reason}. Re-measure it with more repeats on an idle "
            "machine")


def with_interval(trial: FrozenTrial, name: str, value: float | None, spec: str) -> str:
    """'0.733 [0.61-0.83]': a value and its stored 95% interval (just the value when the interval is unknown)."""
    text = interval_text(trial, name, spec)
    return _fmt(value, spec) + (f" {text}" if text else "")


_OBJECTIVE_COLUMN = Column("prefill_ms", "prefill ms [95%]", "prefill ms [95%]")  # named by the study's objective
PARETO_COLUMNS = (Column("trial", "trial", "#"), Column("method", "method", "method", "left"),
                  Column("layer", "K", "K"), Column("options", "options", justify="left"),
                  Column("keep", "keep", "keep"), Column("kept_vision", "kept vision"),
                  Column("accuracy", "accuracy [95%]", "accuracy [95%]"), Column("relative_accuracy", "rel. acc"),
                  Column("versus_baseline", "vs baseline [95%] p"),
                  _OBJECTIVE_COLUMN,
                  Column("speedup", "speed-up", "speed-up"),
                  Column("indistinct", "not distinguishable from"))


def _workload_text(study: optuna.Study) -> str:
    """'; batch 8, 16 new tokens': the workload a batched objective was measured at ('' for prefill_ms)."""
    shape = study_workload(study)
    if shape.get("objective", "prefill_ms") == "prefill_ms":
        return ""
    return f"; batch {shape.get('batch_size')}, {shape.get('new_tokens')} new tokens"


def pareto_sheet(study: optuna.Study, *, default_processor: bool = False) -> Sheet:
    """The feasible Pareto front, fastest first, with 95% intervals, the paired comparison with the baseline, the
    front's trials each one cannot be told apart from, and the confirmed numbers once the front was confirmed.
    With `default_processor`, the front of the trials at the processor as loaded: the search without that knob."""
    confirmation = study.user_attrs.get(CONFIRMATION_ATTR)
    columns = list(PARETO_COLUMNS)
    if confirmation:
        fresh = ", fresh subset" if confirmation.get("fresh_subset") else ""
        rounds = f"{confirmation.get('repeats')} rounds{fresh}"
        columns.append(Column("confirmed", f"confirmed ({rounds})", "confirmed"))
    goal = study_objective(study)
    columns[PARETO_COLUMNS.index(_OBJECTIVE_COLUMN)] = Column(goal.name, f"{goal.heading()} [95%]",
                                                              f"{goal.heading()} [95%]")
    arrow = "up" if goal.maximize else "down"
    which = "feasible trials at the default processor" if default_processor else "feasible trials"
    sheet = Sheet(f"Pareto front of {study.study_name} ({which}; accuracy up, {goal.label} {arrow}"
                  f"{_workload_text(study)})", columns)
    front = pareto_trials(study, at_default_processor(study.get_trials(deepcopy=False)) if default_processor
                          else None)
    for trial in front:
        method, layer, options, amount = trial_label(trial)
        record = record_of(trial)
        kept, vision = record.kept_vision_mean, record.vision_mean
        indistinct = indistinct_from(trial, front, goal.name)
        cells = [str(trial.number), method, layer, options, amount, f"{_fmt(kept, '.0f')}/{_fmt(vision, '.0f')}",
                 with_interval(trial, "accuracy", trial.values[0], ".3f"), _fmt(accuracy_relative(trial, study), ".1%"),
                 versus_baseline_text(trial), with_interval(trial, goal.name, trial.values[1], ".1f"),
                 speedup_text(trial, study), ", ".join(f"#{n}" for n in indistinct) or "-"]
        config = config_of(trial)
        values = {"number": trial.number, "config": None if config is None else config.to_dict(),
                  "accuracy": trial.values[0], goal.name: trial.values[1], "objective": goal.name,
                  "objective_unit": goal.unit, "speedup": _finite(speedup(trial, study)),
                  "latency_noisy": latency_noise(trial) is not None, "indistinct_from": indistinct}
        if confirmation:
            cells.append(confirmed_text(study, trial))
            values["confirmed"] = confirmed(study, trial)
        sheet.add_row(cells, values)
    sheet.notes.append(INTERVAL_FOOTNOTE)
    skipped = skipped_text(study.study_name, unreadable_trials(study.get_trials(deepcopy=False)))
    if skipped:
        sheet.notes.append(f"warning: {skipped}")
    if any(latency_noise(t) for t in front):
        sheet.notes.append(NOISY_FOOTNOTE)
    return sheet


def pareto_table(study: optuna.Study, *, wide: bool = True) -> Table:
    """`pareto_sheet` as a rich table (every column unless `wide` is False)."""
    return pareto_sheet(study).table(wide)


def _finite(value: float | None) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def study_rows(storage: str | optuna.storages.BaseStorage) -> list[dict]:
    """One summary per study: trial counts by state, baseline, most accurate and fastest feasible points."""
    rows = []
    storage = optuna.storages.get_storage(storage)  # one trial cache: each study's trials are read once
    for frozen in storage.get_all_studies():
        study = optuna.load_study(study_name=frozen.study_name, storage=storage)
        trials = study.get_trials(deepcopy=False)
        counts = {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}
        baseline = study.user_attrs.get(BASELINE_ATTR) or {}
        front = pareto_trials(study, trials) if len(study.directions) == 2 else []
        best_acc = max(front, key=lambda t: t.values[0], default=None)
        goal = study_objective(study)
        fastest = min(front, key=lambda t: goal.cost(t.values[1]), default=None)
        provenance = study.user_attrs.get(PROVENANCE_ATTR) or {}
        rows.append({"study": frozen.study_name, "model": provenance.get("model_id"),
                     "tasks": ",".join(t["name"] for t in provenance.get("tasks", [])),
                     "device": provenance.get("device"), "counts": counts,
                     "baseline_accuracy": baseline.get("accuracy"), "baseline_prefill_ms": baseline.get("prefill_ms"),
                     "most_accurate": best_acc, "fastest": fastest, "pareto_size": len(front), "study_obj": study,
                     "skipped": unreadable_trials(trials)})
    return rows


def _point(trial: FrozenTrial | None, study: optuna.Study) -> str:
    if trial is None:
        return "-"
    method, layer, _options, amount = trial_label(trial)
    goal = study_objective(study)
    return (f"#{trial.number} {method} K={layer} {amount}: {with_interval(trial, 'accuracy', trial.values[0], '.3f')}"
            f" @ {with_interval(trial, goal.name, trial.values[1], '.1f')} {goal.unit} ({speedup_text(trial, study)})")


STUDIES_COLUMNS = (Column("study", "study", "study", "left"), Column("model", "model", "model", "left"),
                   Column("tasks", "tasks", justify="left"), Column("device", "device", justify="left"),
                   Column("complete", "complete", "done"), Column("failed", "failed", "failed"),
                   Column("running", "running"), Column("baseline", "baseline", "baseline", "left"),
                   Column("most_accurate", "most accurate (Pareto)", "most accurate", "left"),
                   Column("fastest", "fastest (Pareto)", "fastest", "left"))


def studies_sheet(storage: str | optuna.storages.BaseStorage) -> Sheet:
    """Every study in the storage with its trial counts, baseline and best points."""
    sheet = Sheet("Studies", STUDIES_COLUMNS)
    rows = study_rows(storage)
    for row in rows:
        counts = row["counts"]
        baseline = (f"{row['baseline_accuracy']:.3f} @ {row['baseline_prefill_ms']:.1f} ms"
                    if row["baseline_accuracy"] is not None else "-")
        best, fastest = row["most_accurate"], row["fastest"]
        sheet.add_row([row["study"], str(row["model"]), row["tasks"], str(row["device"]), str(counts["complete"]),
                       str(counts["fail"]), str(counts["running"] + counts["waiting"]), baseline,
                       _point(best, row["study_obj"]), _point(fastest, row["study_obj"])],
                      {"counts": counts, "baseline_accuracy": row["baseline_accuracy"],
                       "baseline_prefill_ms": row["baseline_prefill_ms"], "pareto_size": row["pareto_size"],
                       "most_accurate_trial": None if best is None else best.number,
                       "fastest_trial": None if fastest is None else fastest.number})
    shown = [t for row in rows for t in (row["most_accurate"], row["fastest"]) if t is not None]
    if any(latency_noise(t) for t in shown):
        sheet.notes.append(NOISY_FOOTNOTE)
    sheet.notes.extend(f"warning: {skipped_text(row['study'], row['skipped'])}" for row in rows if row["skipped"])
    return sheet


def studies_table(storage: str | optuna.storages.BaseStorage, *, wide: bool = True) -> Table:
    """`studies_sheet` as a rich table (every column unless `wide` is False)."""
    return studies_sheet(storage).table(wide)
