"""Measuring one configuration as a trial: accuracy on the subset (stopped early when it cannot reach a floor), then
latency interleaved with the unpruned baseline on fixed inputs, returned as a `TrialRecord`. With early stopping's
`dominance`, a trial still running at its first look is timed there, so that a trial a stored faster point beats
on accuracy stops early too.

It knows nothing of Optuna or of studies: the caller (`tuner.search.study.Tuner`) gives it the accuracy floor and
the baseline's per-sample scores, and stores the record.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence

from tuner.config import PruningConfig
from tuner.config.workload import Workload
from tuner.evaluation.runner import EvalResult, Evaluator
from tuner.evaluation.tasks import PreparedTask
from tuner.measure.capacity import budget_bytes, max_concurrent_requests
from tuner.measure.compare import BASELINE, InputsUnderSettings, latency_inputs, vision_counts
from tuner.measure.early_stop import EarlyStopping, StopCheck, bound_applies
from tuner.measure.latency import SpeedupSpread, Timing, speedup_spread
from tuner.measure.shared_timing import TimingLookup, latency_signature, probe, reusable, timing_fields
from tuner.measure.workload import SPEEDUP_TIMING, WorkloadResult, measure_workload
from tuner.models.feature_cache import CacheStats, FeatureCache
from tuner.models.loading import LoadedModel
from tuner.results.evidence import accuracy_evidence, latency_evidence
from tuner.results.record import TrialRecord
from tuner.results.sequential import STOP_MAX, SequentialSpeedup

CANDIDATE = "candidate"
STOP_ACCURACY = "stopped"  # latency_stop of a trial whose accuracy stopped early: one round, it decides nothing


def objective_spread(base: WorkloadResult, result: WorkloadResult, objective: str,
                     rule: SequentialSpeedup | None = None) -> SpeedupSpread:
    """The speed-up of `objective` over the baseline timed in the same rounds, with its interval and noise flag;
    with adaptive rounds' `rule`, the interval of its planned look at the rounds run."""
    run, part = SPEEDUP_TIMING[objective]

    def timing(of: WorkloadResult) -> Timing:
        return getattr(getattr(of, run), part)
    rounds = timing(result).repeats
    rank = rule.looks[rounds].rank if rule is not None and rounds in rule.looks else None
    return speedup_spread(timing(base), timing(result), objective.removesuffix("_ms").replace("_", " "), rank=rank)


def adaptive_rule(workload: Workload) -> SequentialSpeedup | None:
    """The stopping rule of the workload's adaptive rounds; None for fixed rounds."""
    if not workload.adaptive:
        return None
    return SequentialSpeedup(workload.min_rounds, workload.repeats, workload.tolerance)


class TrialMeasurer:
    """Measures configurations with one loaded model on prepared task subsets; latency on the first document of the
    first task (the first B documents for the workload's batch). With `early_stopping`, a pruned configuration
    is scored in chunks and stopped at a floor (or, with its dominance, below a faster stored point)."""

    def __init__(self, loaded: LoadedModel, tasks: Sequence[PreparedTask], latency: Workload, *,
                 batch_size: int = 1, max_failures: int = 0, feature_cache: FeatureCache | None = None,
                 early_stopping: EarlyStopping | None = None) -> None:
        self.loaded = loaded
        self.tasks = list(tasks)
        self.latency = latency
        self.early_stopping = early_stopping
        self.feature_cache = feature_cache  # this worker's image features; None: off
        self.evaluator = Evaluator(loaded, self.tasks, batch_size=batch_size, max_failures=max_failures,
                                   feature_cache=feature_cache)
        self.inputs = latency_inputs(loaded, self.tasks[0])
        batch = latency.batch_size  # the same B documents for every configuration; B == 1: the single request
        try:
            self.batch_inputs = latency_inputs(loaded, self.tasks[0], batch) if batch > 1 else None
        except ValueError as error:  # a subset smaller than the batch: name the setting
            raise ValueError(f"latency.batch_size {batch}: {error}") from None
        self.inputs_of = InputsUnderSettings(loaded, self.tasks[0], batch)  # a configuration's processor settings
        self.on_request: Callable[[int], None] | None = None  # progress of the running evaluation, in documents
        self.baseline: EvalResult | None = None  # the unpruned evaluation, once this measurer ran it

    def latency_vision_tokens(self, processor: Mapping[str, int] | None = None) -> int:
        """The fewest vision tokens of a latency-prompt row (under `processor` settings, if any): what budgets and
        pivots must not exceed."""
        inputs = self.inputs_of(PruningConfig(method="keep_all", processor=processor))[0] if processor else self.inputs
        return min(vision_counts(self.loaded, inputs))

    def baseline_result(self) -> EvalResult:
        """The unpruned model's evaluation on the subset (run once; deterministic)."""
        if self.baseline is None:
            self.baseline = self.evaluator.evaluate(None)
        return self.baseline

    def cache_stats(self) -> CacheStats:
        """The feature cache's counters so far (all zero when the cache is off)."""
        return self.feature_cache.stats() if self.feature_cache else CacheStats()

    def _sizes(self) -> dict[str, int]:
        return {task.name: task.subset.size for task in self.tasks}

    def _stoppable(self, config: PruningConfig | None) -> bool:
        """Whether `config`'s evaluation may stop early: a pruned configuration, early stopping on, and every task's
        accuracy a mean of per-document scores (`tuner.measure.early_stop.bound_applies`)."""
        return (config is not None and self.early_stopping is not None
                and all(bound_applies(task) for task in self.tasks))

    def _evaluate(self, config: PruningConfig | None, check: StopCheck | None) -> EvalResult:
        """Accuracy on the subset; with a `check`, in chunks, stopping as soon as it says so."""
        if check is None:
            return self.evaluator.evaluate(config, on_progress=self.on_request)
        return self.evaluator.evaluate(config, on_progress=self.on_request, chunk_size=check.policy.chunk_size,
                                       stop_check=check)

    def _time(self, config: PruningConfig | None, to_beat: float | None, *, one_round: bool = False
              ) -> tuple[dict[str, WorkloadResult], SequentialSpeedup | None, dict[str, object]]:
        """The candidate and the baseline in interleaved rounds: all of `repeats` for fixed rounds (or the baseline
        alone), else until adaptive rounds' rule stops them, or a single round (`one_round`: a trial stopped early
        below the floor, infeasible whatever its latency); with the record fields saying how many and why."""
        rule = adaptive_rule(self.latency) if config is not None else None
        setups = {BASELINE: None} if config is None else {BASELINE: None, CANDIDATE: config}
        stop: list[str] = []

        def until(timed: Mapping[str, Sequence[float]]) -> bool:
            if one_round:
                stop[:] = [STOP_ACCURACY]
                return True
            assert rule is not None
            base, cand = timed[BASELINE], timed[CANDIDATE]
            point = statistics.median(base) / statistics.median(cand)
            reason = rule.decide([b / c for b, c in zip(base, cand)], point, to_beat)
            stop[:] = [reason] if reason else []
            return reason is not None

        started = time.perf_counter()
        measured = measure_workload(self.loaded, self.inputs, self.batch_inputs, setups, self.latency,
                                    until=until if rule is not None or one_round else None, inputs_of=self.inputs_of)
        fields: dict[str, object] = {"latency_seconds": time.perf_counter() - started}
        if one_round:
            fields.update(latency_stop=STOP_ACCURACY)
        elif rule is not None:
            fields.update(latency_stop=stop[0] if stop else STOP_MAX, latency_confidence=rule.confidence,
                          latency_speedup_to_beat=to_beat)
        return measured, rule, fields

    def measure(self, config: PruningConfig | None, *, accuracy_floor: float | None = None,
                baseline_scores: Sequence[tuple[str, int, float]] | None = None,
                best_speedup: Callable[[float], float | None] | None = None,
                best_accuracy: Callable[[float], float | None] | None = None,
                stored_timing: TimingLookup | None = None) -> TrialRecord:
        """Accuracy (paired with `baseline_scores` for its evidence), then latency in the same interleaved rounds as
        the baseline, at the workload (`tuner.measure.workload`), with the speed-up of the workload's objective, its
        interval and noise flag (`tuner.measure.latency.speedup_spread`). With adaptive rounds
        (`Workload.adaptive`), the rounds stop once that interval is tight, or once its upper end is below
        `best_speedup(accuracy)`: the best speed-up stored at no lower accuracy (the candidate is dominated).
        With `stored_timing` (and `latency.share_timings` on), a configuration whose prefill does the same work as a
        stored trial's takes over that trial's timing (`tuner.measure.shared_timing`).

        With early stopping's dominance and `best_accuracy(speed-up)` (the best stored accuracy at that speed-up or
        more), a trial that the floor does not stop at its first look has its latency measured there, between two
        chunks, without a speed-up to beat; the evaluation then also stops once its accuracy's bound is below
        `best_accuracy` at the upper end of its speed-up interval. `eval_seconds` leaves those rounds out.

        A configuration stopped early reports as accuracy its rule's bound: the best it could still have reached
        (exact) or its upper confidence bound (confident), with its partial evidence; below the floor, a constraint
        marks it infeasible, and its latency is then one round (`latency_stop` "stopped").
        """
        cache_before = self.cache_stats()
        stoppable = self._stoppable(config)
        timed_early: list[dict[str, object]] = []
        looked_up: list[tuple[dict[str, object] | None, str | None]] = []

        def shared_timing() -> tuple[dict[str, object] | None, str | None]:  # probed once, and only when timed
            if not looked_up:
                looked_up.append(self._shared_timing(config, stored_timing))
            return looked_up[0]

        def beaten_by() -> float | None:  # dominance: latency now, mid-evaluation, then the best faster accuracy
            shared, signature = shared_timing()
            timed_early.append(shared or self._latency_fields(config, self._time(config, None), signature))
            return best_accuracy(float(timed_early[0]["speedup_high"]))
        dominance = stoppable and self.early_stopping.dominance and best_accuracy is not None
        check = (StopCheck(self._sizes(), self.early_stopping, accuracy_floor, beaten_by if dominance else None)
                 if stoppable and (accuracy_floor is not None or dominance) else None)
        result = self._evaluate(config, check)
        if timed_early:
            result.seconds -= float(timed_early[0]["latency_seconds"])
        if config is None:  # the baseline: later floors and pairings need this very evaluation, not a second one
            self.baseline = result
        cache = (self.cache_stats() - cache_before).to_attrs() if self.feature_cache else {}
        bound = check.bound if check is not None and result.stopped else None
        accuracy = result.accuracy if bound is None else bound
        stop = {"stopped_early": bound is not None, "stop_reason": result.stopped or None,
                "accuracy_partial": None if bound is None else result.accuracy, "accuracy_upper_bound": bound,
                "stop_rule": check.rule if bound is not None else None}
        if timed_early:  # dominance timed it mid-evaluation: those rounds (or the shared timing) are its latency
            latency = timed_early[0]
        elif bound is not None:  # stopped below the floor: infeasible whatever its latency, one round, never shared
            latency = self._latency_fields(config, self._time(config, None, one_round=True), None)
        else:
            shared, signature = shared_timing()
            to_beat = best_speedup(accuracy) if best_speedup is not None and config is not None else None
            latency = shared or self._latency_fields(config, self._time(config, to_beat), signature)
        scores = result.scores()
        evidence = accuracy_evidence(scores, None if config is None else baseline_scores) if scores else {}
        return TrialRecord(
            config=config, accuracy=accuracy, metrics=result.metrics,
            n_samples=result.n_samples, accuracy_by_category=result.accuracy_by_category(),
            **result.kept_vision_stats(), samples=[[s.doc_index, s.score, s.n_kept_vision] for s in result.samples],
            eval_seconds=result.seconds, **evidence, **stop, **latency, **cache)

    def _shared_timing(self, config: PruningConfig | None, stored_timing: TimingLookup | None
                       ) -> tuple[dict[str, object] | None, str | None]:
        """A stored trial's timing fields when `config`'s prefill does the same work and its selection costs the
        same (else None), and `config`'s latency signature (None for the baseline, or with sharing off)."""
        if config is None or stored_timing is None or self.latency.share_timings == "off":
            return None, None
        started = time.perf_counter()
        single, batch = self.inputs_of(config)
        shape = probe(self.loaded, config, single, batch)
        signature = latency_signature(self.loaded, config, shape, self.latency, single, batch,
                                      kept_quantum=self.latency.kept_quantum)
        found = stored_timing(signature)
        if found is None or not reusable(found[0], shape.select_ms):
            return None, signature
        earlier, source = found
        return {**timing_fields(earlier), "latency_seconds": time.perf_counter() - started,
                "latency_signature": signature, "latency_reused_from": source, "select_ms": shape.select_ms}, signature

    def _latency_fields(self, config: PruningConfig | None,
                        time_result: tuple[dict[str, WorkloadResult], SequentialSpeedup | None, dict[str, object]],
                        signature: str | None) -> dict[str, object]:
        """The record fields of `config`'s own timing (`_time`'s result, interleaved with the baseline), stored
        under its latency `signature` for later configurations to share."""
        lat = self.latency  # measured outside the feature cache: it includes the vision tower
        measured, rule, rounds = time_result
        timed, base = measured[CANDIDATE if config is not None else BASELINE], measured[BASELINE]
        timing, cost, base_timing, base_cost = timed.single, timed.cost, base.single, base.cost
        spread = objective_spread(base, timed, lat.objective, rule)
        capacity = self._capacity(config, timed) if lat.memory_budget_gb is not None else {}
        return dict(
            prefill_ms=timing.prefill.median_ms, prefill_iqr_ms=timing.prefill.iqr_ms,
            prefill_repeats=timing.prefill.repeats, **rounds,
            **latency_evidence(timing.prefill.samples_ms),
            decode_ms_per_token=timing.decode.median_ms, decode_iqr_ms=timing.decode.iqr_ms,
            end_to_end_ms=timing.total.median_ms, peak_memory_bytes=timing.peak_memory_bytes,
            baseline_prefill_ms_same_run=base_timing.prefill.median_ms, speedup_same_run=spread.speedup,
            **spread.to_attrs(), **timed.record_fields(lat),
            baseline_objective_same_run=base.objectives()[lat.objective], prefill_flops=cost.prefill_flops,
            kv_cache_bytes=cost.kv_cache_bytes,
            flops_ratio=cost.prefill_flops / base_cost.prefill_flops, latency_input_tokens=cost.n_tokens,
            latency_input_vision=cost.n_vision, latency_input_kept_vision=cost.n_kept_vision, **capacity,
            select_ms=cost.select_ms, latency_signature=signature)

    def _capacity(self, config: PruningConfig | None, timed: WorkloadResult) -> dict[str, object]:
        """The record fields of the most requests `config` serves within the workload's memory budget."""
        kv_per_request = timed.batch_cost.kv_cache_bytes / timed.batch_size
        return max_concurrent_requests(self.loaded, self.tasks[0], config, self.latency,
                                       budget_bytes(self.latency.memory_budget_gb), kv_per_request).record_fields()
