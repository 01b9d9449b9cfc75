"""Replaying a sampler against a measured grid: the sampler proposes, a stored table answers.

Every grid point's accuracy, prefill ms, constraint values and cost in seconds come from a study that measured the
whole grid through the normal `Tuner` path. A replayed study runs the same Optuna loop as `Tuner.run` (the space's
`suggest`, the sampler built by `make_sampler`, the baseline and DART's paper setting queued first, a configuration
already complete pruned as a duplicate at no cost, `RepeatGuard`, `MaxTrialsCallback`), but its objective looks the
configuration up instead of measuring it, and charges the stored seconds.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

from tuner.config import PruningConfig
from tuner.config.options import param_name
from tuner.config.workload import DEFAULT_OBJECTIVE, objective_named
from tuner.errors import DartTunerError
from tuner.results import config_of, is_baseline, study_objective
from tuner.results.evidence import stored_scores
from tuner.results.record import (
    BASELINE_ROLE,
    DUPLICATE_OF_ATTR,
    PAPER_DEFAULT_ROLE,
    ROLE_ATTR,
    TrialRecord,
)
from tuner.search.guards import RepeatGuard
from tuner.search.samplers import make_sampler
from tuner.search.space import SamplerSpec, SearchSpace


class ReplayError(DartTunerError, ValueError):
    """A measured grid that cannot answer a replay (a configuration it lacks, no baseline)."""


@dataclass(frozen=True)
class Measured:
    """One measured trial: its objectives, constraint values (feasible when all <= 0) and what it cost."""

    accuracy: float
    prefill_ms: float  # the study's second objective value: prefill ms unless the grid's `objective` says otherwise
    constraints: Mapping[str, float]
    stopped: bool
    trial_seconds: float  # start to end of the trial: evaluation, latency and bookkeeping
    eval_seconds: float  # the accuracy evaluation alone
    documents: int = 0  # documents scored (fewer than the subset when stopped early)
    latency_seconds: float = 0.0  # the interleaved latency rounds (0: a trial stored before this was recorded)
    latency_rounds: int = 0
    scores: tuple[tuple[str, int, float], ...] = ()  # (task, doc index, score) per document, in evaluation order

    @property
    def feasible(self) -> bool:
        """Feasible by the study's own rule (Optuna's: every constraint <= 0); a stopped trial never is."""
        return not self.stopped and all(value <= 0 for value in self.constraints.values())


@dataclass(frozen=True)
class MeasuredGrid:
    """A study that measured every grid point once: the baseline and one `Measured` per configuration."""

    baseline: Measured
    points: Mapping[str, Measured]  # by `config_key`
    objective: str = DEFAULT_OBJECTIVE  # the measured study's latency objective: the replay's second direction

    def seconds(self) -> tuple[float, float]:
        """(trial seconds, accuracy-evaluation seconds) of the whole grid, baseline included."""
        rows = [self.baseline, *self.points.values()]
        return sum(m.trial_seconds for m in rows), sum(m.eval_seconds for m in rows)

    def latency(self) -> tuple[float, int]:
        """(latency seconds, latency rounds) of the whole grid, baseline included: where the rest of the time goes."""
        rows = [self.baseline, *self.points.values()]
        return sum(m.latency_seconds for m in rows), sum(m.latency_rounds for m in rows)

    def documents(self) -> int:
        """Documents scored over the whole grid, baseline included (independent of the machine's load)."""
        return self.baseline.documents + sum(m.documents for m in self.points.values())


def config_key(config: PruningConfig) -> str:
    """A configuration as a dictionary key (PruningConfig holds a dict, so it does not hash)."""
    return json.dumps(config.to_dict(), sort_keys=True)


def grid_configs(space: SearchSpace) -> list[PruningConfig]:
    """Every distinct configuration of the space's grid (a method's options matter only for that method)."""
    grid = space.grid()
    amount = "keep_ratio" if "keep_ratio" in grid else "budget"
    configs = {}
    for method, layer, value in itertools.product(grid["method"], grid["layer"], grid[amount]):
        names = list(space.options.get(method, {}))
        for values in itertools.product(*(grid[param_name(method, name)] for name in names)):
            config = PruningConfig(method=method, layer=layer, **{amount: value}, options=dict(zip(names, values)))
            configs.setdefault(config_key(config), config)
    return list(configs.values())


def grid_params(space: SearchSpace, config: PruningConfig) -> dict[str, Any]:
    """A configuration as the grid sampler's trial parameters: every parameter of the grid, the other methods'
    options at their first grid value."""
    grid = space.grid()
    amount = {"keep_ratio": config.keep_ratio} if config.keep_ratio is not None else {"budget": config.budget}
    params: dict[str, Any] = {"method": config.method, "layer": config.layer, **amount}
    for owner, options in space.options.items():
        for name in options:
            key = param_name(owner, name)
            params[key] = config.options[name] if owner == config.method else grid[key][0]
    return params


def measured_of(trial: FrozenTrial) -> Measured:
    """A complete trial's stored numbers."""
    record = TrialRecord.from_trial(trial)
    return Measured(accuracy=trial.values[0], prefill_ms=trial.values[1], constraints=dict(trial.constraints),
                    stopped=record.stopped_early,
                    trial_seconds=trial.duration.total_seconds() if trial.duration else 0.0,
                    eval_seconds=float(record.eval_seconds or 0.0), documents=int(record.n_samples or 0),
                    latency_seconds=float(record.latency_seconds or 0.0),
                    latency_rounds=0 if record.latency_reused_from else int(record.prefill_repeats or 0),
                    scores=tuple(stored_scores(record) or ()))  # a shared timing ran no rounds of its own


def measured_grid(study: optuna.Study) -> MeasuredGrid:
    """The complete trials of a grid study by configuration (the first of any repeats)."""
    baseline: Measured | None = None
    points: dict[str, Measured] = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if is_baseline(trial):
            baseline = baseline or measured_of(trial)
        else:
            points.setdefault(config_key(config_of(trial)), measured_of(trial))
    if baseline is None:
        raise ReplayError(f"study {study.study_name!r} holds no complete baseline trial")
    return MeasuredGrid(baseline, points, study_objective(study).name)


@dataclass(frozen=True)
class Step:
    """The replayed study after one more complete configuration: how many, the seconds spent, and its points."""

    n_configs: int
    seconds: float
    points: tuple[tuple[float, float], ...]  # (accuracy, prefill ms) of the feasible configurations so far


def replay(space: SearchSpace, grid: MeasuredGrid, sampler: str, seed: int, *,
           on_step: Callable[[Step], None] | None = None) -> list[Step]:
    """Run `sampler` (seeded `seed`) over `space` as `Tuner.run` would, answered from `grid`, until every grid
    point is complete or `RepeatGuard` ends it. Step 0 is the baseline (its seconds charged, not a configuration)."""
    options = space.sampler.options if space.sampler.name == sampler else {}  # a space's own, for its sampler
    space = dataclasses.replace(space.with_sampler(sampler), sampler=SamplerSpec(sampler, seed, options))
    directions = ["maximize", objective_named(grid.objective).direction]  # the measured study's, not a default
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage(), directions=directions,
                                sampler=make_sampler(space))
    study.enqueue_trial({}, user_attrs={ROLE_ATTR: BASELINE_ROLE})
    for paper in space.paper_defaults():
        study.enqueue_trial(paper, user_attrs={ROLE_ATTR: PAPER_DEFAULT_ROLE})
    seen: dict[str, int] = {}  # configuration key -> the complete trial that holds it
    steps: list[Step] = []
    spent = [0.0]
    points: list[tuple[float, float]] = []

    def objective(trial: Trial) -> tuple[float, float]:
        config = None if trial.user_attrs.get(ROLE_ATTR) == BASELINE_ROLE else space.suggest(trial)
        key = None if config is None else config_key(config)
        if key in seen:  # Tuner._measure_trial: pruned as a duplicate, nothing measured, nothing charged
            trial.set_user_attr(DUPLICATE_OF_ATTR, seen[key])
            raise optuna.TrialPruned(f"trial {seen[key]} already measured this configuration")
        if key is not None and key not in grid.points:
            raise ReplayError(f"the measured grid has no trial for {config.to_dict()}; measure the grid again")
        measured = grid.baseline if key is None else grid.points[key]
        for name, value in TrialRecord(config=config, stopped_early=measured.stopped).to_attrs().items():
            trial.set_user_attr(name, value)
        for key, value in measured.constraints.items():
            trial.set_constraint(key, value)
        spent[0] += measured.trial_seconds
        return measured.accuracy, measured.prefill_ms

    def record(study_: optuna.Study, trial: FrozenTrial) -> None:
        if trial.state != TrialState.COMPLETE:
            return
        config = config_of(trial)
        if config is not None:
            seen[config_key(config)] = trial.number
            if grid.points[config_key(config)].feasible:
                points.append((trial.values[0], trial.values[1]))
        steps.append(Step(len(seen), spent[0], tuple(points)))
        if on_step is not None:
            on_step(steps[-1])

    n_trials = len(grid_configs(space)) + 1  # Tuner.run's target for the whole grid: the baseline and every point
    study.optimize(objective, n_trials=n_trials * 4, gc_after_trial=False,
                   callbacks=[record, RepeatGuard(), optuna.study.MaxTrialsCallback(
                       n_trials, states=(TrialState.COMPLETE,))])
    return steps
