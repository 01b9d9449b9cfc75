"""A confirmation run at the end of a study: the front measured again, away from the search's own noise.

- Latency: the front's trials and the unpruned baseline in ONE interleaved run at the study's workload with more
  repeats than the search used, so every confirmed speed-up (of the study's objective) comes from the same rounds.
- Accuracy (optional): the baseline and the front's trials scored on a fresh seeded subset, disjoint from the one
  the search chose on, which removes the winner's curse of picking the best-looking trials on the same questions.

The numbers are stored as the study's user attribute `confirmation` (Optuna does not let a finished trial's
attributes change), keyed by trial number, next to the search-time numbers, which stay as they were.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Callable, Sequence
from typing import Any

import optuna

from tuner.evaluation.runner import EvalResult, Evaluator
from tuner.evaluation.tasks import load_tasks
from tuner.measure.compare import BASELINE
from tuner.measure.trial import TrialMeasurer, objective_spread
from tuner.measure.workload import measure_workload
from tuner.results import config_of, is_baseline, pareto_trials
from tuner.results.evidence import CONFIRMATION_ATTR, SAMPLE_TASKS_ATTR, accuracy_evidence, latency_evidence
from tuner.results.record import PROVENANCE_ATTR
from tuner.search.space import SearchSpace


def front_to_confirm(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The feasible Pareto front's pruned trials, fastest first (the baseline is measured anyway)."""
    return [t for t in pareto_trials(study) if not is_baseline(t) and config_of(t) is not None]


def stored_subset(study: optuna.Study) -> tuple[int | None, int | None]:
    """The subset size and seed `study` was tuned on (a `tune --limit/--seed` included), from its provenance, so
    that confirming it loads the same documents; (None, None) when it stored none.

    The size is the largest task's: a task smaller than the requested size kept all its documents, and asking it
    for more keeps them all again.
    """
    tasks = (study.user_attrs.get(PROVENANCE_ATTR) or {}).get("tasks") or []
    sizes = [t["size"] for t in tasks if isinstance(t, dict) and isinstance(t.get("size"), int)]
    seeds = [t["seed"] for t in tasks if isinstance(t, dict) and isinstance(t.get("seed"), int)]
    return (max(sizes) if sizes else None), (seeds[0] if seeds else None)


def _accuracy(result: EvalResult, baseline: EvalResult | None) -> dict[str, Any]:
    scores = result.scores()
    evidence = accuracy_evidence(scores, None if baseline is None else baseline.scores()) if scores else {}
    evidence.pop(SAMPLE_TASKS_ATTR, None)
    return {"accuracy": result.accuracy, "n_samples": result.n_samples, **evidence}


def confirm(measurer: TrialMeasurer, study: optuna.Study, space: SearchSpace, *, repeats: int = 20,
            warmup: int | None = None, fresh_size: int | None = None, fresh_seed: int = 1,
            trials: Sequence[optuna.trial.FrozenTrial] | None = None,
            on_step: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Re-measure `study`'s front (or `trials`) with `measurer`'s loaded model and latency inputs, under `space`'s
    latency, batch and task settings, and store the numbers as the study's `confirmation`; returns them.
    `fresh_size` documents per task (None: no accuracy run)."""
    front = front_to_confirm(study) if trials is None else [t for t in trials if config_of(t) is not None]
    lat = space.latency
    warmup = lat.warmup if warmup is None else warmup
    if on_step:
        on_step(f"latency: the baseline and {len(front)} front trials, {repeats} interleaved rounds")
    setups = {BASELINE: None, **{str(t.number): config_of(t) for t in front}}
    # the study's own workload, with the confirmation's rounds: its objective is what the speed-up is of
    measured = measure_workload(measurer.loaded, measurer.inputs, measurer.batch_inputs, setups,
                                dataclasses.replace(lat, repeats=repeats, warmup=warmup), inputs_of=measurer.inputs_of)
    base = measured[BASELINE]
    base_timing = base.single
    record: dict[str, Any] = {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "repeats": repeats,
        "warmup": warmup, "new_tokens": lat.new_tokens, **lat.shape(),
        "baseline": {"prefill_ms": base_timing.prefill.median_ms, "prefill_iqr_ms": base_timing.prefill.iqr_ms,
                     **latency_evidence(base_timing.prefill.samples_ms), **base.objectives()},
        "trials": {}, "fresh_subset": None}
    for trial in front:
        timed = measured[str(trial.number)]
        timing = timed.single
        spread = objective_spread(base, timed, lat.objective)
        record["trials"][str(trial.number)] = {
            "prefill_ms": timing.prefill.median_ms, "prefill_iqr_ms": timing.prefill.iqr_ms,
            **latency_evidence(timing.prefill.samples_ms), **timed.objectives(), "objective": lat.objective,
            "speedup": spread.speedup, **spread.to_attrs()}
    if fresh_size is not None:
        fresh = load_tasks([t.name for t in measurer.tasks], subset_size=fresh_size, seed=fresh_seed,
                           include_paths=space.include_paths, exclude={t.name: t.doc_indices for t in measurer.tasks})
        evaluator = Evaluator(measurer.loaded, fresh, batch_size=space.batch_size, max_failures=space.max_failures)
        if on_step:
            on_step(f"accuracy: {len(front) + 1} configurations on a fresh subset of {fresh_size} per task")
        base_result = evaluator.evaluate(None)
        record["baseline"].update(_accuracy(base_result, None))
        for trial in front:
            record["trials"][str(trial.number)].update(_accuracy(evaluator.evaluate(config_of(trial)), base_result))
        record["fresh_subset"] = [{"name": t.name, **t.subset.to_dict()} for t in fresh]
    study.set_user_attr(CONFIRMATION_ATTR, record)
    return record
