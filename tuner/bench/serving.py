"""Serving benchmark: every latency objective of configurations next to the unpruned baseline, at each batch size,
from one command (`dart-tuner bench-serving`).

Per batch size B, one interleaved run (`tuner.measure.workload.measure_workload`) times every configuration on the
same B documents of the task, left-padded, each decoding exactly T tokens; the sheet prints each objective's median
with its IQR and its gain over the baseline timed in the same rounds.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tuner.config import PruningConfig
from tuner.config.workload import OBJECTIVES, Workload
from tuner.evaluation.tasks import PreparedTask
from tuner.measure.capacity import MEASURED, Capacity, budget_bytes, max_concurrent_requests
from tuner.measure.compare import BASELINE, InputsUnderSettings, latency_inputs
from tuner.measure.latency import Timing
from tuner.measure.workload import CUDA_MEMORY, WorkloadResult, measure_workload
from tuner.models.loading import LoadedModel
from tuner.results.tables import Column, Sheet

__all__ = ["ServingRun", "serving_runs", "serving_sheet"]


@dataclass(frozen=True)
class ServingRun:
    """One batch size's interleaved run: each configuration's result, the baseline first."""

    batch_size: int
    new_tokens: int
    repeats: int
    results: Mapping[str, WorkloadResult]
    capacity: Mapping[str, Capacity] | None = None  # with a memory budget: the requests each one fits


def serving_runs(loaded: LoadedModel, task: PreparedTask, configs: Mapping[str, PruningConfig | None],
                 batch_sizes: Sequence[int], *, new_tokens: int = 16, repeats: int = 5,
                 warmup: int = 1, memory_budget_gb: float | None = None) -> list[ServingRun]:
    """One interleaved run per batch size of the baseline and `configs`, on the task's first B documents; with
    `memory_budget_gb`, each configuration's capacity in that memory at the run's workload
    (`tuner.measure.capacity`)."""
    ordered: dict[str, PruningConfig | None] = {BASELINE: None, **{k: v for k, v in configs.items() if k != BASELINE}}
    single = latency_inputs(loaded, task)
    runs = []
    for batch in batch_sizes:
        workload = Workload(batch_size=batch, new_tokens=new_tokens, repeats=repeats, warmup=warmup)
        inputs = latency_inputs(loaded, task, batch) if batch > 1 else None
        results = measure_workload(loaded, single, inputs, ordered, workload,
                                   inputs_of=InputsUnderSettings(loaded, task, batch))
        capacity = None if memory_budget_gb is None else {
            name: max_concurrent_requests(loaded, task, ordered[name], workload, budget_bytes(memory_budget_gb),
                                          result.batch_cost.kv_cache_bytes / result.batch_size)
            for name, result in results.items()}
        runs.append(ServingRun(batch, new_tokens, repeats, results, capacity))
    return runs


def _series(result: WorkloadResult) -> dict[str, Sequence[float]]:
    """Each objective's per-round values."""
    return {"prefill_ms": result.single.prefill.samples_ms, "ttft_ms": result.batch.prefill.samples_ms,
            "e2e_ms": result.batch.total.samples_ms, "throughput": result.throughput}


def _cell(samples: Sequence[float], base: Sequence[float], name: str, baseline: bool) -> str:
    """'27.2 ±1.3' for the baseline, '15.8 ±0.9 1.72x' for a configuration (gain of medians, >1: better)."""
    median, iqr = statistics.median(samples), Timing(tuple(samples)).iqr_ms
    text = f"{median:.1f} ±{iqr:.1f}"
    if not baseline:
        text += f" {OBJECTIVES[name].gain(statistics.median(base), median):.2f}x"
    return text


def serving_sheet(runs: Sequence[ServingRun], title: str) -> Sheet:
    """One row per (batch size, configuration): the four objectives (median ±IQR, gain over the baseline of the
    same rounds), decode ms per token at that batch, and the memory at the workload with its source."""
    columns = [Column("batch", "B", "B"), Column("config", "configuration", "config", "left"),
               *(Column(name, o.heading(), o.heading().replace("time to first token", "TTFT"))
                 for name, o in OBJECTIVES.items()),
               Column("decode_ms_per_token", "decode ms/token"), Column("memory_mb", "memory MB")]
    budgeted = any(run.capacity for run in runs)
    if budgeted:
        columns.append(Column("max_concurrent_requests", "max requests", "max req"))
    sheet = Sheet(title, columns)
    for run in runs:
        base = _series(run.results[BASELINE])
        for name, result in run.results.items():
            series = _series(result)
            memory, source = result.memory()
            cells = [str(run.batch_size), name,
                     *(_cell(series[key], base[key], key, name == BASELINE) for key in OBJECTIVES),
                     f"{result.batch.decode.median_ms:.2f}",
                     f"{memory / 1e6:.3g}{'' if source == CUDA_MEMORY else ' kv'}"]
            values = {"batch_size": run.batch_size, "config": name, "new_tokens": run.new_tokens,
                      "repeats": run.repeats, **result.objectives(),
                      **{f"{key}_iqr": Timing(tuple(series[key])).iqr_ms for key in OBJECTIVES},
                      "decode_ms_per_token": result.batch.decode.median_ms, "memory_bytes": memory,
                      "memory_source": source}
            if budgeted:
                fit = run.capacity[name]
                cells.append(f"{fit.requests}{'' if fit.source == MEASURED else ' kv'}")
                values.update(fit.record_fields())
            sheet.add_row(cells, values)
    first = runs[0] if runs else None
    if first is not None:
        sheet.notes.append(f"median ±IQR of {first.repeats} interleaved rounds, every configuration decoding exactly "
                           f"{first.new_tokens} tokens per request; Nx: gain over the unpruned baseline of the same "
                           "rounds (>1 is better; throughput: times more tokens/s). prefill: 1 request; TTFT, "
                           "end-to-end, throughput and decode: B requests together, left-padded")
        sheet.notes.append("memory: CUDA's peak allocated bytes of the batch's generate; 'kv': analytic KV-cache "
                           "bytes after the T tokens (off CUDA)")
        if budgeted:
            budget = next(run.capacity for run in runs if run.capacity)[BASELINE].budget_bytes
            sheet.notes.append(f"max requests: the largest batch that fits in {budget / (1 << 30):g} GiB at this "
                               "workload, measured on CUDA; 'kv': weights + analytic KV cache, activations not "
                               "counted (off CUDA)")
    return sheet
