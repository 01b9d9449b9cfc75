"""How many requests fit in a memory budget: pruning's other gain in serving is more requests per accelerator.

A configuration's capacity is the largest batch whose generate at the workload (prefill plus exactly T decoded
tokens each, weights included) stays within the budget. On CUDA it is measured: batches double until one does
not fit (its peak allocated bytes exceed the budget, or it runs out of memory), then a bisection finds the edge.
Elsewhere it is analytic: (budget - weight bytes) // KV-cache bytes per request at the workload; activations are
not counted, so it is an upper bound. The record says which (`source`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tuner.config import PruningConfig
from tuner.config.workload import Workload
from tuner.evaluation.tasks import PreparedTask
from tuner.measure.compare import _RecordingSetup, latency_inputs
from tuner.measure.latency import _timed_generate
from tuner.models.loading import LoadedModel
from tuner.models.processor_budget import processor_settings

__all__ = ["ANALYTIC", "MAX_REQUESTS", "MEASURED", "Capacity", "analytic_capacity", "budget_bytes",
           "largest_fitting", "max_concurrent_requests", "weight_bytes"]

MEASURED = "cuda_measured"  # the largest batch whose generate peaked within the budget
ANALYTIC = "analytic_weights_kv"  # (budget - weights) // KV bytes per request; activations not counted
MAX_REQUESTS = 4096  # the search stops here: a capacity of MAX_REQUESTS means "at least"
_GIB = 1 << 30


@dataclass(frozen=True)
class Capacity:
    """The most requests one configuration serves at once within `budget_bytes`, and how that was found."""

    requests: int  # 0: not even one request fits
    source: str  # MEASURED or ANALYTIC
    budget_bytes: int

    def record_fields(self) -> dict[str, Any]:
        """The trial record fields (`tuner.results.record.TrialRecord`)."""
        return {"max_concurrent_requests": self.requests, "max_concurrent_source": self.source,
                "memory_budget_bytes": self.budget_bytes}


def budget_bytes(gib: float) -> int:
    """A budget in GiB (2**30 bytes, what torch and most GPU tools report) as bytes; ValueError naming it if not
    positive."""
    if isinstance(gib, bool) or not isinstance(gib, int | float) or not gib > 0:
        raise ValueError(f"memory budget must be a positive number of GiB, got {gib!r}")
    return int(gib * _GIB)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers (each counted once)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def analytic_capacity(weights: int, kv_per_request: float, budget: int) -> int:
    """Requests whose KV cache fits next to the weights: (budget - weights) // KV bytes per request, at most
    MAX_REQUESTS (0 when the weights alone exceed the budget)."""
    if kv_per_request <= 0:
        raise ValueError(f"KV-cache bytes per request must be positive, got {kv_per_request}")
    return int(min(MAX_REQUESTS, max(0, (budget - weights) // kv_per_request)))


def largest_fitting(fits: Callable[[int], bool], limit: int = MAX_REQUESTS) -> int:
    """The largest n in [1, limit] with fits(n), for a `fits` that is true up to some n and false after (0 when
    fits(1) is false): doubling, then bisection, so about 2 log2(n) probes."""
    if not fits(1):
        return 0
    good = 1
    while good < limit:
        probe = min(2 * good, limit)
        if not fits(probe):
            bad = probe
            break
        good = probe
    else:
        return good
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    return good


def _measured_fit(loaded: LoadedModel, task: PreparedTask, config: PruningConfig | None, workload: Workload,
                  budget: int) -> Callable[[int], bool]:
    """fits(n): one generate of n requests (the task's documents, repeated past the subset's end) under `config`,
    exactly T tokens each, peaking at most `budget` allocated bytes on the model's CUDA device."""
    setup = _RecordingSetup(loaded.model, config)

    def fits(n: int) -> bool:
        try:
            with processor_settings(loaded, config.processor if config else None):
                inputs = latency_inputs(loaded, task, n, repeat=True)
                with setup():
                    run = _timed_generate(loaded.model, inputs, workload.new_tokens, loaded.device)
            return run.peak_memory_bytes is not None and run.peak_memory_bytes <= budget
        except torch.cuda.OutOfMemoryError:  # too big: give its blocks back before the next, smaller probe
            torch.cuda.empty_cache()
            return False
    return fits


def max_concurrent_requests(loaded: LoadedModel, task: PreparedTask, config: PruningConfig | None,
                            workload: Workload, budget: int, kv_per_request: float) -> Capacity:
    """The configuration's capacity within `budget` bytes at the workload: measured on CUDA, else analytic from
    `kv_per_request` (the workload batch's analytic KV bytes per request, `tuner.measure.workload`)."""
    if loaded.device.type == "cuda" and torch.cuda.is_available():
        requests = largest_fitting(_measured_fit(loaded, task, config, workload, budget))
        return Capacity(requests, MEASURED, budget)
    return Capacity(analytic_capacity(weight_bytes(loaded.model), kv_per_request, budget), ANALYTIC, budget)
