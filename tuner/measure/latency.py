"""Latency measurement: warm-up, synchronised timing, repeats, median and IQR, configurations interleaved.

Every configuration is timed once per round and the order rotates between rounds, so a slow spell of
the machine hits all configurations alike instead of one block of them.

`speedup_spread` says how far a speed-up taken from such paired rounds can be trusted.

Generation latency (`measure_generation_interleaved`) splits each greedy `generate()` into prefill (time to
the first token) and decode (ms per later token) with a clock that `generate` calls once per step.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from tuner.results.stats import median_rank

_T = TypeVar("_T")


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


# -- how far a speed-up can be trusted ---------------------------------------------------------------------------

CONFIDENCE = 0.90  # least coverage of the speed-up interval (distribution-free, for the median per-round ratio)
MIN_ROUNDS = 5  # fewest rounds whose min..max interval reaches CONFIDENCE: 1 - 2 / 2**5 = 93.75%
SPREAD_LIMIT = 0.5  # an IQR at least half its median: the rounds spread as much as the value they estimate
CLAIM_MARGIN = 1.1  # a speed-up within 10% of 1.00x claims no change (docs/evaluation.md's run-to-run drift on 2 cores)


@dataclass(frozen=True)
class SpeedupSpread:
    """A speed-up (baseline median / candidate median), its interval, and whether the spread hides it."""

    speedup: float
    low: float
    high: float
    noisy: bool
    warning: str  # why it is noisy, in a few words; "" when it is not

    def to_attrs(self) -> dict[str, Any]:
        """The trial user attributes and preset metrics that carry it."""
        return {"speedup_low": self.low, "speedup_high": self.high, "latency_noisy": self.noisy,
                "latency_warning": self.warning}


def speedup_spread(baseline: Timing, candidate: Timing, what: str = "prefill", *,
                   rank: int | None = None) -> SpeedupSpread:
    """The speed-up of `candidate` over `baseline`, timed in the same interleaved rounds, and how sure it is.

    Interval: the order statistics x_(k), x_(n-k+1) of the per-round ratios baseline/candidate, a distribution-free
    interval holding their median with at least CONFIDENCE (min..max below MIN_ROUNDS rounds), widened to include
    the speed-up shown (the ratio of the medians) so it never excludes the number it qualifies; with `rank`, the
    order statistics of that rank instead (adaptive rounds' planned look, `tuner.results.sequential`). Noisy: fewer
    than MIN_ROUNDS rounds, either timing's (`what`: prefill by default) IQR at least SPREAD_LIMIT of its median, or
    an interval that holds 1.0 although the speed-up is CLAIM_MARGIN or more away from it.
    """
    if baseline.repeats != candidate.repeats or baseline.repeats < 1:
        raise ValueError(f"paired timings need the same number of rounds, got {baseline.repeats} and "
                         f"{candidate.repeats}")
    ratios = sorted(b / c for b, c in zip(baseline.samples_ms, candidate.samples_ms))
    n = len(ratios)
    rank = median_rank(n, CONFIDENCE) if rank is None else rank
    point = baseline.median_ms / candidate.median_ms
    low, high = min(ratios[rank - 1], point), max(ratios[n - rank], point)
    reasons = []
    if n < MIN_ROUNDS:
        reasons.append(f"only {n} timed round{'s' if n != 1 else ''} ({MIN_ROUNDS} are needed to bound the speed-up)")
    for name, timing in (("candidate", candidate), ("baseline", baseline)):
        if timing.iqr_ms >= SPREAD_LIMIT * timing.median_ms:
            reasons.append(f"the {name}'s {what} IQR ({timing.iqr_ms:.1f} ms) is "
                           f"{timing.iqr_ms / timing.median_ms:.0%} of its median ({timing.median_ms:.1f} ms)")
    if low <= 1.0 <= high and not 1 / CLAIM_MARGIN < point < CLAIM_MARGIN:
        reasons.append(f"its interval {low:.2f}-{high:.2f}x holds 1.00x")
    return SpeedupSpread(speedup=point, low=low, high=high, noisy=bool(reasons), warning="; ".join(reasons))


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
    samples = _run_interleaved(setups, lambda: time_once(fn, device), repeats=repeats, warmup=warmup)
    return {name: Timing(tuple(values)) for name, values in samples.items()}


def _run_interleaved(setups: Mapping[str, Callable[[], AbstractContextManager] | None], measure: Callable[[], _T],
                     *, repeats: int, warmup: int,
                     until: Callable[[Mapping[str, list[_T]]], bool] | None = None) -> dict[str, list[_T]]:
    """`measure()` under each named setup once per round, the order rotated per round; warm-up rounds dropped.
    `until`, given the timed results so far after each complete timed round, ends the rounds early when True."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if not setups:
        raise ValueError("setups must name at least one configuration")
    names = list(setups)
    results: dict[str, list[_T]] = {name: [] for name in names}
    for round_index, name in _interleaved(names, warmup + repeats):
        setup = setups[name]
        with setup() if setup is not None else nullcontext():
            value = measure()
        if round_index >= warmup:
            results[name].append(value)
            complete = all(len(values) == round_index - warmup + 1 for values in results.values())
            if complete and until is not None and until(results):
                break
    return results


def _interleaved(names: Sequence[str], rounds: int) -> Iterator[tuple[int, str]]:
    """(round, name) for every name in every round, the order rotated by one per round, so drift hits all alike."""
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in list(names[shift:]) + list(names[:shift]):
            yield round_index, name


# -- generation: prefill and decode ----------------------------------------------------------------


@dataclass(frozen=True)
class GenerationTiming:
    """Prefill and decode latency of one configuration over repeated generate() calls."""

    prefill: Timing  # time to first token: from entering generate() to the first step's logits, ms
    decode: Timing  # ms per generated token after the first (mean over each run's decode steps)
    total: Timing  # end-to-end generate() ms
    new_tokens: int
    peak_memory_bytes: int | None  # CUDA only (max over the timed runs); None on CPU

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able summary with the raw samples, for reports and result files."""
        return {
            "prefill_ms_median": self.prefill.median_ms,
            "prefill_ms_iqr": self.prefill.iqr_ms,
            "decode_ms_per_token_median": self.decode.median_ms,
            "decode_ms_per_token_iqr": self.decode.iqr_ms,
            "total_ms_median": self.total.median_ms,
            "total_ms_iqr": self.total.iqr_ms,
            "repeats": self.prefill.repeats,
            "new_tokens": self.new_tokens,
            "peak_memory_bytes": self.peak_memory_bytes,
            "prefill_ms_samples": list(self.prefill.samples_ms),
            "decode_ms_per_token_samples": list(self.decode.samples_ms),
            "total_ms_samples": list(self.total.samples_ms),
        }


class _StepClock(LogitsProcessor):
    """Timestamps `generate`'s steps: called once per step right after its forward, returns the scores unchanged.

    On CUDA it records events on the device's current stream (no host synchronisation per step, so the
    timing does not change what it measures); elsewhere it reads `time.perf_counter()`.
    """

    def __init__(self, device: torch.device, expected_marks: int) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self._events = [torch.cuda.Event(enable_timing=True) for _ in range(expected_marks)] if self.cuda else []
        self._marks: list[Any] = []

    def mark(self) -> None:
        """Record one timestamp (the start, a step, or the end)."""
        if self.cuda:
            event = self._events[len(self._marks)] if len(self._marks) < len(self._events) \
                else torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            self._marks.append(event)
        else:
            self._marks.append(time.perf_counter())

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.mark()
        return scores

    def elapsed_ms(self) -> list[float]:
        """Milliseconds from the first mark to every mark; on CUDA call only after synchronising."""
        first = self._marks[0]
        if self.cuda:
            return [first.elapsed_time(event) for event in self._marks]
        return [(mark - first) * 1000.0 for mark in self._marks]


@dataclass(frozen=True)
class _GenerationRun:
    """One timed generate: the public numbers plus the number of steps the clock saw (for checks and tests)."""

    prefill_ms: float
    decode_ms_per_token: float
    total_ms: float
    peak_memory_bytes: int | None
    steps: int


def _resolve_device(model: torch.nn.Module, device: torch.device | str | None) -> torch.device:
    """The device to time on: the one given, else the model's (so a CUDA model is never timed without events)."""
    if device is not None:
        return torch.device(device)
    model_device = getattr(model, "device", None)
    if isinstance(model_device, torch.device):
        return model_device
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _check_new_tokens(new_tokens: int) -> None:
    """Decode latency needs at least one step after the first token."""
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2 (the first token is the prefill), got {new_tokens}")


def _timed_generate(model: Any, inputs: Mapping[str, Any], new_tokens: int,
                    device: torch.device | str | None) -> _GenerationRun:
    """One greedy generate of exactly `new_tokens` tokens, timed per step by a `_StepClock`."""
    _check_new_tokens(new_tokens)
    timing_device = _resolve_device(model, device)
    cuda = timing_device.type == "cuda" and torch.cuda.is_available()
    clock = _StepClock(timing_device if cuda else torch.device("cpu"), new_tokens + 2)
    synchronize(timing_device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(timing_device)
    clock.mark()
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       num_beams=1, use_cache=True, logits_processor=LogitsProcessorList([clock]))
    clock.mark()
    synchronize(timing_device)
    peak = int(torch.cuda.max_memory_allocated(timing_device)) if cuda else None
    times = clock.elapsed_ms()  # [start=0, step 1, ..., step n, end]
    steps = len(times) - 2
    if steps != new_tokens:
        raise RuntimeError(f"generate ran {steps} steps instead of new_tokens={new_tokens}; "
                           "a stopping criterion of the model's generation config cut it short")
    return _GenerationRun(prefill_ms=times[1], decode_ms_per_token=(times[-2] - times[1]) / (new_tokens - 1),
                          total_ms=times[-1], peak_memory_bytes=peak, steps=steps)


def time_generate(model: Any, inputs: Mapping[str, Any], *, new_tokens: int,
                  device: torch.device | str | None = None) -> tuple[float, float, float, int | None]:
    """One greedy generate of exactly `new_tokens` tokens: (prefill_ms, decode_ms_per_token, total_ms, peak bytes).

    `do_sample=False`, `num_beams=1` and `max_new_tokens=min_new_tokens=new_tokens` are passed explicitly, so
    neither EOS nor the model's own generation config changes the number of steps. `device` defaults to the
    model's; on CUDA the steps are timed with events and the peak allocated memory is returned (None on CPU).
    """
    run = _timed_generate(model, inputs, new_tokens, device)
    return run.prefill_ms, run.decode_ms_per_token, run.total_ms, run.peak_memory_bytes


def measure_generation_interleaved(
    model: Any,
    inputs: Mapping[str, Any],
    setups: Mapping[str, Callable[[], AbstractContextManager] | None],
    *,
    new_tokens: int = 8,
    repeats: int = 5,
    warmup: int = 1,
    device: torch.device | str | None = None,
) -> dict[str, GenerationTiming]:
    """Prefill/decode latency of greedy generation under each named setup, interleaved like `measure_interleaved`.

    Each round enters every setup once (a fresh context manager per run, or none for "as is"), in an order
    rotated by one per round; warm-up rounds are discarded. Each run is one `time_generate` call.
    """
    _check_new_tokens(new_tokens)
    runs = _run_interleaved(setups, lambda: _timed_generate(model, inputs, new_tokens, device), repeats=repeats,
                            warmup=warmup)
    return {name: _summarise(name_runs, new_tokens) for name, name_runs in runs.items()}


def _summarise(runs: Sequence[_GenerationRun], new_tokens: int) -> GenerationTiming:
    """Collect one setup's timed runs into a `GenerationTiming` (peak memory: the max, or None if unmeasured)."""
    peaks = [run.peak_memory_bytes for run in runs]
    return GenerationTiming(
        prefill=Timing(tuple(run.prefill_ms for run in runs)),
        decode=Timing(tuple(run.decode_ms_per_token for run in runs)),
        total=Timing(tuple(run.total_ms for run in runs)),
        new_tokens=new_tokens,
        peak_memory_bytes=None if any(p is None for p in peaks) else max(p for p in peaks if p is not None),
    )
