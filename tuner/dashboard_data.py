"""What the dashboard shows, computed from a stored study; `dashboard/app.py` only lays it out.

Studies are read the way optuna-dashboard reads them: through Optuna's public API over any SQLAlchemy storage,
never written to. Recommendations go through `tuner.export` (`Rule`, `choose_trial`, `qualifying_trials`) and
downloads through `preset_from_trial` + `preset_to_yaml`, so the dashboard and `dart-tuner export` agree on both
the chosen trial and the file's bytes.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
import pandas as pd
import plotly.graph_objects as go
from optuna.trial import FrozenTrial, TrialState
from plotly.subplots import make_subplots

from tuner.export import NoTrialQualifies, Rule, accuracy_floor, choose_trial, preset_from_trial, qualifying_trials
from tuner.presets import preset_to_yaml
from tuner.reporting import describe_trial, latency_noise, noise_warning, speedup
from tuner.results import StudyNotFound, accuracy_relative, config_of, is_baseline, open_study
from tuner.storage import DEFAULT_STORAGE, StorageError

STORAGE_ENV = "DART_TUNER_STORAGE"
METHOD_COLORS = {"dart": "#1f77b4", "random": "#ff7f0e", "pooling": "#2ca02c", "avgpool": "#9467bd",
                 "fastv": "#d62728", "keep_all": "#8c564b"}
_EXTRA_COLORS = ("#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
STUDY_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")
X_AXES = {"prefill_ms": "measured prefill latency (ms, median)",
          "prefill_gflops": "analytic prefill GFLOPs (text model)",
          "kept_vision_mean": "kept vision tokens (mean per sample)"}
PARAMETERS = ("keep_ratio", "budget", "layer", "n_image_pivots", "n_text_pivots")
PARAMETER_TITLES = {"keep_ratio": "keep ratio", "budget": "token budget", "layer": "K (pruning layer)",
                    "n_image_pivots": "image pivots", "n_text_pivots": "text pivots"}


# -- storage and studies ----------------------------------------------------------------------------------------


def storage_from_argv(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> str:
    """The storage URL from `--storage URL` in argv (after streamlit's `--`), else $DART_TUNER_STORAGE, else the
    default."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--storage")
    known, _ = parser.parse_known_args(list(argv))
    environ = os.environ if environ is None else environ
    return known.storage or environ.get(STORAGE_ENV) or DEFAULT_STORAGE


@dataclass(frozen=True)
class StudyChoice:
    """One study of a storage, as the picker lists it."""

    name: str
    n_trials: int
    label: str
    dart_tuner: bool  # two objectives (accuracy up, latency down): a study `dart-tuner tune` made
    model_id: str | None = None


def list_studies(storage: optuna.storages.BaseStorage) -> list[StudyChoice]:
    """Every study in the storage with a label (model, tasks, device, trial count), by name."""
    choices = []
    for study in storage.get_all_studies():
        provenance = study.user_attrs.get("provenance") or {}
        tasks = ",".join(t.get("name", "?") for t in provenance.get("tasks") or [])
        details = [str(v) for v in (provenance.get("model_id"), tasks, provenance.get("device")) if v]
        ours = [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
        n_trials = storage.get_n_trials(storage.get_study_id_from_name(study.study_name))
        label = f"{study.study_name} ({', '.join(details + [f'{n_trials} trials'])})"
        choices.append(StudyChoice(study.study_name, n_trials, label, ours, provenance.get("model_id")))
    return sorted(choices, key=lambda c: c.name)


def load_study(storage: optuna.storages.BaseStorage, name: str) -> optuna.Study:
    """The named study; StorageError naming the studies there when it does not exist or is not dart-tuner's."""
    try:
        study = open_study(storage, name)
    except StudyNotFound as error:
        raise StorageError(str(error)) from None
    if [d.name for d in study.directions] != ["MAXIMIZE", "MINIMIZE"]:
        raise StorageError(f"study {name!r} has directions {[d.name.lower() for d in study.directions]}, not "
                             "(maximize accuracy, minimize prefill latency): it was not made by dart-tuner tune")
    return study


def state_counts(trials: Sequence[FrozenTrial]) -> dict[str, int]:
    """Trials by state (complete, running, waiting, fail, pruned)."""
    return {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}


def is_running(trials: Sequence[FrozenTrial]) -> bool:
    """Whether some trial is running or queued (the study is still being tuned)."""
    return any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)


# -- provenance -------------------------------------------------------------------------------------------------


def _task_line(task: Mapping[str, Any]) -> str:
    parts = [str(task.get("name", "?"))]
    if task.get("size") is not None:
        parts.append(f"{task['size']} of {task.get('total', '?')} docs")
    if task.get("seed") is not None:
        parts.append(f"seed {task['seed']}")
    if task.get("stratified_by"):
        parts.append(f"stratified by {task['stratified_by']}")
    if task.get("hash"):
        parts.append(f"subset hash {str(task['hash'])[:12]}")
    if task.get("primary_metric"):
        parts.append(f"metric {task['primary_metric']}")
    return ", ".join(parts)


def constraints_text(constraints: Mapping[str, Any] | None) -> str:
    """The study's feasibility constraints in words ('none' when it has none)."""
    constraints = constraints or {}
    parts = []
    if constraints.get("min_accuracy") is not None:
        parts.append(f"accuracy >= {constraints['min_accuracy']:g}")
    if constraints.get("min_relative_accuracy") is not None:
        parts.append(f"accuracy >= {constraints['min_relative_accuracy']:.0%} of the baseline")
    if constraints.get("max_prefill_ms") is not None:
        parts.append(f"prefill <= {constraints['max_prefill_ms']:g} ms")
    return " and ".join(parts) or "none"


def provenance_rows(study: optuna.Study, trials: Sequence[FrozenTrial] | None = None) -> list[tuple[str, str]]:
    """(field, value) lines saying what the study's numbers depend on: model, task subset, hardware, attention,
    latency protocol, versions, baseline, constraints and trial counts."""
    attrs = study.user_attrs
    provenance = attrs.get("provenance") or {}
    versions = provenance.get("versions") or {}
    trials = study.get_trials(deepcopy=False) if trials is None else trials
    model = str(provenance.get("model_id", "unknown"))
    if provenance.get("revision"):
        model += f" @ {provenance['revision']}"
    rows = [("model", model), ("family", str(provenance.get("family", "?"))),
            ("device", str(provenance.get("device", "?"))),
            ("attention", str(provenance.get("attn_implementation", "?"))),
            ("dtype", str(provenance.get("dtype", "?")))]
    rows += [("task", _task_line(t)) for t in provenance.get("tasks") or []]
    latency = provenance.get("latency") or {}
    if latency:
        rows.append(("latency protocol", f"{latency.get('new_tokens')} new tokens, median of {latency.get('repeats')} "
                                         f"interleaved repeats after {latency.get('warmup')} warm-up"))
    names = {"torch": "torch", "transformers": "transformers", "lmms_eval": "lmms-eval", "optuna": "optuna",
             "dart_tuner": "dart-tuner", "python": "Python", "cuda": "CUDA"}
    version_text = ", ".join(f"{label} {versions[key]}" for key, label in names.items() if versions.get(key))
    if version_text:
        rows.append(("versions", version_text))
    baseline = attrs.get("baseline") or {}
    if baseline:
        rows.append(("baseline (unpruned)", f"accuracy {baseline['accuracy']:.3f}, prefill "
                                            f"{baseline['prefill_ms']:.1f} ms (trial {baseline.get('trial')})"))
    else:
        rows.append(("baseline (unpruned)", "not measured yet"))
    rows.append(("constraints", constraints_text(attrs.get("constraints"))))
    if attrs.get("space"):
        rows.append(("search space", str(attrs["space"])))
    counts = state_counts(trials)
    rows.append(("trials", ", ".join(f"{n} {state}" for state, n in counts.items() if n) or "none yet"))
    return rows


# -- one row per trial ------------------------------------------------------------------------------------------


def _num(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan


def _config_text(trial: FrozenTrial) -> str:
    data = trial.user_attrs.get("config")
    if not data:
        return "unpruned baseline (no pruning)" if is_baseline(trial) else "no configuration stored"
    return ", ".join(f"{key}={value}" for key, value in data.items() if value not in (None, {}, ""))


def _violations(trial: FrozenTrial) -> str:
    return ", ".join(f"{name} by {value:.3g}" for name, value in trial.constraints.items() if value > 0)


def _hover(row: Mapping[str, Any], trial: FrozenTrial) -> str:
    lines = [f"<b>trial {row['number']}</b>: {row['label']}", f"config: {_config_text(trial)}"]
    if row["state"] == "complete":
        relative = f" ({row['relative_accuracy']:.1%} of baseline)" if not math.isnan(row["relative_accuracy"]) else ""
        lines.append(f"accuracy {row['accuracy']:.3f}{relative}")
        lines.append(f"prefill {row['prefill_ms']:.1f} ms (IQR {row['prefill_iqr_ms']:.1f}), "
                     f"speed-up {row['speedup']:.2f}x, decode {row['decode_ms_per_token']:.1f} ms/token")
        lines.append(f"kept vision tokens {row['kept_vision_mean']:.1f} of {row['vision_mean']:.0f} "
                     f"(min {row['kept_vision_min']:.0f}, max {row['kept_vision_max']:.0f}; "
                     f"ratio {row['keep_ratio_achieved']:.3f})")
        lines.append(f"prefill GFLOPs {row['prefill_gflops']:.3g} ({row['flops_ratio']:.0%} of baseline), "
                     f"KV cache {row['kv_cache_mb']:.3g} MB")
        noise = latency_noise(trial)
        if noise:
            lines.append(f"noisy latency: {noise}")
        lines.append("infeasible: " + row["violations"] if not row["feasible"] else
                     ("on the Pareto front" if row["pareto"] else "dominated"))
    elif row["failure"]:
        lines.append(f"{row['state']}: {row['failure']}")
    return "<br>".join(lines)


TRIAL_COLUMNS = ("number", "state", "role", "method", "label", "layer", "keep_ratio", "budget", "n_image_pivots",
                 "n_text_pivots", "accuracy", "relative_accuracy", "prefill_ms", "prefill_iqr_ms", "speedup",
                 "decode_ms_per_token", "kept_vision_mean", "kept_vision_min", "kept_vision_max", "vision_mean",
                 "keep_ratio_achieved", "prefill_gflops", "flops_ratio", "kv_cache_mb", "n_samples", "feasible",
                 "violations", "pareto", "failure", "hover")


def trial_frame(study: optuna.Study, trials: Sequence[FrozenTrial] | None = None) -> pd.DataFrame:
    """One row per trial: configuration, objectives, kept tokens, cost, feasibility and Pareto membership."""
    trials = study.get_trials(deepcopy=False) if trials is None else trials
    complete = {t.number for t in trials if t.state == TrialState.COMPLETE and t.values is not None}
    feasible = {t.number for t in trials if t.number in complete and all(v <= 0 for v in t.constraints.values())}
    pareto = {t.number for t in study.best_trials} if feasible else set()  # Optuna's feasible Pareto set
    rows = []
    for trial in trials:
        attrs = trial.user_attrs
        config = config_of(trial)
        done = trial.number in complete
        row = {
            "number": trial.number, "state": trial.state.name.lower(), "role": attrs.get("role", ""),
            "method": config.method if config else ("unpruned" if is_baseline(trial) else "?"),
            "label": describe_trial(trial),
            "layer": config.layer if config else math.nan,
            "keep_ratio": _num(config.keep_ratio) if config else math.nan,
            "budget": _num(config.budget) if config else math.nan,
            "n_image_pivots": config.n_image_pivots if config and config.method == "dart" else math.nan,
            "n_text_pivots": config.n_text_pivots if config and config.method == "dart" else math.nan,
            "accuracy": trial.values[0] if done else math.nan,
            "relative_accuracy": accuracy_relative(trial, study) if done else math.nan,
            "prefill_ms": trial.values[1] if done else math.nan,
            "prefill_iqr_ms": _num(attrs.get("prefill_iqr_ms")),
            "speedup": speedup(trial, study) if done else math.nan,
            "decode_ms_per_token": _num(attrs.get("decode_ms_per_token")),
            "kept_vision_mean": _num(attrs.get("kept_vision_mean")),
            "kept_vision_min": _num(attrs.get("kept_vision_min")),
            "kept_vision_max": _num(attrs.get("kept_vision_max")),
            "vision_mean": _num(attrs.get("vision_mean")),
            "keep_ratio_achieved": _num(attrs.get("keep_ratio_achieved")),
            "prefill_gflops": _num(attrs.get("prefill_flops")) / 1e9,
            "flops_ratio": _num(attrs.get("flops_ratio")),
            "kv_cache_mb": _num(attrs.get("kv_cache_bytes")) / 1e6,
            "n_samples": _num(attrs.get("n_samples")),
            "feasible": trial.number in feasible, "violations": _violations(trial) if done else "",
            "pareto": trial.number in pareto, "failure": str(attrs.get("failure") or ""),
        }
        row["hover"] = _hover(row, trial)
        rows.append(row)
    return pd.DataFrame(rows, columns=list(TRIAL_COLUMNS))


def method_color(method: str) -> str:
    """A fixed colour per method, so every plot and study agrees."""
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    return _EXTRA_COLORS[sum(map(ord, method)) % len(_EXTRA_COLORS)]


# -- choosing a point -------------------------------------------------------------------------------------------


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
              min_relative_accuracy: float | None = None, max_prefill_ms: float | None = None) -> Recommendation:
    """What `dart-tuner export` would pick with the same bounds (the same Rule through `choose_trial`)."""
    try:
        rule = Rule(min_accuracy=min_accuracy, min_relative_accuracy=min_relative_accuracy,
                    max_prefill_ms=max_prefill_ms)
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
        "kept vision tokens": rows["kept_vision_mean"].round(1), "GFLOPs": rows["prefill_gflops"].round(4),
        "feasible": rows["feasible"], "Pareto": rows["pareto"]})
    return table.reset_index(drop=True)


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


# -- figures ----------------------------------------------------------------------------------------------------


def _front_line(points: pd.DataFrame, x: str, y: str, x_lower_is_better: bool = True) -> tuple[list, list]:
    """The staircase through a 2-D front (x better when lower, y higher): what is attainable at each x."""
    ordered = points.sort_values(x, ascending=x_lower_is_better)
    xs, ys = [], []
    for _, row in ordered.iterrows():
        if xs:
            xs.append(row[x])
            ys.append(ys[-1])
        xs.append(row[x])
        ys.append(row[y])
    return xs, ys


def pareto_figure(frame: pd.DataFrame, *, x: str = "prefill_ms", show_dominated: bool = True,
                  show_infeasible: bool = True, floor: float | None = None, max_prefill_ms: float | None = None,
                  recommended: int | None = None, qualifying: Sequence[int] = (), title: str | None = None
                  ) -> go.Figure:
    """Accuracy against `x` (prefill ms, GFLOPs or kept tokens): methods by colour, baseline as a star,
    infeasible trials as grey crosses, dominated ones faded, the deployer's bounds as dashed lines."""
    if x not in X_AXES:
        raise ValueError(f"x must be one of {', '.join(X_AXES)}, got {x!r}")
    done = frame[frame["state"] == "complete"]
    fig = go.Figure()
    pruned = done[done["role"] != "baseline"]
    feasible = pruned[pruned["feasible"]]
    if not show_dominated:
        feasible = feasible[feasible["pareto"]]
    for method in sorted(feasible["method"].unique()):
        rows = feasible[feasible["method"] == method]
        fig.add_trace(go.Scatter(
            x=rows[x], y=rows["accuracy"], mode="markers", name=method, hovertext=rows["hover"],
            hovertemplate="%{hovertext}<extra></extra>", customdata=rows["number"],
            marker={"color": method_color(method), "size": [13 if p else 9 for p in rows["pareto"]],
                    "opacity": [1.0 if p else 0.45 for p in rows["pareto"]],
                    "line": {"width": [1.5 if p else 0 for p in rows["pareto"]], "color": "#222"}}))
    infeasible = pruned[~pruned["feasible"]]
    if show_infeasible and len(infeasible):
        fig.add_trace(go.Scatter(
            x=infeasible[x], y=infeasible["accuracy"], mode="markers", name="infeasible (violates constraints)",
            hovertext=infeasible["hover"], hovertemplate="%{hovertext}<extra></extra>",
            customdata=infeasible["number"],
            marker={"symbol": "x-thin-open", "size": 10, "color": "#888", "line": {"width": 2, "color": "#888"}}))
    front = done[done["pareto"]]
    if x == "prefill_ms" and len(front) > 1:
        xs, ys = _front_line(front, x, "accuracy")
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name="Pareto front (feasible)", hoverinfo="skip",
                                 line={"color": "#444", "width": 1, "dash": "dot"}))
    baseline = done[done["role"] == "baseline"]
    if len(baseline):
        fig.add_trace(go.Scatter(
            x=baseline[x], y=baseline["accuracy"], mode="markers", name="unpruned baseline",
            hovertext=baseline["hover"], hovertemplate="%{hovertext}<extra></extra>",
            customdata=baseline["number"],
            marker={"symbol": "star", "size": 18, "color": "#111", "line": {"width": 1, "color": "#fff"}}))
    if qualifying:
        rows = done[done["number"].isin(list(qualifying))]
        fig.add_trace(go.Scatter(x=rows[x], y=rows["accuracy"], mode="markers", name="meets your bounds",
                                 hoverinfo="skip", marker={"symbol": "circle-open", "size": 17, "color": "#2ca02c",
                                                           "line": {"width": 1.5}}))
    if recommended is not None:
        rows = done[done["number"] == recommended]
        fig.add_trace(go.Scatter(x=rows[x], y=rows["accuracy"], mode="markers+text", name=f"recommended: trial "
                                 f"{recommended}", text=[f"#{recommended}"] * len(rows), textposition="top center",
                                 hoverinfo="skip", marker={"symbol": "circle-open", "size": 26, "color": "#e6007e",
                                                           "line": {"width": 3}}))
    if floor is not None:
        fig.add_hline(y=floor, line={"dash": "dash", "color": "#e6007e", "width": 1.5},
                      annotation_text=f"min accuracy {floor:.3f}", annotation_position="bottom right")
    if max_prefill_ms is not None and x == "prefill_ms":
        fig.add_vline(x=max_prefill_ms, line={"dash": "dash", "color": "#e6007e", "width": 1.5},
                      annotation_text=f"max prefill {max_prefill_ms:g} ms", annotation_position="top left")
    fig.update_layout(title=title, xaxis_title=X_AXES[x], yaxis_title="accuracy", legend_title_text="",
                      hovermode="closest", margin={"t": 50 if title else 20, "l": 10, "r": 10, "b": 10},
                      height=480, template="plotly_white")
    return fig


def reference_point(study: optuna.Study, trials: Sequence[FrozenTrial] | None = None) -> list[float]:
    """Hypervolume reference: accuracy 0 and 10% above the slowest complete trial's prefill."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if trials is None else trials
    slowest = max((t.values[1] for t in trials if t.state == TrialState.COMPLETE and t.values), default=1.0)
    return [0.0, 1.1 * slowest]


def hypervolume_figure(study: optuna.Study) -> go.Figure:
    """Hypervolume of the feasible front after each trial (Optuna's own plot): flat means the search stalls."""
    reference = reference_point(study)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        fig = optuna.visualization.plot_hypervolume_history(study, reference)
    fig.update_layout(title=f"Hypervolume of the feasible front (reference: accuracy 0, prefill "
                            f"{reference[1]:.1f} ms)", xaxis_title="trial number",
                      yaxis_title="hypervolume (accuracy x ms)", template="plotly_white", height=380)
    return fig


def importance_params(frame: pd.DataFrame, dart_only: bool) -> list[str]:
    """Parameters whose importance can be estimated: those every considered trial has and that vary."""
    rows = frame[(frame["state"] == "complete") & (frame["role"] != "baseline") & (frame["method"] != "?")]
    if dart_only:
        rows = rows[rows["method"] == "dart"]
    names = ["method"] if not dart_only else []
    names += [p for p in PARAMETERS if len(rows) and rows[p].notna().all()]
    return [n for n in names if len(rows) and rows[n].nunique() > 1]


def importance_figure(study: optuna.Study, params: Sequence[str]) -> go.Figure:
    """fANOVA importance of `params` for accuracy and for prefill latency (Optuna's own plot, seeded)."""
    from optuna.importance import FanovaImportanceEvaluator

    if not params:
        raise ValueError("no parameter varies across these trials yet")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        fig = optuna.visualization.plot_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0),
                                                          params=list(params))
    names = iter(("accuracy", "prefill latency"))
    fig.for_each_trace(lambda trace: trace.update(name=next(names, trace.name)))
    fig.update_layout(title="Parameter importance for each objective (fANOVA)", template="plotly_white",
                      height=120 + 60 * len(params), legend_title_text="objective")
    return fig


def parameter_figure(frame: pd.DataFrame) -> go.Figure:
    """Accuracy (top) and prefill latency (bottom) against each parameter, coloured by method."""
    done = frame[(frame["state"] == "complete") & (frame["role"] != "baseline")]
    params = [p for p in PARAMETERS if done[p].notna().any()] or ["keep_ratio"]
    fig = make_subplots(rows=2, cols=len(params), shared_yaxes=True, horizontal_spacing=0.03, vertical_spacing=0.1,
                        column_titles=[PARAMETER_TITLES[p] for p in params])
    for method in sorted(done["method"].unique()):
        rows = done[done["method"] == method]
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=method, legendgroup=method,
                                 marker={"color": method_color(method), "size": 8}), row=1, col=1)
        for col, param in enumerate(params, start=1):
            has = rows[rows[param].notna()]
            for row_index, y in enumerate(("accuracy", "prefill_ms"), start=1):
                fig.add_trace(go.Scatter(
                    x=has[param], y=has[y], mode="markers", name=method, legendgroup=method, showlegend=False,
                    hovertext=has["hover"],
                    hovertemplate="%{hovertext}<extra></extra>",
                    marker={"color": method_color(method), "size": 8,
                            "symbol": ["circle" if f else "x-thin-open" for f in has["feasible"]],
                            "line": {"width": 1.5, "color": method_color(method)}}), row=row_index, col=col)
    fig.update_yaxes(title_text="accuracy", row=1, col=1)
    fig.update_yaxes(title_text="prefill ms", row=2, col=1)
    fig.update_layout(template="plotly_white", height=560, margin={"t": 40, "l": 10, "r": 10, "b": 10})
    return fig


def related_studies(choices: Sequence[StudyChoice], current: optuna.Study, limit: int = 5) -> list[str]:
    """Other studies of the same model (other tasks or GPUs): what to compare with by default."""
    model = (current.user_attrs.get("provenance") or {}).get("model_id")
    return [c.name for c in choices if c.name != current.study_name and c.model_id == model][:limit]


def compare_figure(studies: Sequence[optuna.Study], *, relative: bool = True) -> go.Figure:
    """The feasible Pareto fronts of several studies on one plot (relative: % of each study's own baseline
    against speed-up over it, so different tasks and GPUs line up)."""
    fig = go.Figure()
    for index, study in enumerate(studies):
        frame = trial_frame(study)
        done = frame[frame["state"] == "complete"]
        front = done[done["pareto"]]
        if relative:
            x, y = "speedup", "relative_accuracy"
        else:
            x, y = "prefill_ms", "accuracy"
        provenance = study.user_attrs.get("provenance") or {}
        tasks = ",".join(t.get("name", "?") for t in provenance.get("tasks") or [])
        name = f"{study.study_name} ({tasks or '?'}, {provenance.get('device', '?')})"
        color = STUDY_COLORS[index % len(STUDY_COLORS)]
        xs, ys = _front_line(front, x, y, x_lower_is_better=not relative)
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line={"color": color, "width": 1.5}, name=name,
                                 legendgroup=name, hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=front[x], y=front[y], mode="markers", marker={"color": color, "size": 10,
                                                                                 "symbol": "circle"},
                                 name=name, legendgroup=name, showlegend=False,
                                 hovertext=[f"<b>{study.study_name}</b><br>{h}" for h in front["hover"]],
                                 hovertemplate="%{hovertext}<extra></extra>"))
    if relative:
        fig.update_layout(xaxis_title="prefill speed-up over each study's unpruned baseline (x)",
                          yaxis_title="accuracy relative to each study's baseline", yaxis_tickformat=".0%")
    else:
        fig.update_layout(xaxis_title=X_AXES["prefill_ms"], yaxis_title="accuracy")
    fig.update_layout(template="plotly_white", height=480, legend_title_text="study (feasible Pareto front)",
                      margin={"t": 20, "l": 10, "r": 10, "b": 10})
    return fig
