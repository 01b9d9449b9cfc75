"""Adaptive latency rounds: when the speed-up of paired, interleaved rounds is known well enough to stop timing.

The rule (torch-free, so a simulation can check it):
- the interval is the distribution-free order-statistic interval of the median of the per-round ratios
  baseline / candidate (`tuner.results.stats.median_rank`), widened to hold the speed-up shown;
- it is looked at only at rounds fixed before any round runs (`look_schedule`): look k spends
  alpha_k = alpha * 6 / (pi^2 k^2) and happens at the first round from `min_rounds` on where an order-statistic
  interval reaches 1 - alpha_k at all; the last round (`max_rounds`) is always a look, spending what is left;
- by the union bound, every look's interval holds the median at once with probability >= 1 - (the looks' summed
  miss probabilities) >= 1 - alpha, so the interval at any stopping time that reads them (`decide`) keeps that
  coverage. It assumes exchangeable rounds with continuous ratios, which interleaving (drift hits both alike) is for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from tuner.results.stats import median_coverage, median_rank

__all__ = ["ALPHA", "STOP_DOMINATED", "STOP_MAX", "STOP_TOLERANCE", "Look", "SequentialSpeedup", "look_schedule"]

ALPHA = 0.10  # the miss probability of the speed-up interval: the same 90% as fixed rounds' (`speedup_spread`)
STOP_TOLERANCE = "tolerance"  # the interval's relative half-width reached the tolerance
STOP_DOMINATED = "dominated"  # its upper end fell below a stored speed-up at no lower accuracy
STOP_MAX = "max"  # the last round (today's `repeats`) came first


@dataclass(frozen=True)
class Look:
    """One planned look: after `rounds` rounds, the order statistics of rank `rank` from either end."""

    rounds: int
    rank: int

    @property
    def miss(self) -> float:
        """The probability that this look's interval misses the median (exact, for continuous ratios)."""
        return 1.0 - median_coverage(self.rounds, self.rank)


def look_schedule(min_rounds: int, max_rounds: int, alpha: float = ALPHA) -> tuple[Look, ...]:
    """The looks of `SequentialSpeedup`, fixed before any round: look k at the first round >= `min_rounds` (after
    the previous look) whose order-statistic interval reaches 1 - alpha * 6 / (pi^2 k^2); the last round always."""
    if not 1 <= min_rounds <= max_rounds:
        raise ValueError(f"need 1 <= min_rounds <= max_rounds, got {min_rounds} and {max_rounds}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    looks: list[Look] = []
    for rounds in range(min_rounds, max_rounds):
        spend = alpha * 6 / (math.pi ** 2 * (len(looks) + 1) ** 2)
        if median_coverage(rounds, 1) >= 1 - spend:
            looks.append(Look(rounds, median_rank(rounds, 1 - spend)))
    left = alpha - sum(look.miss for look in looks)
    looks.append(Look(max_rounds, median_rank(max_rounds, 1 - left)))  # rank 1 (min..max) when even that falls short
    return tuple(looks)


@dataclass(frozen=True)
class SequentialSpeedup:
    """Stops paired rounds once the speed-up interval's half-width is within `tolerance` of the speed-up, or its
    upper end is below `to_beat` (a stored speed-up at no lower accuracy), or at `max_rounds`."""

    min_rounds: int
    max_rounds: int
    tolerance: float
    alpha: float = ALPHA
    looks: dict[int, Look] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.tolerance < 1:
            raise ValueError(f"tolerance must be in [0, 1), got {self.tolerance}")
        schedule = look_schedule(self.min_rounds, self.max_rounds, self.alpha)
        object.__setattr__(self, "looks", {look.rounds: look for look in schedule})

    @property
    def confidence(self) -> float:
        """The simultaneous coverage of every look's interval (>= 1 - alpha unless the last round falls short)."""
        return 1.0 - sum(look.miss for look in self.looks.values())

    def interval(self, ratios: Sequence[float], point: float) -> tuple[float, float]:
        """The look's interval after len(ratios) rounds (a planned look only), widened to hold `point`."""
        look = self.looks.get(len(ratios))
        if look is None:
            raise ValueError(f"round {len(ratios)} is not a planned look (looks at {sorted(self.looks)})")
        ordered = sorted(ratios)
        return min(ordered[look.rank - 1], point), max(ordered[len(ordered) - look.rank], point)

    def decide(self, ratios: Sequence[float], point: float, to_beat: float | None = None) -> str | None:
        """Why to stop after these rounds (STOP_DOMINATED, STOP_TOLERANCE, STOP_MAX), or None to run another."""
        if len(ratios) not in self.looks:
            return None
        low, high = self.interval(ratios, point)
        if to_beat is not None and high < to_beat:
            return STOP_DOMINATED
        if (high - low) / 2 <= self.tolerance * point:
            return STOP_TOLERANCE
        return STOP_MAX if len(ratios) >= self.max_rounds else None
