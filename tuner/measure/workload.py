"""What serving pays: one request's prefill and the workload's batch (B requests of the task, left-padded as in
evaluation, decoding exactly T tokens each), timed for every configuration in the same interleaved rounds.

Per configuration it yields today's single-request `GenerationTiming`, the batch's, the four objectives of
`tuner.config.workload` with their spread, decode ms per token at batch B, and the memory of prefill plus KV
cache at the workload: CUDA's `max_memory_allocated` on CUDA, else analytic KV-cache bytes (which one is stored).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from transformers import BatchFeature

from tuner.config import PruningConfig
from tuner.config.workload import Workload
from tuner.measure.compare import CostOnInputs, _RecordingSetup, cost_on_inputs, vision_counts
from tuner.measure.latency import GenerationTiming, Timing, _run_interleaved, _summarise, _timed_generate
from tuner.models.loading import LoadedModel
from tuner.models.processor_budget import processor_settings
from tuner.results.stats import median_interval

__all__ = ["CUDA_MEMORY", "KV_MEMORY", "RECORD_FIELDS", "SPEEDUP_TIMING", "Inputs", "InputsOf", "WorkloadResult",
           "measure_workload"]

# The timing each objective's speed-up is judged on (throughput's is e2e's: every configuration decodes B * T):
# (the single request's or the batch's run, its prefill or its total).
SPEEDUP_TIMING = {"prefill_ms": ("single", "prefill"), "ttft_ms": ("batch", "prefill"),
                  "e2e_ms": ("batch", "total"), "throughput": ("batch", "total")}
_RUN_FIELD = {"prefill": "prefill_ms", "total": "total_ms"}

CUDA_MEMORY = "cuda_max_allocated"  # measured: peak allocated bytes over the batch's generate (weights included)
KV_MEMORY = "analytic_kv_cache"  # analytic: KV-cache bytes of the batch after its T tokens (weights excluded)
RECORD_FIELDS = ("objective", "workload_batch_size", "workload_new_tokens", "ttft_ms", "ttft_iqr_ms", "ttft_ms_low",
                 "ttft_ms_high", "e2e_ms", "e2e_iqr_ms", "e2e_ms_low", "e2e_ms_high", "throughput", "throughput_iqr",
                 "throughput_low", "throughput_high", "decode_batch_ms_per_token", "decode_batch_iqr_ms",
                 "memory_bytes", "memory_source")  # what `WorkloadResult.record_fields` sets


@dataclass(frozen=True)
class WorkloadResult:
    """One configuration at the workload: its single-request timing and cost (today's prefill), and its batch's."""

    single: GenerationTiming  # one request: prefill_ms, decode ms per token and end-to-end at batch 1
    cost: CostOnInputs  # analytic cost of the single request
    batch: GenerationTiming  # B requests together (the single run itself when B == 1)
    batch_cost: CostOnInputs  # analytic cost of the batch, its KV bytes after the T decoded tokens
    batch_size: int

    @property
    def throughput(self) -> tuple[float, ...]:
        """Output tokens per second of the batch in each round: B * T over the batch's generate time."""
        tokens = self.batch_size * self.batch.new_tokens
        return tuple(tokens * 1000.0 / total for total in self.batch.total.samples_ms)

    def memory(self) -> tuple[int, str]:
        """(bytes, source): the batch's measured peak on CUDA, else its analytic KV-cache bytes."""
        if self.batch.peak_memory_bytes is not None:
            return self.batch.peak_memory_bytes, CUDA_MEMORY
        return self.batch_cost.kv_cache_bytes, KV_MEMORY

    def objectives(self) -> dict[str, float]:
        """The median of every objective: prefill_ms, ttft_ms, e2e_ms and throughput."""
        return {"prefill_ms": self.single.prefill.median_ms, "ttft_ms": self.batch.prefill.median_ms,
                "e2e_ms": self.batch.total.median_ms, "throughput": statistics.median(self.throughput)}

    def record_fields(self, workload: Workload) -> dict[str, Any]:
        """The trial record fields of the workload (`tuner.results.record.TrialRecord`): each objective with its
        IQR and median interval, decode ms per token at batch B, the memory and where it came from."""
        fields: dict[str, Any] = {"objective": workload.objective, "workload_batch_size": self.batch_size,
                                  "workload_new_tokens": self.batch.new_tokens}
        series = {"ttft_ms": self.batch.prefill.samples_ms, "e2e_ms": self.batch.total.samples_ms,
                  "throughput": self.throughput}
        for name, samples in series.items():
            low, high, _coverage = median_interval(samples)
            iqr_key = "throughput_iqr" if name == "throughput" else f"{name.removesuffix('_ms')}_iqr_ms"
            fields.update({name: statistics.median(samples), iqr_key: Timing(tuple(samples)).iqr_ms,
                           f"{name}_low": low, f"{name}_high": high})
        memory, source = self.memory()
        fields.update({"decode_batch_ms_per_token": self.batch.decode.median_ms,
                       "decode_batch_iqr_ms": self.batch.decode.iqr_ms, "memory_bytes": memory,
                       "memory_source": source})
        return fields


Inputs = tuple[BatchFeature, BatchFeature | None]  # (the single request, the batch; None when B == 1)
InputsOf = Callable[[PruningConfig], Inputs]  # the same documents processed under a configuration's processor settings


def measure_workload(loaded: LoadedModel, single: BatchFeature, batch: BatchFeature | None,
                     configs: Mapping[str, PruningConfig | None], workload: Workload, *,
                     inputs_of: InputsOf | None = None,
                     until: Callable[[Mapping[str, Sequence[float]]], bool] | None = None) -> dict[str, WorkloadResult]:
    """Every configuration on the same documents, interleaved: each round runs, under each configuration in turn,
    one greedy generate of exactly T tokens on `single` and then one on `batch` (skipped when None: B == 1, where
    the single request is the batch). A configuration with processor settings runs on the same documents
    processed under them (`inputs_of`). Warm-up rounds are discarded; every run is synchronised. `until`, given
    each configuration's ms of the objective's timing (`SPEEDUP_TIMING`) after every timed round, ends them when
    True (at most `workload.repeats`)."""
    setups = {name: _RecordingSetup(loaded.model, config) for name, config in configs.items()}
    inputs = {name: _inputs_for(config, (single, batch), inputs_of, name) for name, config in configs.items()}
    device, tokens = loaded.device, workload.new_tokens
    active: list[Inputs] = []

    @contextmanager
    def running(name: str) -> Iterator[None]:  # LLaVA's tower follows its image size only while the settings hold
        active[:] = [inputs[name]]
        config = setups[name].config
        with processor_settings(loaded, config.processor if config else None), setups[name]():
            yield

    def one_round() -> tuple[Any, Any]:
        one, many = active[0]
        first = _timed_generate(loaded.model, one, tokens, device)
        return first, first if many is None else _timed_generate(loaded.model, many, tokens, device)

    run, part = SPEEDUP_TIMING[workload.objective]
    index, field = (0 if run == "single" else 1), _RUN_FIELD[part]

    def enough(timed: Mapping[str, list[Any]]) -> bool:
        return until is not None and until({name: [getattr(p[index], field) for p in pairs]
                                            for name, pairs in timed.items()})

    factories = {name: (lambda name=name: running(name)) for name in setups}
    runs = _run_interleaved(factories, one_round, repeats=workload.repeats, warmup=workload.warmup,
                            until=enough if until is not None else None)
    out = {}
    for name, setup in setups.items():
        single, batch = inputs[name]
        batch_inputs = single if batch is None else batch
        all_single, all_batch = vision_counts(loaded, single), vision_counts(loaded, batch_inputs)
        stages = len(setup.config.layers) if setup.config else 1
        kept = setup.kept if setup.kept is not None else [all_single] * stages
        last = setup.last_kept if setup.last_kept is not None else [all_batch] * stages
        cost = cost_on_inputs(loaded, single, setup.config, kept)
        if setup.select_ms:
            cost = replace(cost, select_ms=statistics.median(setup.select_ms))
        batch_cost = cost_on_inputs(loaded, batch_inputs, setup.config, kept if batch is None else last,
                                    decoded=tokens - 1)  # the last token is sampled, never cached
        pairs = runs[name]
        out[name] = WorkloadResult(single=_summarise([p[0] for p in pairs], tokens), cost=cost,
                                   batch=_summarise([p[1] for p in pairs], tokens), batch_cost=batch_cost,
                                   batch_size=int(batch_inputs["input_ids"].shape[0]))
    return out


def _inputs_for(config: PruningConfig | None, default: Inputs, inputs_of: InputsOf | None, name: str) -> Inputs:
    """The inputs `config` is timed on: the default ones, or the documents under its processor settings."""
    if config is None or not config.processor:
        return default
    if inputs_of is None:
        raise ValueError(f"configuration {name!r} sets processor settings ({config.processor}); timing it needs the "
                         "documents processed under them (inputs_of)")
    return inputs_of(config)
