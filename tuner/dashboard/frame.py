"""The trial frame: one row per trial with its hover text, method colours, and tables drawn from it."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from tuner.config import methods_text, schedule_text
from tuner.config.schema import legacy_param
from tuner.results import accuracy_relative, config_of, is_baseline
from tuner.results.evidence import confirmed, confirmed_text, indistinct_from, interval_text, versus_baseline_text
from tuner.results.tables import describe_trial, latency_noise, speedup
from tuner.results.trials import StudySnapshot, pareto_front, readable_trials, record_of, study_objective

METHOD_COLORS = {"dart": "#1f77b4", "random": "#ff7f0e", "pooling": "#2ca02c", "avgpool": "#9467bd",
                 "fastv": "#d62728", "keep_all": "#8c564b", "window_fastv": "#ff9896",
                 "sparsevlm": "#c5b0d5"}
_EXTRA_COLORS = ("#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def _num(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan


def _config_text(trial: FrozenTrial) -> str:
    config = config_of(trial)
    if config is None:
        return "unpruned baseline (no pruning)" if is_baseline(trial) else "no configuration stored"
    data = config.to_dict()
    options = ", ".join(f"{key}={value}" for key, value in data.pop("options").items() if value is not None)
    text = ", ".join(f"{key}={value}" for key, value in data.items() if value not in (None, {}, "") and key != "stages")
    return text + (f", options: {options}" if options else "") + (
        f", schedule {schedule_text(config, exact=False)}" if config.stages else "")


def workload_text(row: Mapping[str, Any]) -> str:
    """The four objectives of a trial side by side ('' for a trial measured before workloads)."""
    if math.isnan(row["ttft_ms"]):
        return ""
    source = "measured" if row["memory_source"] == "cuda_max_allocated" else "analytic KV cache"
    memory = "" if math.isnan(row["memory_mb"]) else f", memory {row['memory_mb']:.3g} MB ({source})"
    if not math.isnan(row["max_concurrent_requests"]):
        memory += f", {row['max_concurrent_requests']:.0f} requests fit in the memory budget"
    return (f"at batch {row['workload_batch_size']:.0f}, {row['workload_new_tokens']:.0f} new tokens: prefill "
            f"{row['prefill_ms']:.1f} ms (1 request), time to first token {row['ttft_ms']:.1f} ms, end-to-end "
            f"{row['e2e_ms']:.1f} ms, throughput {row['throughput']:.1f} tokens/s, decode "
            f"{row['decode_batch_ms_per_token']:.1f} ms/token{memory}")


def _violations(trial: FrozenTrial) -> str:
    return ", ".join(f"{name} by {value:.3g}" for name, value in trial.constraints.items() if value > 0)


def _hover(row: Mapping[str, Any], trial: FrozenTrial) -> str:
    lines = [f"<b>trial {row['number']}</b>: {row['label']}", f"config: {_config_text(trial)}"]
    if row["state"] == "complete":
        relative = f" ({row['relative_accuracy']:.1%} of baseline)" if not math.isnan(row["relative_accuracy"]) else ""
        accuracy_ci = interval_text(trial, "accuracy", ".3f")  # none for a stopped trial (`evidence.interval`)
        lines.append(f"accuracy {row['accuracy']:.3f}{' 95% ' + accuracy_ci if accuracy_ci else ''}{relative}")
        if row["role"] != "baseline":
            lines.append(f"vs baseline (paired, 95%): {versus_baseline_text(trial)}")
        prefill_ci = interval_text(trial, "prefill_ms", ".1f")
        lines.append(f"prefill {row['prefill_ms']:.1f} ms{' 95% ' + prefill_ci if prefill_ci else ''} "
                     f"(IQR {row['prefill_iqr_ms']:.1f}), "
                     f"speed-up ({record_of(trial).objective or 'prefill_ms'}) {row['speedup']:.2f}x, decode "
                     f"{row['decode_ms_per_token']:.1f} ms/token")
        workload = workload_text(row)
        if workload:
            lines.append(workload)
        lines.append(f"kept vision tokens {row['kept_vision_mean']:.1f} of {row['vision_mean']:.0f} "
                     f"(min {row['kept_vision_min']:.0f}, max {row['kept_vision_max']:.0f}; "
                     f"ratio {row['keep_ratio_achieved']:.3f})")
        lines.append(f"prefill GFLOPs {row['prefill_gflops']:.3g} ({row['flops_ratio']:.0%} of baseline), "
                     f"KV cache {row['kv_cache_mb']:.3g} MB")
        record = record_of(trial)
        if record.stopped_early:
            lines.append(f"stopped early: {record.stop_reason or ''} (accuracy shown: that bound)")
        noise = latency_noise(trial)
        if noise:
            lines.append(f"noisy latency: {noise}")
        lines.append("infeasible: " + row["violations"] if not row["feasible"] else
                     ("on the Pareto front" if row["pareto"] else "dominated"))
        if not math.isnan(row["confirmed_prefill_ms"]):
            lines.append(f"confirmed (re-measured after the search): {row['confirmed_text']}")
        if row["indistinct"]:
            lines.append(f"not distinguishable from trial {row['indistinct']} (95% intervals overlap on both axes)")
    elif row["failure"]:
        lines.append(f"{row['state']}: {row['failure']}")
    return "<br>".join(lines)


EVIDENCE_COLUMNS = ("accuracy_low", "accuracy_high", "prefill_ms_low", "prefill_ms_high", "accuracy_diff",
                    "accuracy_diff_low", "accuracy_diff_high", "mcnemar_p", "ttft_ms_low", "ttft_ms_high",
                    "e2e_ms_low", "e2e_ms_high", "throughput_low",
                    "throughput_high")  # TrialRecord fields, shown as they are
# The workload's numbers (`tuner.measure.workload`): TrialRecord fields, NaN for trials from before workloads.
WORKLOAD_COLUMNS = ("ttft_ms", "e2e_ms", "throughput", "decode_batch_ms_per_token", "workload_batch_size",
                    "workload_new_tokens", "max_concurrent_requests")
TRIAL_COLUMNS = ("number", "state", "role", "method", "label", "layer", "keep_ratio", "budget", "accuracy",
                 "relative_accuracy", "prefill_ms", "prefill_iqr_ms", "speedup",
                 "decode_ms_per_token", "kept_vision_mean", "kept_vision_min", "kept_vision_max", "vision_mean",
                 "keep_ratio_achieved", "prefill_gflops", "flops_ratio", "kv_cache_mb", "n_samples", "feasible",
                 "violations", "pareto", "failure", "accuracy_low", "accuracy_high", "prefill_ms_low",
                 "prefill_ms_high", "accuracy_diff", "accuracy_diff_low", "accuracy_diff_high", "mcnemar_p",
                 "indistinct", "confirmed_prefill_ms", "confirmed_speedup", "confirmed_accuracy", "confirmed_text",
                 "objective", *WORKLOAD_COLUMNS, "memory_mb", "memory_source", "ttft_ms_low", "ttft_ms_high",
                 "e2e_ms_low", "e2e_ms_high", "throughput_low", "throughput_high", "hover")


def trial_frame(study: optuna.Study, trials: Sequence[FrozenTrial] | None = None) -> pd.DataFrame:
    """One row per trial: configuration, objectives, kept tokens, cost, feasibility and Pareto membership; then
    one column per method option the study searched ('<method>.<option>', `option_columns`), set in that
    method's trials only. Trials whose configuration this install cannot read are left out (the app names them,
    `tuner.results.trials.unreadable_trials`)."""
    trials = readable_trials(study.get_trials(deepcopy=False) if trials is None else trials)
    study = StudySnapshot(study)  # its user attributes once, not once per trial
    options = option_columns(trials)
    complete = {t.number for t in trials if t.state == TrialState.COMPLETE and t.values is not None}
    feasible = {t.number for t in trials if t.number in complete and all(v <= 0 for v in t.constraints.values())}
    goal = study_objective(study)
    front = pareto_front(trials, goal)  # the feasible Pareto set, as Optuna's best_trials
    pareto = {t.number for t in front}
    rows = []
    for trial in trials:
        record = record_of(trial)
        config = record.config
        done = trial.number in complete
        row = {
            "number": trial.number, "state": trial.state.name.lower(), "role": record.role or "",
            "method": methods_text(config) if config else ("unpruned" if is_baseline(trial) else "?"),
            "label": describe_trial(trial),
            "layer": config.layer if config else math.nan,
            "keep_ratio": _num(config.keep_ratio) if config else math.nan,
            "budget": _num(config.budget) if config else math.nan,
            "accuracy": trial.values[0] if done else math.nan,
            "relative_accuracy": accuracy_relative(trial, study) if done else math.nan,
            "objective": trial.values[1] if done else math.nan,  # the study's latency objective (`goal`)
            "prefill_ms": _num(record.prefill_ms) if record.prefill_ms is not None else (
                trial.values[1] if done else math.nan),  # trials before workloads: the objective was prefill_ms
            "prefill_iqr_ms": _num(record.prefill_iqr_ms),
            "speedup": speedup(trial, study) if done else math.nan,
            "decode_ms_per_token": _num(record.decode_ms_per_token),
            **{key: _num(getattr(record, key)) for key in WORKLOAD_COLUMNS},
            "memory_mb": _num(record.memory_bytes) / 1e6, "memory_source": str(record.memory_source or ""),
            **{key: _num(getattr(record, key)) for key in ("kept_vision_mean", "kept_vision_min", "kept_vision_max",
                                                           "vision_mean", "keep_ratio_achieved")},
            "prefill_gflops": _num(record.prefill_flops) / 1e9,
            "flops_ratio": _num(record.flops_ratio),
            "kv_cache_mb": _num(record.kv_cache_bytes) / 1e6,
            "n_samples": _num(record.n_samples),
            "feasible": trial.number in feasible, "violations": _violations(trial) if done else "",
            "pareto": trial.number in pareto, "failure": str(record.failure or ""),
            **{key: _num(getattr(record, key)) for key in EVIDENCE_COLUMNS},
            "indistinct": ", ".join(str(n) for n in indistinct_from(trial, front, goal.name))
            if trial.number in pareto else "",
            **_confirmed_columns(study, trial),
            **{column: _option_value(config, column) for column in options},
        }
        row["hover"] = _hover(row, trial)
        rows.append(row)
    return pd.DataFrame(rows, columns=[*TRIAL_COLUMNS, *options])


def option_columns(trials: Sequence[FrozenTrial]) -> list[str]:
    """The method options the trials' sampler drew, as '<method>.<option>' (their Optuna parameter names; a
    schema-1 study's DART pivot parameters under today's names), sorted."""
    return sorted({legacy_param(name) for trial in trials for name in trial.params if "." in legacy_param(name)})


def _option_value(config: Any, column: str) -> Any:
    """Option `column` ('<method>.<option>') of the first stage of the configuration that runs that method; NaN
    when none does."""
    method, _, name = column.partition(".")
    stage = next((s for s in config.stage_configs() if s.method == method), None) if config is not None else None
    value = stage.options.get(name) if stage is not None else None
    return math.nan if value is None else value


def _confirmed_columns(study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
    """The confirmation run's prefill, speed-up and fresh-subset accuracy of a trial (NaN when none)."""
    numbers = confirmed(study, trial) or {}
    return {"confirmed_prefill_ms": _num(numbers.get("prefill_ms")), "confirmed_speedup": _num(numbers.get("speedup")),
            "confirmed_accuracy": _num(numbers.get("accuracy")),
            "confirmed_text": confirmed_text(study, trial) if numbers else ""}


def method_color(method: str) -> str:
    """A fixed colour per method, so every plot and study agrees."""
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    return _EXTRA_COLORS[sum(map(ord, method)) % len(_EXTRA_COLORS)]


def candidate_numbers(frame: pd.DataFrame) -> list[int]:
    """Trial numbers a preset can be made from (complete and pruned), fastest first."""
    rows = frame[(frame["state"] == "complete") & (frame["role"] != "baseline") & (frame["method"] != "?")]
    return [int(n) for n in rows.sort_values(["prefill_ms", "number"])["number"]]


def table_of(frame: pd.DataFrame, numbers: Sequence[int]) -> pd.DataFrame:
    """The given trials in the given order, with the columns a deployer compares."""
    by_number = frame.set_index("number")
    rows = by_number.loc[list(numbers)].reset_index() if len(numbers) else frame.iloc[0:0]
    table = pd.DataFrame({
        "trial": rows["number"], "configuration": rows["label"],
        "accuracy": rows["accuracy"].round(4), "% of baseline": (100 * rows["relative_accuracy"]).round(1),
        "prefill ms": rows["prefill_ms"].round(2), "speed-up": rows["speedup"].round(2),
        "TTFT ms (batch)": rows["ttft_ms"].round(2), "e2e ms (batch)": rows["e2e_ms"].round(2),
        "throughput tokens/s": rows["throughput"].round(1), "memory MB": rows["memory_mb"].round(2),
        "max requests (budget)": rows["max_concurrent_requests"],
        "accuracy 95% low": rows["accuracy_low"].round(3), "accuracy 95% high": rows["accuracy_high"].round(3),
        "kept vision tokens": rows["kept_vision_mean"].round(1), "GFLOPs": rows["prefill_gflops"].round(4),
        "feasible": rows["feasible"], "Pareto": rows["pareto"],
        "confirmed prefill ms": rows["confirmed_prefill_ms"].round(2),
        "confirmed speed-up": rows["confirmed_speedup"].round(2),
        "confirmed accuracy (fresh subset)": rows["confirmed_accuracy"].round(4)})
    return table.reset_index(drop=True)
