"""Latency measurement: warm-up, synchronised timing, repeats, median and IQR, configurations interleaved.

Every configuration is timed once per round and the order rotates between rounds, so a slow spell of
the machine hits all configurations alike instead of one block of them.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    """Repeated measurements of one configuration, in milliseconds."""

    samples_ms: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def iqr_ms(self) -> float:
        """Interquartile range: the spread that ignores the occasional stall of a shared machine."""
        if len(self.samples_ms) < 2:
            return 0.0
        q1, _, q3 = statistics.quantiles(self.samples_ms, n=4, method="inclusive")
        return q3 - q1

    @property
    def repeats(self) -> int:
        return len(self.samples_ms)


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for queued GPU work so a wall-clock reading covers it (no-op on CPU)."""
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device | str | None = None) -> float:
    """Milliseconds of one call, synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1000.0


def measure_interleaved(
    fn: Callable[[], object],
    setups: Mapping[str, Callable[[], AbstractContextManager] | None],
    *,
    repeats: int = 7,
    warmup: int = 2,
    device: torch.device | str | None = None,
) -> dict[str, Timing]:
    """Time `fn` under each named setup (a context manager factory, or None for "as is"), interleaved.

    Each round enters every setup once, in an order rotated by one per round; warm-up rounds are
    discarded. The same `fn` (same inputs) runs under every setup.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    names = list(setups)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            setup = setups[name]
            with setup() if setup is not None else nullcontext():
                elapsed = time_once(fn, device)
            if round_index >= warmup:
                samples[name].append(elapsed)
    return {name: Timing(tuple(values)) for name, values in samples.items()}
