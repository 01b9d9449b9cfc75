"""The serving workload a study is tuned for (torch-free): how many requests at once, how many tokens each decodes,
and which latency number is the study's second objective.

`prefill_ms` (one request's prefill, the tuner's first meaning) is the default, so spaces and studies written
before workloads keep their meaning. The other objectives are measured on `batch_size` requests prefilled and
decoded together, `new_tokens` each (`tuner.measure.workload`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_OBJECTIVE", "OBJECTIVES", "WORKLOAD_KEYS", "Objective", "Workload", "WorkloadError",
           "differences", "objective_named", "workload_from_dict", "workload_warning"]


class WorkloadError(ValueError):
    """A workload value that is not allowed; the message names it."""


@dataclass(frozen=True)
class Objective:
    """One latency objective: its stored name (the trial record field holding it), direction, unit and label."""

    name: str
    direction: str  # Optuna's: "minimize" or "maximize"
    unit: str
    label: str  # what tables call it

    @property
    def maximize(self) -> bool:
        return self.direction == "maximize"

    def cost(self, value: float) -> float:
        """The value turned into something lower-is-better (throughput negated), for sorting and fronts."""
        return -value if self.maximize else value

    def gain(self, baseline: float, value: float) -> float:
        """How many times better `value` is than `baseline` (>1: better), whichever its direction."""
        return value / baseline if self.maximize else baseline / value

    def heading(self) -> str:
        """'prefill ms', 'throughput tokens/s': a column heading with the unit."""
        return f"{self.label} {self.unit}"


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("prefill_ms", "minimize", "ms", "prefill"),
    Objective("ttft_ms", "minimize", "ms", "time to first token"),
    Objective("e2e_ms", "minimize", "ms", "end-to-end"),
    Objective("throughput", "maximize", "tokens/s", "throughput"),
)}
DEFAULT_OBJECTIVE = "prefill_ms"
WORKLOAD_KEYS = ("batch_size", "new_tokens", "objective", "repeats", "warmup", "tolerance", "min_repeats",
                 "memory_budget_gb", "share_timings", "kept_quantum")
SHARING = ("off", "study", "storage")  # where configurations of one latency signature share a timing
DEFAULT_TOLERANCE = 0.05  # adaptive rounds stop once the speed-up's interval is within 5% of it
DEFAULT_MIN_REPEATS = 3  # the fewest timed rounds before adaptive rounds may stop (capped at `repeats`)


def objective_named(name: str | None) -> Objective:
    """The objective of that name (None: the default); WorkloadError naming it and the allowed ones otherwise."""
    name = DEFAULT_OBJECTIVE if name is None else name
    if name not in OBJECTIVES:
        raise WorkloadError(f"latency.objective {name!r} is not one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


@dataclass(frozen=True)
class Workload:
    """Timing protocol and deployment shape: `batch_size` requests together, `new_tokens` decoded by each (forced),
    at most `repeats` timed interleaved rounds after `warmup` discarded ones (adaptive: stopped from `min_repeats` on
    once the objective's speed-up interval is within `tolerance` of it, `tuner.results.sequential`; tolerance 0 or
    min_repeats == repeats: always `repeats`); `objective` names the study's second objective.
    With `memory_budget_gb` (GiB), every trial also stores how many requests fit in that memory
    (`tuner.measure.capacity`)."""

    batch_size: int = 1
    new_tokens: int = 8
    objective: str = DEFAULT_OBJECTIVE
    repeats: int = 5
    warmup: int = 1
    tolerance: float = DEFAULT_TOLERANCE
    min_repeats: int | None = None  # None: DEFAULT_MIN_REPEATS, or `repeats` when that is fewer
    memory_budget_gb: float | None = None
    share_timings: str = "study"  # `SHARING` (`tuner.measure.shared_timing`)
    kept_quantum: int = 1  # kept counts within this many tokens share a timing (1: only equal ones)

    def __post_init__(self) -> None:
        for key, low in (("batch_size", 1), ("new_tokens", 2), ("repeats", 1), ("warmup", 0)):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                why = " (the first token is the prefill; decode needs one more)" if key == "new_tokens" else ""
                raise WorkloadError(f"latency.{key} must be an integer >= {low}{why}, got {value!r}")
        objective_named(self.objective)
        budget = self.memory_budget_gb
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int | float) or budget <= 0):
            raise WorkloadError(f"latency.memory_budget_gb must be a positive number of GiB, got {budget!r}")
        tolerance = self.tolerance
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 1:
            raise WorkloadError(f"latency.tolerance must be a number in [0, 1) (0: fixed rounds), got {tolerance!r}")
        if self.share_timings not in SHARING:
            raise WorkloadError(f"latency.share_timings {self.share_timings!r} is not one of {', '.join(SHARING)}")
        quantum = self.kept_quantum
        if not isinstance(quantum, int) or isinstance(quantum, bool) or quantum < 1:
            raise WorkloadError(f"latency.kept_quantum must be an integer >= 1 (1: only equal kept counts share a "
                                f"timing), got {quantum!r}")
        least = self.min_repeats
        if least is not None and (not isinstance(least, int) or isinstance(least, bool)
                                  or not 1 <= least <= self.repeats):
            raise WorkloadError(f"latency.min_repeats must be an integer from 1 to latency.repeats ({self.repeats}), "
                                f"got {least!r}")

    @property
    def min_rounds(self) -> int:
        """The fewest timed rounds of adaptive rounds: `min_repeats`, else DEFAULT_MIN_REPEATS capped at `repeats`."""
        return self.min_repeats if self.min_repeats is not None else min(DEFAULT_MIN_REPEATS, self.repeats)

    @property
    def adaptive(self) -> bool:
        """Whether rounds may stop before `repeats` (a tolerance, and room between the minimum and `repeats`)."""
        return self.tolerance > 0 and self.min_rounds < self.repeats

    @property
    def goal(self) -> Objective:
        return OBJECTIVES[self.objective]

    def shape(self) -> dict[str, Any]:
        """What a deployment is tuned for (stored with a study and a preset): batch, new tokens and objective."""
        return {"batch_size": self.batch_size, "new_tokens": self.new_tokens, "objective": self.objective}

    def describe(self) -> str:
        """'throughput at batch 8, 16 new tokens': the workload in a few words."""
        return f"{self.objective} at batch {self.batch_size}, {self.new_tokens} new tokens"


def workload_from_dict(data: Mapping[str, Any] | None, where: str = "latency") -> Workload:
    """A workload from a mapping (a space's `latency` section, a stored shape); one-line WorkloadError naming a
    key it does not know or a bad value."""
    data = dict(data or {})
    unknown = sorted(set(data) - set(WORKLOAD_KEYS))
    if unknown:
        raise WorkloadError(f"{where}.{unknown[0]} is not a workload key (allowed: {', '.join(WORKLOAD_KEYS)})")
    return Workload(**data)


def differences(tuned: Mapping[str, Any] | None, used: Workload,
                keys: tuple[str, ...] = ("batch_size", "new_tokens", "objective")) -> list[str]:
    """'batch_size 8 (tuned for 1)' for each of `keys` of the workload a preset or study was tuned for that `used`
    does not match; empty when it matches or `tuned` is unknown."""
    if not tuned:
        return []
    shape = used.shape()
    return [f"{key} {shape[key]} (tuned for {tuned[key]})" for key in keys if key in tuned and tuned[key] != shape[key]]


def workload_warning(provenance: Mapping[str, Any], used: Workload,
                     keys: tuple[str, ...] = ("batch_size", "new_tokens", "objective")) -> str | None:
    """The one-line warning for a preset used at another workload than it was tuned for (None when it matches or
    the preset does not say)."""
    lines = differences(provenance.get("workload"), used, keys)
    if not lines:
        return None
    where = f"study {provenance.get('study')!r} trial {provenance.get('trial')}"
    return (f"preset from {where} was tuned for another workload ({', '.join(lines)}); its latency gain may not "
            "hold at this one")
