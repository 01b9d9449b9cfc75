"""dart-tuner dashboard: look at a study, choose a point under a deployer's bounds, leave with its preset.

Start it with `dart-tuner dashboard --storage URL`, or from a checkout
`streamlit run dashboard/app.py -- --storage URL`.
Layout only: every number, table and figure comes from the `tuner.dashboard` package (one module per job).
"""

from __future__ import annotations

import math
import sys

import optuna
import pandas as pd
import streamlit as st

from tuner import dashboard as dd
from tuner.results import study_objective
from tuner.results.storage import StorageError, open_for_reading

optuna.logging.set_verbosity(optuna.logging.WARNING)
STUDY_KEYS = ("acc_mode", "min_rel_pct", "min_abs", "limit_latency", "max_ms", "export_trial", "compare")
ACC_MODES = {"relative": "% of the baseline", "absolute": "absolute", "none": "no minimum"}

st.set_page_config(page_title="dart-tuner dashboard", layout="wide")


@st.cache_resource(show_spinner=False)
def storage_for(url: str) -> optuna.storages.BaseStorage:
    """One storage (one connection pool) per URL for every session, behind one Optuna trial cache: counting a
    study's trials for the picker and loading it read its finished trials from the database once."""
    return optuna.storages.get_storage(open_for_reading(url))


@st.cache_resource(show_spinner=False, max_entries=32)
def study_for(url: str, name: str) -> optuna.Study:
    """One Study per (storage, name): the cached storage re-reads only unfinished and new trials on each run."""
    return dd.load_study(storage_for(url), name)


@st.cache_data(show_spinner=False, ttl=15, max_entries=32)
def studies_in(url: str) -> list[dd.StudyChoice]:
    """The picker's studies (counting trials reads them into the cache, so at most every 15 s or on Refresh)."""
    return dd.list_studies(storage_for(url))


@st.cache_data(show_spinner="Estimating parameter importance...", max_entries=64)
def importance_for(url: str, name: str, n_complete: int, params: tuple[str, ...]) -> object:
    """fANOVA importance figure, recomputed only when the study has new complete trials."""
    return dd.importance_figure(study_for(url, name), params)


def reset_bounds() -> None:
    """A different study starts from its own constraints and related studies."""
    for key in STUDY_KEYS:
        st.session_state.pop(key, None)


# -- storage and study ------------------------------------------------------------------------------------------

st.title("dart-tuner: accuracy against measured latency")
with st.sidebar:
    st.header("Study")
    url = st.text_input("Optuna storage (SQLAlchemy URL)", value=dd.storage_from_argv(sys.argv[1:]), key="storage",
                        help="sqlite:///dart_tuner.db, or postgresql+psycopg://user@host/db for many workers")
    try:
        choices = [c for c in studies_in(url) if c.dart_tuner]
    except StorageError as problem:
        st.error(str(problem))
        st.stop()
    if not choices:
        st.info(f"No dart-tuner study in {url} yet. Start one with `dart-tuner tune --space "
                f"search_spaces/demo.yaml --storage {url}`, then refresh.")
        if st.button("Refresh", key="refresh_empty"):
            studies_in.clear()
            st.rerun()
        st.stop()
    labels = {c.name: c.label for c in choices}
    name = st.selectbox("Study", list(labels), format_func=labels.get, key="study", on_change=reset_bounds)
    if st.button("Refresh", key="refresh", help="Read the storage again (new studies, new trials)"):
        studies_in.clear()
        study_for.clear()
    try:
        study = study_for(url, name)
    except StorageError as problem:
        st.error(str(problem))
        st.stop()
    trials = study.get_trials(deepcopy=False)
    target = st.selectbox("Runs on", dd.TARGET_CHOICES, index=dd.TARGET_CHOICES.index(dd.default_target(study)),
                          key=f"target_{name}", help="Hide the points whose configuration does not run on this "
                          "target: vllm and sglang run no pruning, only the processor settings they take "
                          "(docs/serving.md); transformers runs every point.")
    running = dd.is_running(trials)
    auto = st.toggle("Refresh every 10 s while trials run", value=running, key="auto_refresh")
    if running:
        st.caption(f"{dd.state_counts(trials)['running']} trial(s) running")

if auto:
    st.session_state["seen_trials"] = len(trials)

    @st.fragment(run_every=10)
    def _watch_study() -> None:
        """Rerun the whole page when the study gained or finished a trial."""
        now = study_for(url, name).get_trials(deepcopy=False)
        if len(now) != st.session_state.get("seen_trials") or dd.is_running(now) != running:
            st.rerun()

    _watch_study()

st.subheader(f"Study {dd.markdown_text(name)}")
rows = dd.provenance_rows(study, trials)
half = (len(rows) + 1) // 2
for index, (column, part) in enumerate(zip(st.columns(2), (rows[:half], rows[half:]))):
    # stored text shown as text (a data grid renders no markdown: no remote image or link from a study's values)
    column.dataframe(pd.DataFrame(part, columns=["provenance", "value"]), hide_index=True, key=f"provenance{index}")

skipped = dd.skipped_text(name, dd.unreadable_trials(trials))
if skipped:
    st.warning(dd.markdown_text(skipped) + ": they are left out of every plot, table and recommendation.")
shown = dd.trials_on(study, trials, target)
frame = dd.trial_frame(study, shown)  # the front of what the target runs
if len(shown) < len(trials):
    st.caption(f"{len(trials) - len(shown)} trial(s) hidden: they do not run on {target}.")
goal = study_objective(study)  # the study's latency objective: the front's x axis and the metric shown
done = frame[frame["state"] == "complete"]
if done.empty:
    st.info("No complete trial yet: the Pareto front appears when the first trial finishes"
            + (" (refresh, or turn on auto-refresh)." if running else "."))
    st.stop()

# -- choosing a point -------------------------------------------------------------------------------------------

st.header("Choose a point")
defaults = dd.default_bounds(study)
baseline = study.user_attrs.get("baseline") or {}
lat_low = math.floor(float(done["prefill_ms"].min()) * 0.9)
lat_high = math.ceil(float(done["prefill_ms"].max()) * 1.05)
col_acc, col_value, col_lat = st.columns([1.2, 1.5, 2])
with col_acc:
    modes = list(ACC_MODES) if baseline else ["absolute", "none"]
    default_mode = defaults["mode"] if defaults["mode"] in modes else "absolute"
    mode = st.radio("Minimum accuracy", modes, index=modes.index(default_mode), format_func=ACC_MODES.get,
                    key="acc_mode")
with col_value:
    min_abs = min_rel = None
    if mode == "relative":
        min_rel = st.slider("Minimum accuracy (% of the unpruned baseline)", 0.0, 100.0,
                            value=100 * defaults["value"] if defaults["mode"] == "relative" else 95.0, step=0.5,
                            key="min_rel_pct") / 100
        st.caption(f"baseline accuracy {baseline['accuracy']:.3f}: floor {min_rel * baseline['accuracy']:.3f}")
    elif mode == "absolute":
        start = defaults["value"] if defaults["mode"] == "absolute" else (
            defaults["value"] * baseline["accuracy"] if baseline else float(done["accuracy"].median()))
        min_abs = st.number_input("Minimum accuracy (absolute)", value=round(start, 4), step=0.01, format="%.4f",
                                  key="min_abs")
    confidence = None
    if mode != "none" and st.checkbox("Require confidence", value=False, key="use_confidence",
                                      help="Judge the floor by each trial's one-sided lower confidence bound on "
                                           "accuracy instead of its measured value (export --confidence)."):
        confidence = st.slider("Confidence (one-sided)", 0.5, 0.99, value=0.9, step=0.01, key="confidence")
with col_lat:
    limit = st.checkbox("Limit prefill latency", value=defaults["max_prefill_ms"] is not None, key="limit_latency")
    max_ms = None
    if limit:
        start = defaults["max_prefill_ms"] or float(done["prefill_ms"].median())
        max_ms = st.slider("Maximum prefill latency (ms)", float(lat_low), float(lat_high),
                           value=float(min(max(start, lat_low), lat_high)),
                           step=0.1 if lat_high - lat_low < 50 else 1.0, key="max_ms")

rec = dd.recommend_on(study, dd.recommend(study, min_accuracy=min_abs, min_relative_accuracy=min_rel,
                                          max_prefill_ms=max_ms, confidence=confidence), target)
by_number = frame.set_index("number")
if rec.trial is not None:
    row = by_number.loc[rec.trial.number]
    cols = st.columns(5)
    cols[0].metric("Recommended trial", f"#{rec.trial.number}", help=rec.message)
    cols[1].metric("Accuracy", f"{row['accuracy']:.3f}",
                   f"{100 * (row['relative_accuracy'] - 1):+.1f}% vs baseline"
                   if not math.isnan(row["relative_accuracy"]) else None)
    cols[2].metric(f"{goal.label.capitalize()} ({goal.unit})", f"{row['objective']:.1f}",
                   f"{row['speedup']:.2f}x {'more' if goal.maximize else 'faster'}", delta_color="off",
                   delta_arrow="off", help=dd.workload_text(row) or None)
    cols[3].metric("Kept vision tokens", f"{row['kept_vision_mean']:.1f}", f"of {row['vision_mean']:.0f}",
                   delta_color="off", delta_arrow="off")
    cols[4].metric("Configuration", row["method"], row["label"].removeprefix(row["method"]).strip() or None,
                   delta_color="off", delta_arrow="off")
    on = "" if target == "all" else f" --target {target}"
    st.caption(f"{rec.message}. Same choice on the command line: `dart-tuner export --storage "
               f"{url} --study {name} {dd.export_rule_args(rec)}{on} -o preset.yaml`")
    if rec.latency_warning:
        st.warning(f"{rec.latency_warning}.")
    if row["indistinct"]:
        st.info(f"Trial {rec.trial.number} is not distinguishable from trial {row['indistinct']}: their 95% "
                "intervals overlap on both accuracy and prefill latency.")
else:
    st.warning(rec.message)

# -- plots --------------------------------------------------------------------------------------------------------

qualifying = [t.number for t in rec.qualifying]
recommended = rec.trial.number if rec.trial is not None else None
pareto_tab, cost_tab, progress_tab, params_tab, compare_tab = st.tabs(
    ["Pareto front", "Against FLOPs / kept tokens", "Search progress", "Parameters", "Compare studies"])
with pareto_tab:
    c1, c2 = st.columns(2)
    show_dominated = c1.toggle("Show dominated trials", value=True, key="show_dominated")
    show_infeasible = c2.toggle("Show infeasible trials", value=True, key="show_infeasible")
    st.plotly_chart(dd.pareto_figure(frame, x=goal.name, objective=goal.name, show_dominated=show_dominated,
                                     show_infeasible=show_infeasible, floor=rec.floor, max_prefill_ms=max_ms,
                                     recommended=recommended, qualifying=qualifying), key="pareto")
    st.caption("Filled markers: the feasible Pareto front; faded: dominated; grey crosses: trials that violate the "
               "study's constraints; star: the unpruned baseline. Error bars: 95% intervals (accuracy: Wilson or "
               "bootstrap; prefill: the median's). Dashed lines: your bounds; green rings: the "
               "trials meeting them; the magenta ring: the recommended one. Hover a point for its configuration.")
with cost_tab:
    x = st.radio("Against", ["prefill_gflops", "kept_vision_mean"], format_func=dd.X_AXES.get, horizontal=True,
                 key="cost_axis")
    st.plotly_chart(dd.pareto_figure(frame, x=x, show_dominated=show_dominated, show_infeasible=show_infeasible,
                                     floor=rec.floor, recommended=recommended, qualifying=qualifying), key="cost")
    st.caption("Analytic FLOPs and kept tokens do not depend on the machine: a point fast here but not in FLOPs "
               "is a measurement artefact, and the other way round an overhead the analytic count misses.")
with progress_tab:
    st.plotly_chart(dd.hypervolume_figure(study), key="hypervolume")
    st.caption("Hypervolume (Optuna's) of the feasible front after each trial: while it still rises the search is "
               "still finding better trade-offs; a long flat tail means more trials are unlikely to help.")
with params_tab:
    searched = sorted({column.partition(".")[0] for column in frame.columns if "." in column})
    only = st.selectbox("Trials", ["all methods", *searched], key="importance_method",
                        format_func=lambda m: m if m == "all methods" else f"{m} only (adds its options)")
    params = dd.importance_params(frame, None if only == "all methods" else only)
    estimate = st.toggle("Estimate parameter importance (fANOVA)", value=len(done) <= dd.IMPORTANCE_AUTO_TRIALS,
                         key="importance_on", help=f"On by default up to {dd.IMPORTANCE_AUTO_TRIALS} complete trials: "
                         "fitting its forests takes about a minute at 2,000.")
    try:
        if estimate:
            st.plotly_chart(importance_for(url, name, len(done), tuple(params)), key="importance")
    except (ValueError, RuntimeError) as error:
        st.info(f"Parameter importance cannot be estimated from these trials yet: {error}")
    st.plotly_chart(dd.parameter_figure(frame), key="parameters")
    st.caption("Crosses: infeasible trials. A method's options exist only in that method's trials.")
with compare_tab:
    others = [c.name for c in choices if c.name != name]
    if not others:
        st.info("This storage holds one dart-tuner study; studies of the same model on other tasks or GPUs "
                "appear here to compare.")
    else:
        picked = st.multiselect("Compare with", others, default=dd.related_studies(choices, study),
                                format_func=labels.get, key="compare")
        relative = st.toggle("Relative to each study's baseline (speed-up, % of baseline accuracy)", value=True,
                             key="compare_relative")
        if picked:
            compared = [study_for(url, n) for n in picked]
            st.plotly_chart(dd.compare_figure([study] + compared, relative=relative), key="compare_chart")
            for other in compared:
                unread = dd.unreadable_trials(other.get_trials(deepcopy=False))
                if unread:
                    st.caption(dd.markdown_text(dd.skipped_text(other.study_name, unread)) + ".")

# -- the points meeting the bounds, and the export --------------------------------------------------------------

st.header("Trials meeting your bounds")
if qualifying:
    st.dataframe(dd.table_of(frame, qualifying), hide_index=True, key="qualifying")
    st.caption("Best first: the fastest meeting an accuracy floor, or the most accurate under a latency ceiling.")
else:
    st.caption("None.")
with st.expander("All trials"):
    everything = frame.sort_values("number")
    table = dd.table_of(frame, list(everything["number"]))
    table.insert(1, "state", everything["state"].to_list())
    table["failure"] = everything["failure"].to_list()
    st.dataframe(table, hide_index=True)

st.header("Export")
numbers = dd.candidate_numbers(frame)
if not numbers:
    st.info("No complete pruned trial yet: only the unpruned baseline, which needs no preset.")
    st.stop()
options = (["recommended"] if recommended is not None else []) + numbers
chosen = st.selectbox("Trial to export", options, key="export_trial", format_func=lambda o: (
    f"recommended (trial {recommended})" if o == "recommended" else f"trial {o}: {by_number.loc[o, 'label']}, "
    f"accuracy {by_number.loc[o, 'accuracy']:.3f}, prefill {by_number.loc[o, 'prefill_ms']:.1f} ms"
    + ("" if by_number.loc[o, "feasible"] else " (infeasible)")))
number = recommended if chosen == "recommended" else int(chosen)
text = dd.target_preset_yaml(study, number, target)
st.download_button(f"Download the preset of trial {number} (YAML)", data=text,
                   file_name=dd.preset_file_name(name, number), mime="application/x-yaml", on_click="ignore",
                   key="download", type="primary")
on = "" if target == "all" else f" --target {target}"
st.caption(f"The same file as `dart-tuner export --storage {url} --study {name} --trial {number}{on} -o "
           "preset.yaml`. Apply it with `tuner.load_preset(path)` and `tuner.apply_pruning(model, preset)`"
           + ("." if target in ("all", "transformers") else f", or launch {target} with its `launch` line."))
with st.expander("Preset file"):
    st.code(text, language="yaml")
