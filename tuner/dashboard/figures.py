"""The dashboard's figures: Pareto front, hypervolume, parameter importance, parameters, and studies compared."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import optuna
import pandas as pd
import plotly.graph_objects as go
from optuna.trial import FrozenTrial, TrialState
from plotly.subplots import make_subplots

from tuner.config.schema import legacy_param
from tuner.config.workload import OBJECTIVES
from tuner.dashboard.frame import method_color, trial_frame
from tuner.results.trials import study_objective

STUDY_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")
X_AXES = {"prefill_ms": "measured prefill latency (ms, median)",
          "ttft_ms": "time to first token at the workload's batch (ms, median)",
          "e2e_ms": "end-to-end latency per request at the workload (ms, median)",
          "throughput": "output throughput at the workload's batch (tokens/s, median)",
          "prefill_gflops": "analytic prefill GFLOPs (text model)",
          "kept_vision_mean": "kept vision tokens (mean per sample)"}
PARAMETERS = ("keep_ratio", "budget", "layer")  # shared by every method; each method's options follow
PARAMETER_TITLES = {"keep_ratio": "keep ratio", "budget": "token budget", "layer": "K (pruning layer)"}
IMPORTANCE_AUTO_TRIALS = 500  # above this many complete trials fANOVA waits to be asked for (a minute at 2,000)


def parameter_names(frame: pd.DataFrame) -> list[str]:
    """The shared parameters, then the frame's method-option columns ('<method>.<option>')."""
    return [*PARAMETERS, *(column for column in frame.columns if "." in column)]


def parameter_title(name: str) -> str:
    """A subplot title: 'keep ratio', or for a method option 'dart: n image pivots'."""
    method, _, option = name.partition(".")
    return PARAMETER_TITLES.get(name) or f"{method}: {option.replace('_', ' ')}"


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


def error_bar(rows: pd.DataFrame, column: str) -> dict | None:
    """Plotly error bars from a column's stored 95% interval (`<column>_low`/`_high`); None when the column has
    none (GFLOPs, kept tokens). Trials without an interval get no bar (NaN)."""
    if f"{column}_low" not in rows:
        return None
    return {"type": "data", "symmetric": False, "array": (rows[f"{column}_high"] - rows[column]).tolist(),
            "arrayminus": (rows[column] - rows[f"{column}_low"]).tolist(), "thickness": 1, "width": 3}


def pareto_figure(frame: pd.DataFrame, *, x: str = "prefill_ms", show_dominated: bool = True,
                  show_infeasible: bool = True, floor: float | None = None, max_prefill_ms: float | None = None,
                  recommended: int | None = None, qualifying: Sequence[int] = (), title: str | None = None,
                  objective: str = "prefill_ms") -> go.Figure:
    """Accuracy against `x` (a latency objective, GFLOPs or kept tokens): methods by colour with 95% error bars,
    baseline as a star, infeasible trials as grey crosses, dominated ones faded, the deployer's bounds as dashed
    lines; the front's staircase when `x` is the study's `objective` (throughput: higher is better)."""
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
            error_y=error_bar(rows, "accuracy"), error_x=error_bar(rows, x),
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
    if x == objective and len(front) > 1:
        xs, ys = _front_line(front, x, "accuracy", x_lower_is_better=not OBJECTIVES[objective].maximize)
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name="Pareto front (feasible)", hoverinfo="skip",
                                 line={"color": "#444", "width": 1, "dash": "dot"}))
    confirmed = done[done["confirmed_prefill_ms"].notna()] if x == "prefill_ms" else done.iloc[0:0]
    if len(confirmed):
        ys = confirmed["confirmed_accuracy"].fillna(confirmed["accuracy"])
        fig.add_trace(go.Scatter(
            x=confirmed["confirmed_prefill_ms"], y=ys, mode="markers", name="confirmed (re-measured)",
            hovertext=[f"<b>trial {n}</b> confirmed: {t}" for n, t in zip(confirmed["number"],
                                                                         confirmed["confirmed_text"])],
            hovertemplate="%{hovertext}<extra></extra>", customdata=confirmed["number"],
            marker={"symbol": "diamond-open", "size": 12, "color": "#111", "line": {"width": 2}}))
    baseline = done[done["role"] == "baseline"]
    if len(baseline):
        fig.add_trace(go.Scatter(
            x=baseline[x], y=baseline["accuracy"], mode="markers", name="unpruned baseline",
            error_y=error_bar(baseline, "accuracy"), error_x=error_bar(baseline, x),
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
    """Hypervolume reference: accuracy 0 and 10% beyond the worst complete trial's latency objective (above the
    slowest latency; below the lowest throughput, which is maximised)."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if trials is None else trials
    values = [t.values[1] for t in trials if t.state == TrialState.COMPLETE and t.values]
    if study_objective(study).maximize:
        return [0.0, 0.9 * min(values, default=1.0)]
    return [0.0, 1.1 * max(values, default=1.0)]


def hypervolume_figure(study: optuna.Study) -> go.Figure:
    """Hypervolume of the feasible front after each trial (Optuna's own plot): flat means the search stalls."""
    reference = reference_point(study)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        fig = optuna.visualization.plot_hypervolume_history(study, reference)
    goal = study_objective(study)
    fig.update_layout(title=f"Hypervolume of the feasible front (reference: accuracy 0, {goal.label} "
                            f"{reference[1]:.1f} {goal.unit})", xaxis_title="trial number",
                      yaxis_title=f"hypervolume (accuracy x {goal.unit})", template="plotly_white", height=380)
    return fig


def importance_params(frame: pd.DataFrame, method: str | None = None) -> list[str]:
    """Parameters whose importance can be estimated: those every considered trial has and that vary. With
    `method`, only that method's trials are considered, which adds its options."""
    rows = frame[(frame["state"] == "complete") & (frame["role"] != "baseline") & (frame["method"] != "?")]
    if method is not None:
        rows = rows[rows["method"] == method]
    names = ["method"] if method is None else []
    names += [p for p in parameter_names(frame) if len(rows) and rows[p].notna().all()]
    return [n for n in names if len(rows) and rows[n].nunique() > 1]


def importance_figure(study: optuna.Study, params: Sequence[str]) -> go.Figure:
    """fANOVA importance of `params` for accuracy and for the study's latency objective (Optuna's own plot,
    seeded)."""
    from optuna.importance import FanovaImportanceEvaluator

    if not params:
        raise ValueError("no parameter varies across these trials yet")
    stored = {legacy_param(name): name for trial in study.get_trials(deepcopy=False) for name in trial.params}
    params = [stored.get(name, name) for name in params]  # a schema-1 study's own names for DART's pivots
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        fig = optuna.visualization.plot_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0),
                                                          params=list(params))
    goal = study_objective(study)  # the study's second objective: prefill by default
    names = iter(("accuracy", f"{goal.label} ({goal.unit})"))
    fig.for_each_trace(lambda trace: trace.update(name=next(names, trace.name)))
    fig.update_layout(title="Parameter importance for each objective (fANOVA)", template="plotly_white",
                      height=120 + 60 * len(params), legend_title_text="objective")
    return fig


def parameter_figure(frame: pd.DataFrame) -> go.Figure:
    """Accuracy (top) and prefill latency (bottom) against each parameter, coloured by method."""
    done = frame[(frame["state"] == "complete") & (frame["role"] != "baseline")]
    params = [p for p in parameter_names(frame) if done[p].notna().any()] or ["keep_ratio"]
    fig = make_subplots(rows=2, cols=len(params), shared_yaxes=True, horizontal_spacing=0.03, vertical_spacing=0.1,
                        column_titles=[parameter_title(p) for p in params])
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
