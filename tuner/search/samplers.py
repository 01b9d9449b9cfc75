"""Samplers for a search space: the Optuna class the space names, seeded per trial so workers never repeat each
other."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from tuner.search.space import SAMPLER_CLASSES, SearchSpace, SpaceError

TPE_DEFAULT_STARTUP = 10  # optuna.samplers.TPESampler's n_startup_trials


def make_sampler(space: SearchSpace) -> optuna.samplers.BaseSampler:
    """The sampler the space names, with its options passed through, seeded per trial (`TrialSeededSampler`).

    The grid sampler keeps the space's seed: it shuffles the grid with it, so every worker must share it. Two
    workers that take the same grid point at once are caught by the duplicate check (`Tuner.allow_repeats`).
    """
    if space.sampler.name == "grid":
        return _build_sampler(space, space.sampler.seed)
    return TrialSeededSampler(lambda seed: _build_sampler(space, seed), space.sampler.seed)


def startup_trials(budget: int | None) -> int:
    """TPE's random start-up for a budget of `budget` complete trials: a fifth of it, at least 3 and at most
    Optuna's default of 10 (which an unbounded budget keeps). A fixed 10 spends a 20-trial budget half at random;
    fewer than 3 gives TPE's two densities almost nothing to split."""
    if budget is None:
        return TPE_DEFAULT_STARTUP
    return max(3, min(TPE_DEFAULT_STARTUP, budget // 5))


def _build_sampler(space: SearchSpace, seed: int | None) -> optuna.samplers.BaseSampler:
    spec = space.sampler
    options = dict(spec.options)
    if spec.name == "tpe":
        options.setdefault("multivariate", True)
        options.setdefault("group", True)  # pivots exist only for DART trials
        options.setdefault("n_startup_trials", startup_trials(space.trials))  # the space's own setting wins
    grid = (space.grid(),) if spec.name == "grid" else ()
    try:
        return SAMPLER_CLASSES[spec.name](*grid, seed=seed, **options)
    except TypeError as error:
        raise SpaceError(f"{space.source}: sampler.options: {error}") from error


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """An Optuna sampler rebuilt for every trial with a seed drawn from (the space's seed, the trial number).

    Optuna's samplers keep their state in the storage, except for the random generator. With one seed per worker,
    workers that start together (or a restarted one) draw the same configurations. Trial numbers are unique across
    workers, so this gives every trial its own stream, and a study is still reproducible from its seed.
    """

    def __init__(self, build: Callable[[int | None], optuna.samplers.BaseSampler], seed: int | None) -> None:
        self._build, self._seed = build, seed
        self._first = build(seed)  # fails now on bad options, before any trial
        self._open: dict[int, optuna.samplers.BaseSampler] = {}  # by trial number, while the trial runs

    def _for(self, trial: FrozenTrial) -> optuna.samplers.BaseSampler:
        if trial.number not in self._open:
            seed = None if self._seed is None else int(
                np.random.SeedSequence([self._seed, trial.number]).generate_state(1)[0])
            self._open[trial.number] = self._build(seed)
        return self._open[trial.number]

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._for(trial).before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
        sampler = self._for(trial)
        return sampler.infer_relative_search_space(_model_view(study, sampler), trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, Any]) -> dict:
        sampler = self._for(trial)
        return sampler.sample_relative(_model_view(study, sampler), trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: Any) -> Any:
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self._for(trial).after_trial(study, trial, state, values)
        self._open.pop(trial.number, None)

    def reseed_rng(self) -> None:
        for sampler in [self._first, *self._open.values()]:
            sampler.reseed_rng()




def _model_view(study: optuna.Study, sampler: optuna.samplers.BaseSampler) -> Any:
    """The study as a model-based sampler should see it: without trials that have no parameters.

    The unpruned baseline (trial 0) has no parameters. GP, NSGA-II and CMA-ES model only the parameters every
    complete trial shares, so with the baseline in view that intersection is empty and they sample every
    parameter at random (found by `bench-search`). TPE handles a dynamic space itself (`group=True`) and counts
    its start-up trials over the whole study, so it sees the study as it is.
    """
    return study if isinstance(sampler, optuna.samplers.TPESampler) else _ParameterisedTrials(study)


class _ParameterisedTrials:
    """A read view of a study whose trial lists leave out trials without parameters (everything else delegates)."""

    def __init__(self, study: optuna.Study) -> None:
        self._study = study

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    @property
    def trials(self) -> list[FrozenTrial]:
        return self.get_trials()

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list[FrozenTrial]:
        return [t for t in self._study.get_trials(deepcopy=deepcopy, states=states) if t.params]

    def _get_trials(self, deepcopy: bool = True, states: Any = None, use_cache: bool = False) -> list[FrozenTrial]:
        return [t for t in self._study._get_trials(deepcopy=deepcopy, states=states, use_cache=use_cache) if t.params]
