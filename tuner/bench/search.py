"""Search benchmark: hypervolume against trials and seconds for the grid, TPE, NSGA-II, GP and random, replayed
against a measured grid, with and without early stopping and the feature cache.

The hypervolume is the area a front dominates (accuracy up, prefill ms down) inside a fixed reference point: the
study's accuracy floor (its constraint, from the measured baseline) and the measured baseline's prefill ms. Only
feasible pruned configurations count: the baseline is the same for every sampler, and a point slower than the
unpruned model or below the floor adds nothing.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from optuna._hypervolume import compute_hypervolume  # private module, but the exact 2-D sweep (optuna>=5,<6)

from tuner.results.tables import Column, Sheet
from tuner.search.replay import MeasuredGrid, Step, replay
from tuner.search.space import SearchSpace

SAMPLERS = ("grid", "tpe", "nsga2", "gp", "random")
TARGET_FRACTION = 0.95  # of the full grid's hypervolume


def hypervolume_2d(points: Iterable[tuple[float, float]], reference: tuple[float, float]) -> float:
    """Area dominated by (accuracy, ms) points, maximising accuracy and minimising ms, bounded by `reference`
    (accuracy, ms); points at or beyond the reference on either axis add nothing."""
    ref_accuracy, ref_ms = reference
    # Optuna's exact hypervolume minimises every axis and refuses points beyond the reference: accuracy negated
    inside = [(-accuracy, ms) for accuracy, ms in points if accuracy > ref_accuracy and ms < ref_ms]
    if not inside:
        return 0.0
    return float(compute_hypervolume(np.array(inside), np.array([-ref_accuracy, ref_ms])))


def reference_point(grid: MeasuredGrid, floor: float) -> tuple[float, float]:
    """(the accuracy floor, the baseline's prefill ms) of the measured grid."""
    return floor, grid.baseline.prefill_ms


def grid_hypervolume(grid: MeasuredGrid, reference: tuple[float, float]) -> float:
    """The hypervolume of every feasible grid point: the most any sampler can reach."""
    return hypervolume_2d(((m.accuracy, m.prefill_ms) for m in grid.points.values() if m.feasible), reference)


@dataclass(frozen=True)
class Curve:
    """One replay: hypervolume after each complete configuration, and the seconds spent by then."""

    sampler: str
    seed: int
    n_configs: tuple[int, ...]
    seconds: tuple[float, ...]
    hypervolume: tuple[float, ...]

    def at_configs(self, n: int) -> float:
        """Hypervolume once `n` configurations are complete (the last value when the replay ended earlier)."""
        values = [hv for k, hv in zip(self.n_configs, self.hypervolume) if k <= n]
        return values[-1] if values else 0.0

    def at_seconds(self, budget: float) -> float:
        """Hypervolume of the configurations complete within `budget` seconds."""
        values = [hv for s, hv in zip(self.seconds, self.hypervolume) if s <= budget]
        return values[-1] if values else 0.0

    def first_reaching(self, target: float) -> tuple[int, float] | None:
        """(configurations, seconds) when the hypervolume first reaches `target`; None if never."""
        for k, s, hv in zip(self.n_configs, self.seconds, self.hypervolume):
            if hv >= target * (1 - 1e-12):
                return k, s
        return None


def curve_of(sampler: str, seed: int, steps: Sequence[Step], reference: tuple[float, float]) -> Curve:
    """The hypervolume after each replay step."""
    return Curve(sampler, seed, tuple(s.n_configs for s in steps), tuple(s.seconds for s in steps),
                 tuple(hypervolume_2d(s.points, reference) for s in steps))


def run_replays(space: SearchSpace, grid: MeasuredGrid, reference: tuple[float, float], samplers: Sequence[str],
                seeds: Sequence[int]) -> list[Curve]:
    """Every sampler over every seed, replayed against `grid`."""
    return [curve_of(name, seed, replay(space, grid, name, seed), reference) for name in samplers for seed in seeds]


@dataclass(frozen=True)
class Summary:
    """One sampler on one measured grid, over its seeds (means; `*_all` per seed)."""

    variant: str
    sampler: str
    full: float  # the grid's hypervolume (100%)
    fraction_at: dict[int, float]  # mean fraction of `full` after n configurations
    fraction_at_seconds: dict[float, float]  # mean fraction of `full` within s seconds
    configs_to_target: list[int | None]  # per seed: configurations to reach TARGET_FRACTION of `full`
    seconds_to_target: list[float | None]
    final_fraction: float
    seconds_total: float  # mean seconds when the replay ended


def summarise(variant: str, curves: Sequence[Curve], full: float, checkpoints: Sequence[int],
              second_marks: Sequence[float]) -> list[Summary]:
    """Per sampler: hypervolume fractions at the checkpoints (configurations, seconds) and time to the target."""
    out = []
    for sampler in dict.fromkeys(c.sampler for c in curves):
        mine = [c for c in curves if c.sampler == sampler]
        reached = [c.first_reaching(TARGET_FRACTION * full) for c in mine]
        out.append(Summary(
            variant, sampler, full,
            {n: statistics.fmean(c.at_configs(n) / full for c in mine) for n in checkpoints},
            {s: statistics.fmean(c.at_seconds(s) / full for c in mine) for s in second_marks},
            [r[0] if r else None for r in reached], [r[1] if r else None for r in reached],
            statistics.fmean(c.hypervolume[-1] / full for c in mine),
            statistics.fmean(c.seconds[-1] for c in mine)))
    return out


def checkpoints_for(n_points: int) -> list[int]:
    """Configuration counts to report: a quarter, a half and all of the grid (at least 1)."""
    return sorted({max(1, math.ceil(n_points * f)) for f in (0.25, 0.5, 1.0)})


def curve_rows(variant: str, curves: Sequence[Curve], full: float) -> list[dict]:
    """Every replay step as a flat row (for CSV and JSON)."""
    return [{"variant": variant, "sampler": c.sampler, "seed": c.seed, "n_configs": k, "seconds": round(s, 3),
             "hypervolume": hv, "fraction_of_grid": hv / full if full else math.nan}
            for c in curves for k, s, hv in zip(c.n_configs, c.seconds, c.hypervolume)]


def hypervolume_sheet(summaries: Sequence[Summary], checkpoints: Sequence[int], second_marks: Sequence[float], *,
                      n_points: int, seeds: int, reference: tuple[float, float]) -> Sheet:
    """The summaries as a table: % of the plain grid's hypervolume after n configurations and s seconds, and the
    configurations and seconds each seed took to reach the target (the seconds columns only with --wide)."""
    columns = [Column("grid", "grid", "grid", "left"), Column("sampler", "sampler", "sampler", "left"),
               *(Column(f"configs_{n}", f"{n} cfg", f"{n} cfg") for n in checkpoints),
               *(Column(f"seconds_{s:g}", f"{s:.0f} s") for s in second_marks),
               Column("configs_to_target", "cfg to 95%", "cfg to 95%"),
               Column("seconds_to_target", "s to 95%", "s to 95%"),
               Column("seconds_spent", "s spent")]
    sheet = Sheet(f"Hypervolume, % of the plain grid's, replayed against a measured grid ({n_points} points, {seeds} "
                  f"seeds; reference: accuracy {reference[0]:.3f}, prefill {reference[1]:.1f} ms)", columns)
    for s in summaries:
        seconds = [t for t in s.seconds_to_target if t is not None]
        sheet.add_row([s.variant, s.sampler, *(f"{100 * s.fraction_at[n]:.0f}" for n in checkpoints),
                       *(f"{100 * s.fraction_at_seconds[t]:.0f}" for t in second_marks),
                       "/".join("-" if k is None else str(k) for k in s.configs_to_target),
                       f"{sum(seconds) / len(seconds):.0f}" if seconds else "-", f"{s.seconds_total:.0f}"],
                      {"variant": s.variant, "sampler": s.sampler})
    return sheet
