"""Whether a search space still fits a stored study, checked before any model or task is loaded.

Optuna refuses to draw a parameter with a distribution that does not fit the one its earlier trials stored: a
list of values changed in any way (added, removed, reordered), a range turned into a list or back, a range made
log-uniform or not. It finds that only when a trial draws the parameter, after the model is loaded, and stores
the trial as failed. `space_changes` applies Optuna's own rule (`check_distribution_compatibility`) to every
parameter the space can draw, and to the values queued trials will be given, so `Tuner` refuses such a space in
one line instead. A changed numeric range (wider, narrower, moved) is what Optuna accepts, and so is a parameter
added or dropped.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable
from typing import Any, NamedTuple

import yaml
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    check_distribution_compatibility,
)
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from tuner.config.options import param_name
from tuner.search.params import BEFORE_LM_PREFIX, PDROP, FloatParam, IntParam, OptionParam, SpaceError
from tuner.search.space import SearchSpace

__all__ = ["Drawn", "SpaceChanged", "check_space_fits", "describe", "distribution_changes", "distribution_of",
           "free_study_name", "space_changes", "space_parameters", "stored_distributions"]

MAX_QUEUED_LINES = 3  # queued trials named in the refusal (the rest are counted)


class SpaceChanged(SpaceError):
    """The space draws a parameter in a way the stored study's trials rule out; the message names each change."""


class Drawn(NamedTuple):
    """One Optuna parameter a space can draw: the space key that defines it, and its distribution."""

    key: str
    distribution: BaseDistribution


def distribution_of(param: IntParam | FloatParam | OptionParam) -> BaseDistribution:
    """The distribution `param.suggest` hands Optuna: a list of values is categorical, a range is numeric."""
    if param.values is not None:
        return CategoricalDistribution(list(param.values))
    if isinstance(param, IntParam) or (isinstance(param, OptionParam) and param.kind is int):
        return IntDistribution(int(param.low), int(param.high), log=getattr(param, "log", False))
    return FloatDistribution(param.low, param.high, log=param.log)


def space_parameters(space: SearchSpace) -> dict[str, Drawn]:
    """Every Optuna parameter `space.suggest` can draw (in some trial, under any sampler), with its distribution."""
    drawn = {"method": Drawn("methods", CategoricalDistribution(list(space.methods)))}
    if any(method != PDROP for method in space.methods):
        drawn["layer"] = Drawn("layer", distribution_of(space.layer))
    for key, param in (("keep_ratio", space.keep_ratio), ("budget", space.budget)):
        if param is not None:
            drawn[key] = Drawn(key, distribution_of(param))
    drawn.update(_options(space.options, "", "options"))
    if space.schedule is not None:
        for i, layer in enumerate(space.schedule.layers):
            drawn[f"pdrop_layer_{i}"] = Drawn(f"schedule.layers[{i}]", distribution_of(layer))
        ratio = distribution_of(space.schedule.keep_ratio)
        names = (["pdrop_keep_ratio"] if space.schedule.shared else
                 [f"pdrop_keep_ratio_{i}" for i in range(len(space.schedule.layers))])
        drawn.update({name: Drawn("schedule.keep_ratio", ratio) for name in names})
    if space.before_lm is not None:
        drawn["before_lm_method"] = Drawn("before_lm.methods", CategoricalDistribution(list(space.before_lm.methods)))
        drawn["before_lm_keep_ratio"] = Drawn("before_lm.keep_ratio", distribution_of(space.before_lm.keep_ratio))
        drawn.update(_options(space.before_lm.options, BEFORE_LM_PREFIX, "before_lm.options"))
    return drawn


def _options(options: dict[str, dict[str, OptionParam]], prefix: str, key: str) -> dict[str, Drawn]:
    return {prefix + param_name(owner, name): Drawn(f"{key}.{owner}.{name}", distribution_of(param))
            for owner, params in options.items() for name, param in params.items()}


def describe(distribution: BaseDistribution) -> str:
    """A distribution as the space file writes it: `[a, b]` for a list, `{low: 1, high: 4}` for a range."""
    if isinstance(distribution, CategoricalDistribution):
        data: Any = list(distribution.choices)
    else:
        data = {"low": distribution.low, "high": distribution.high, **({"log": True} if distribution.log else {})}
    return yaml.safe_dump(data, default_flow_style=True, sort_keys=False, width=10**6).strip()


def _change(key: str, stored: BaseDistribution, current: BaseDistribution) -> str | None:
    """One line naming how `current` differs from `stored`, when Optuna would refuse to draw it; else None."""
    try:
        check_distribution_compatibility(stored, current)
    except ValueError:
        line = f"{key}: stored {describe(stored)}, space has {describe(current)}"
        if (isinstance(current, CategoricalDistribution) and isinstance(stored, CategoricalDistribution)
                and sorted(map(repr, stored.choices)) == sorted(map(repr, current.choices))):
            line += " (the same values in another order: list them in the stored order)"
        return line
    return None


def stored_distributions(trials: Iterable[FrozenTrial]) -> dict[str, BaseDistribution]:
    """The first stored distribution of each parameter: Optuna checks a new draw against one stored record, and
    every record of a parameter passed that check against the first."""
    stored: dict[str, BaseDistribution] = {}
    for trial in trials:
        for name, distribution in trial.distributions.items():
            stored.setdefault(name, distribution)
    return stored


def space_changes(trials: Iterable[FrozenTrial], parameters: dict[str, Drawn]) -> list[str]:
    """One line per parameter whose stored distribution Optuna would not let `parameters` draw again, then one per
    queued trial (up to MAX_QUEUED_LINES) holding a value the space cannot take; empty when the space fits."""
    trials = list(trials)
    return distribution_changes(stored_distributions(trials), [t for t in trials if t.state == TrialState.WAITING],
                                parameters)


def distribution_changes(stored: dict[str, BaseDistribution], queued: Iterable[FrozenTrial],
                         parameters: dict[str, Drawn]) -> list[str]:
    """`space_changes` from each parameter's stored distribution and the queued trials."""
    changes = [line for name, distribution in stored.items() if name in parameters
               if (line := _change(parameters[name].key, distribution, parameters[name].distribution))]
    refused = [line for trial in queued if (line := _queued_misfit(trial, parameters))]
    changes += refused[:MAX_QUEUED_LINES]
    if len(refused) > MAX_QUEUED_LINES:
        changes.append(f"{len(refused) - MAX_QUEUED_LINES} more queued trials")
    return changes


def _queued_misfit(trial: FrozenTrial, parameters: dict[str, Drawn]) -> str | None:
    """Why a queued trial's given values cannot be drawn from the space (a value no longer listed), if so."""
    for name, value in trial.system_attrs.get("fixed_params", {}).items():
        if name not in parameters:
            continue
        drawn = parameters[name]
        try:
            drawn.distribution.to_internal_repr(value)
        except (ValueError, TypeError):
            return f"queued trial {trial.number} has {name}={value}, not in the space's {drawn.key} " \
                   f"{describe(drawn.distribution)}"
    return None


def check_space_fits(storage: BaseStorage, study_name: str, space: SearchSpace, url: str) -> None:
    """SpaceChanged, in one line naming every change and a free study name, when `space` cannot resume the stored
    study `study_name`; nothing when the study is new or the space fits it."""
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return
    parameters = space_parameters(space)
    if hasattr(storage, "param_distributions"):  # tuning storages read the distributions in one query
        queued = storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,))
        changes = distribution_changes(storage.param_distributions(study_id), queued, parameters)
    else:
        changes = space_changes(storage.get_all_trials(study_id, deepcopy=False), parameters)
    if changes:
        free = free_study_name(study_name, (s.study_name for s in storage.get_all_studies()))
        raise SpaceChanged(f"{space.source}: study {study_name!r} in {url} was tuned over another search space: "
                           f"{'; '.join(changes)}. Resume it with the space it was tuned with, or start a new study "
                           f"with --study {shlex.quote(free)}")


def free_study_name(name: str, taken: Iterable[str]) -> str:
    """`name`-2, -3, ...: the first that no stored study has."""
    names = set(taken)
    return next(f"{name}-{i}" for i in range(2, len(names) + 3) if f"{name}-{i}" not in names)
