"""Shared latency measurements: configurations whose prefill does the same work reuse one timing.

Two configurations time the same when the latency inputs (processor settings included), the workload, the stack
(model, device, dtype, attention, library versions) and the pruning's shape are the same: the layer of every stage
that drops tokens and the vision tokens it keeps in each row (a stage that keeps all it got, `keep_all` at any
layer, does the unpruned work). Their prefills then differ only by the selection's own cost, which
is measured separately on one untimed prefill (`probe`) and must agree with the stored one within
`SELECT_AGREEMENT` of its prefill, or the configuration is timed itself. The signature is a digest of all of it;
a trial stores its own and, when it reused one, which trial it came from (`latency_reused_from`).

`kept_quantum` rounds kept counts to a multiple of it inside the signature only (the configuration still keeps
what it keeps): configurations within a quantum of each other then share a timing, an approximation the
space opts into (`latency.kept_quantum`), off at 1.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import BatchFeature

from tuner.config import PruningConfig
from tuner.config.environment import environment
from tuner.config.workload import Workload
from tuner.models.loading import LoadedModel
from tuner.models.processor_budget import processor_settings
from tuner.pruning import apply_pruning
from tuner.results.record import TrialRecord
from tuner.results.sequential import STOP_MAX, STOP_TOLERANCE

SELECT_AGREEMENT = 0.01  # selection costs within 1% of the stored prefill: the reused timing stands
REUSABLE_STOPS = (None, STOP_TOLERANCE, STOP_MAX)  # rounds that ended on their own (None: fixed rounds)
# The record fields one timing of a configuration gives (the latency, its spread and the cost on the latency
# inputs); everything else in a record is the configuration's own (accuracy, its evidence, the cache, ...).
TIMING_FIELDS = (
    "prefill_ms", "prefill_iqr_ms", "prefill_repeats", "latency_stop", "latency_confidence",
    "latency_speedup_to_beat", "prefill_ms_low", "prefill_ms_high", "prefill_ms_coverage", "decode_ms_per_token",
    "decode_iqr_ms", "end_to_end_ms", "peak_memory_bytes", "baseline_prefill_ms_same_run", "speedup_same_run",
    "speedup_low", "speedup_high", "latency_noisy", "latency_warning", "objective", "workload_batch_size",
    "workload_new_tokens", "ttft_ms", "ttft_iqr_ms", "ttft_ms_low", "ttft_ms_high", "e2e_ms", "e2e_iqr_ms",
    "e2e_ms_low", "e2e_ms_high", "throughput", "throughput_iqr", "throughput_low", "throughput_high",
    "decode_batch_ms_per_token", "decode_batch_iqr_ms", "baseline_objective_same_run", "memory_bytes",
    "memory_source", "max_concurrent_requests", "max_concurrent_source", "memory_budget_bytes", "prefill_flops",
    "kv_cache_bytes", "flops_ratio", "latency_input_tokens", "latency_input_vision", "latency_input_kept_vision",
)

# Looks up a stored trial of this signature: its record and where it is ("trial 12", "study s, trial 12").
TimingLookup = Callable[[str], "tuple[TrialRecord, str] | None"]


@dataclass(frozen=True)
class Probe:
    """One untimed prefill of a configuration on each latency input: the layers of its stages, what each stage
    kept per row, and the selection's own time (ms, every stage, the single request's prefill)."""

    layers: tuple[int, ...]
    kept_single: tuple[tuple[int, ...], ...]
    kept_batch: tuple[tuple[int, ...], ...]
    select_ms: float
    vision_single: tuple[int, ...] = ()  # the vision tokens of each row before pruning
    vision_batch: tuple[int, ...] = ()


def probe(loaded: LoadedModel, config: PruningConfig, single: BatchFeature, batch: BatchFeature | None) -> Probe:
    """Prefill `config` once on each latency input under its processor settings (no timing), reading its shape."""
    kept: list[tuple[tuple[int, ...], ...]] = []
    vision: list[tuple[int, ...]] = []
    select_ms = 0.0
    with torch.no_grad(), processor_settings(loaded, config.processor):
        for inputs in (single, batch):
            if inputs is None:
                kept.append(())
                vision.append(())
                continue
            with apply_pruning(loaded.model, config) as handle:
                loaded.model.generate(**inputs, max_new_tokens=1, do_sample=False)
            request = handle.requests[0]
            kept.append(tuple(tuple(stage) for stage in request.stage_kept_vision))
            vision.append(tuple(request.n_vision))
            if inputs is single:
                select_ms = request.select_ms
    layers = (config.layer, *(stage.layer for stage in config.stages))
    return Probe(layers, kept[0], kept[1], select_ms, vision[0], vision[1])


def _digest(inputs: BatchFeature | None) -> str | None:
    """The prompt a latency input holds (its token ids and mask), so other documents never share a timing."""
    if inputs is None:
        return None
    h = hashlib.sha256()
    for key in ("input_ids", "attention_mask"):
        h.update(inputs[key].detach().cpu().numpy().tobytes())
    h.update(str(tuple(inputs["input_ids"].shape)).encode())
    return h.hexdigest()[:16]


def latency_signature(loaded: LoadedModel, config: PruningConfig, shape: Probe, workload: Workload,
                      single: BatchFeature, batch: BatchFeature | None, *, kept_quantum: int = 1) -> str:
    """The digest of everything a configuration's timing depends on but its selection (module docstring)."""
    versions = environment()

    def pruning(kept: tuple[tuple[int, ...], ...], vision: tuple[int, ...]) -> list[list]:
        """[layer, kept per row] of the stages that drop tokens (one keeping all it got does the unpruned work)."""
        stages, before = [], tuple(vision)
        for layer, stage in zip(shape.layers, kept):
            if tuple(stage) != before:
                stages.append([layer, [kept_quantum * round(n / kept_quantum) for n in stage]])
            before = tuple(stage)
        return stages
    described = {"stack": {**loaded.provenance(), "revision": loaded.revision,
                           **{key: versions.get(key) for key in ("torch", "transformers", "cuda", "cpu_threads")}},
                 "workload": {key: value for key, value in dataclasses.asdict(workload).items()
                              if key != "share_timings"}, "inputs": [_digest(single), _digest(batch)],
                 "processor": config.processor, "quantum": kept_quantum,
                 "stages": [pruning(shape.kept_single, shape.vision_single),
                            pruning(shape.kept_batch, shape.vision_batch)]}
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:32]


def ended_on_its_own(latency_stop: str | None) -> bool:
    """Whether a trial's rounds ended on their own interval or count (`REUSABLE_STOPS`), not because its accuracy or
    another trial decided them: only such a timing stands for another configuration."""
    return latency_stop in REUSABLE_STOPS


def reusable(earlier: TrialRecord, own_select_ms: float) -> bool:
    """Whether a stored timing stands for this configuration: its rounds ended on their own interval, and the two
    selections cost the same within `SELECT_AGREEMENT` of its prefill."""
    if earlier.prefill_ms is None or not ended_on_its_own(earlier.latency_stop):
        return False
    earlier_select = earlier.select_ms if earlier.select_ms is not None else 0.0
    return abs(own_select_ms - earlier_select) <= SELECT_AGREEMENT * earlier.prefill_ms


def timing_fields(earlier: TrialRecord) -> dict[str, Any]:
    """The stored trial's timing, as the record fields a reusing trial takes over."""
    return {name: getattr(earlier, name) for name in TIMING_FIELDS}
