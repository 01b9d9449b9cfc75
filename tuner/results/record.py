"""One trial's stored user attributes as a typed record (torch-free): the one place their names are spelled.

`TrialRecord.to_attrs()` is what a worker stores with Optuna; `TrialRecord.from_trial()` reads any stored trial
back, also one written before this record existed (record schema 0: same names, no `record_schema` attribute).
A trial stored by a newer dart-tuner (a higher `record_schema`) is refused in one line; attributes this version
does not know are kept in `unknown` and written back unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from optuna.trial import FrozenTrial

from tuner.config import PruningConfig
from tuner.config.schema import CONFIG_SCHEMA_ATTR, config_attrs, config_from_data
from tuner.config.workload import Objective
from tuner.errors import DartTunerError

RECORD_SCHEMA = 1  # the record schema this dart-tuner writes; trials without RECORD_SCHEMA_ATTR are schema 0
DIRECTIONS = ("maximize", "minimize")  # a default study's objectives, in order: accuracy up, prefill ms down
OBJECTIVES = ("accuracy", "prefill_ms")  # the second follows the workload's (`tuner.config.workload`)

# Trial user attributes that other modules name (every other one is a TrialRecord field of the same name).
RECORD_SCHEMA_ATTR = "record_schema"
CONFIG_ATTR = "config"
ROLE_ATTR = "role"  # enqueued special trials: "baseline" or "paper_default"
STOPPED_ATTR = "stopped_early"  # a trial stopped early by the accuracy floor (True), with `stop_reason`
SAMPLE_TASKS_ATTR = "sample_tasks"  # [[task, count], ...]: the task of each entry of `samples`, in order
FAILURE_ATTR = "failure"  # why a trial failed, in one line
FAILURE_TYPE_ATTR = "failure_type"  # the exception type of a failed trial
DUPLICATE_OF_ATTR = "duplicate_of"  # a pruned trial whose configuration that complete trial already holds
REQUEUED_FROM_ATTR = "requeued_from"  # a trial queued again after an interrupt: the interrupted trial's number

# Study user attributes.
BASELINE_ATTR = "baseline"  # {"trial", "accuracy", "prefill_ms", "decode_ms_per_token"} of the baseline trial
CONFIRMATION_ATTR = "confirmation"  # written by `tuner.search.confirm`: {"trials": {"7": {...}}, ...}
PROVENANCE_ATTR = "provenance"
OBJECTIVES_ATTR = "objectives"  # ["accuracy", the latency objective's name]; trial values are in this order
WORKLOAD_ATTR = "workload"  # {"batch_size", "new_tokens", "objective"} the study is tuned for (none: prefill_ms)

BASELINE_ROLE = "baseline"
PAPER_DEFAULT_ROLE = "paper_default"


class RecordSchemaError(DartTunerError, ValueError):
    """A trial stored with a record schema this dart-tuner does not read (a newer one)."""


@dataclass(frozen=True)
class TrialRecord:
    """Everything a trial stores about itself; None (or False) for what it did not store. Field names are the
    stored attribute names. `confirmed` is not a trial attribute: it comes from the study's confirmation run."""

    config: PruningConfig | None = None
    role: str | None = None
    # how the trial ended before or without a measurement
    failure: str | None = None
    failure_type: str | None = None
    duplicate_of: int | None = None
    requeued_from: int | None = None
    # accuracy on the search subset
    accuracy: float | None = None
    metrics: Mapping[str, Any] | None = None
    n_samples: int | None = None
    accuracy_by_category: Mapping[str, float] | None = None
    samples: list[list[Any]] | None = None  # [doc index, score, kept vision tokens] per scored document
    sample_tasks: list[list[Any]] | None = None
    eval_seconds: float | None = None
    kept_vision_mean: float | None = None
    kept_vision_min: float | None = None
    kept_vision_max: float | None = None
    vision_mean: float | None = None  # vision tokens the processor made of a document, before pruning
    keep_ratio_achieved: float | None = None
    stage_kept_vision_mean: list[float] | None = None
    # its uncertainty (`tuner.results.evidence`)
    accuracy_low: float | None = None
    accuracy_high: float | None = None
    accuracy_interval: str | None = None
    accuracy_confidence: float | None = None
    accuracy_diff: float | None = None
    accuracy_diff_low: float | None = None
    accuracy_diff_high: float | None = None
    accuracy_diff_method: str | None = None
    mcnemar_p: float | None = None
    discordant_improved: int | None = None
    discordant_worsened: int | None = None
    n_paired: int | None = None
    # stopped early: the accuracy reported is the best it could still reach
    stopped_early: bool = False
    stop_reason: str | None = None
    accuracy_partial: float | None = None
    accuracy_upper_bound: float | None = None
    stop_rule: str | None = None  # what stopped it: "exact", "confident", or either + "-dominated" (a faster point)
    # latency, interleaved with the baseline in the same rounds (`tuner.measure.latency`)
    prefill_ms: float | None = None
    prefill_iqr_ms: float | None = None
    prefill_repeats: int | None = None  # interleaved latency rounds
    latency_seconds: float | None = None  # wall time of the latency rounds (the baseline's own, in them, included)
    # shared latency measurements (`tuner.measure.shared_timing`)
    latency_signature: str | None = None  # digest of what the timing depends on but the selection
    latency_reused_from: str | None = None  # "trial 12" / "study s, trial 12": whose timing this trial took over
    select_ms: float | None = None  # the selection's own time in the single request's prefill (median when timed)
    # adaptive rounds (`tuner.results.sequential`; None: fixed rounds): why they stopped after `prefill_repeats`
    latency_stop: str | None = None  # "tolerance", "dominated" (below latency_speedup_to_beat), "max", or "stopped"
    # (the accuracy stopped early below the floor: one round)
    latency_confidence: float | None = None  # simultaneous coverage of speedup_low..high at any stopping round
    latency_speedup_to_beat: float | None = None  # the best stored speed-up at no lower accuracy, when one was
    prefill_ms_low: float | None = None
    prefill_ms_high: float | None = None
    prefill_ms_coverage: float | None = None
    decode_ms_per_token: float | None = None
    decode_iqr_ms: float | None = None
    end_to_end_ms: float | None = None
    peak_memory_bytes: int | None = None
    baseline_prefill_ms_same_run: float | None = None
    speedup_same_run: float | None = None
    speedup_low: float | None = None
    speedup_high: float | None = None
    latency_noisy: bool | None = None
    latency_warning: str | None = None
    # the serving workload, timed in the same rounds (`tuner.measure.workload`); speedup_* above are of `objective`
    objective: str | None = None  # the study's latency objective (None: prefill_ms, a trial from before workloads)
    workload_batch_size: int | None = None
    workload_new_tokens: int | None = None
    ttft_ms: float | None = None  # B requests prefilled together: time to their first token
    ttft_iqr_ms: float | None = None
    ttft_ms_low: float | None = None
    ttft_ms_high: float | None = None
    e2e_ms: float | None = None  # B requests together, T tokens each: what each request waits
    e2e_iqr_ms: float | None = None
    e2e_ms_low: float | None = None
    e2e_ms_high: float | None = None
    throughput: float | None = None  # output tokens per second at batch B
    throughput_iqr: float | None = None
    throughput_low: float | None = None
    throughput_high: float | None = None
    decode_batch_ms_per_token: float | None = None  # ms per decode step at batch B (the KV cache pruning shrinks)
    decode_batch_iqr_ms: float | None = None
    baseline_objective_same_run: float | None = None  # the baseline's objective in the trial's rounds
    memory_bytes: int | None = None  # prefill plus KV cache at the workload, of `memory_source`
    memory_source: str | None = None  # "cuda_max_allocated" (measured) or "analytic_kv_cache"
    max_concurrent_requests: int | None = None  # requests served at once within the memory budget
    max_concurrent_source: str | None = None  # "cuda_measured" or "analytic_weights_kv" (`tuner.measure.capacity`)
    memory_budget_bytes: int | None = None  # the budget it was found for (`latency.memory_budget_gb`)
    # analytic cost on the latency prompt (`tuner.models.cost`)
    prefill_flops: float | None = None
    kv_cache_bytes: int | None = None
    flops_ratio: float | None = None
    latency_input_tokens: int | None = None
    latency_input_vision: int | None = None  # the processor's vision tokens on it, before pruning
    latency_input_kept_vision: int | None = None
    # this worker's feature cache during the trial (`tuner.models.feature_cache.CacheStats`)
    feature_cache_hits: int | None = None
    feature_cache_misses: int | None = None
    feature_cache_evictions: int | None = None
    feature_cache_bypassed: int | None = None
    feature_cache_entries: int | None = None
    feature_cache_bytes: int | None = None
    # read, not stored with the trial
    confirmed: Mapping[str, Any] | None = None
    unknown: Mapping[str, Any] = field(default_factory=dict)  # attributes of a newer version, kept as read

    @property
    def is_baseline(self) -> bool:
        return self.role == BASELINE_ROLE

    def to_attrs(self) -> dict[str, Any]:
        """The trial user attributes Optuna stores: the configuration and record schema always, every other field
        only when set."""
        attrs: dict[str, Any] = dict(self.unknown)
        for name, value in self._stored_fields():
            if value != FIELD_DEFAULTS[name]:
                attrs[name] = value
        attrs.update(config_attrs(self.config))
        attrs[RECORD_SCHEMA_ATTR] = RECORD_SCHEMA
        return attrs

    def _stored_fields(self) -> list[tuple[str, Any]]:
        return [(name, getattr(self, name)) for name in STORED_FIELDS]

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any], *, number: int | None = None,
                   confirmation: Mapping[str, Any] | None = None) -> TrialRecord:
        """The record of stored user attributes (`number` names the trial in errors); `confirmation` is the
        study's `confirmation` attribute, from which the trial's confirmed numbers are taken."""
        where = "a trial" if number is None else f"trial {number}"
        schema = attrs.get(RECORD_SCHEMA_ATTR, 0)
        if not isinstance(schema, int) or isinstance(schema, bool) or not 0 <= schema <= RECORD_SCHEMA:
            raise RecordSchemaError(f"{where} was stored with trial record schema {schema!r}; this dart-tuner reads "
                                    f"0 to {RECORD_SCHEMA}: upgrade dart-tuner to read this study")
        data = attrs.get(CONFIG_ATTR)
        try:
            config = config_from_data(data, attrs.get(CONFIG_SCHEMA_ATTR, 1)) if data else None
        except (TypeError, ValueError) as error:
            raise RecordSchemaError(f"{where}: its stored configuration does not read: {error}") from None
        known = {name: attrs[name] for name in STORED_FIELDS if name in attrs and attrs[name] is not None}
        unknown = {key: value for key, value in attrs.items() if key not in KNOWN_ATTRS}
        numbers = ((confirmation or {}).get("trials") or {}).get(str(number)) if number is not None else None
        return cls(config=config, **known, confirmed=numbers, unknown=unknown)

    @classmethod
    def from_trial(cls, trial: FrozenTrial, confirmation: Mapping[str, Any] | None = None) -> TrialRecord:
        """The record of a stored trial (see `from_attrs`)."""
        return cls.from_attrs(trial.user_attrs, number=trial.number, confirmation=confirmation)

    def interval(self, name: str) -> tuple[Any, Any]:
        """The stored (low, high) of 'accuracy', 'accuracy_diff', 'speedup' or a latency objective ('prefill_ms',
        'ttft_ms', 'e2e_ms', 'throughput'); None where unset."""
        return getattr(self, f"{name}_low"), getattr(self, f"{name}_high")


def objective_value(record: TrialRecord, goal: Objective) -> float:
    """The record's value of a latency objective (its field of the same name); ValueError when it was not
    measured (a trial stored before workloads, for an objective other than prefill_ms)."""
    value = getattr(record, goal.name)
    if value is None:
        raise ValueError(f"the trial record holds no {goal.name} (measured before workloads existed)")
    return float(value)


_NOT_STORED = ("config", "confirmed", "unknown")
STORED_FIELDS = tuple(f.name for f in dataclasses.fields(TrialRecord) if f.name not in _NOT_STORED)
FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrialRecord) if f.name in STORED_FIELDS}
KNOWN_ATTRS = frozenset({*STORED_FIELDS, CONFIG_ATTR, CONFIG_SCHEMA_ATTR, RECORD_SCHEMA_ATTR})
