"""The space's `processor` section: the processor's own vision-token settings, searched together with pruning and
stacked under it (each trial's configuration carries the drawn settings in `PruningConfig.processor`).

    processor:
      image_size: [64, 96, 128]                       # a list of values
      max_pixels: {low: 50176, high: 802816, log: true}   # or a range: low, high, optional step or log

The names are the processor's own (`tuner.models.processor_budget`); whether the model's family has them is
checked once the model is loaded (`check_processor_space`), where every value is also applied once.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tuner.config import PruningConfig
from tuner.models.loading import LoadedModel
from tuner.models.processor_budget import processor_settings
from tuner.search.params import Reader, SpaceError

__all__ = ["PROCESSOR_PREFIX", "ProcessorParam", "ProcessorSpec", "check_processor_space", "parse_processor"]

PROCESSOR_PREFIX = "processor."  # the Optuna parameter of a setting: processor.max_pixels
_MAX_CHECKED = 64  # values applied per setting when the space is checked against the model (else the range ends)


@dataclass(frozen=True)
class ProcessorParam:
    """One setting's searched values: a list, or integers in [low, high] by `step` (or log-uniform)."""

    values: tuple[int, ...] | None = None
    low: int | None = None
    high: int | None = None
    step: int = 1
    log: bool = False

    def suggest(self, trial: Any, name: str) -> int:
        if self.values is not None:
            return trial.suggest_categorical(name, list(self.values))
        return trial.suggest_int(name, self.low, self.high, step=self.step, log=self.log)

    def choices(self) -> list[int] | None:
        """Every value the grid sampler takes (None for a log range, which has no grid)."""
        if self.values is not None:
            return list(self.values)
        return None if self.log else list(range(self.low, self.high + 1, self.step))

    def checked_values(self) -> list[int]:
        """The values applied when the space is checked: all of them when few, else the range's ends."""
        choices = self.choices()
        if choices is not None and len(choices) <= _MAX_CHECKED:
            return choices
        return [self.low, self.high] if self.values is None else [min(self.values), max(self.values)]


@dataclass(frozen=True)
class ProcessorSpec:
    """The searched processor settings, by the processor's own names."""

    settings: Mapping[str, ProcessorParam]

    def suggest(self, trial: Any, config: PruningConfig) -> PruningConfig:
        """`config` with this trial's processor settings (parameters `processor.<name>`)."""
        drawn = {name: param.suggest(trial, PROCESSOR_PREFIX + name) for name, param in self.settings.items()}
        return dataclasses.replace(config, processor=drawn)

    def grid(self, source: str | None) -> dict[str, list]:
        grid = {}
        for name, param in self.settings.items():
            if param.choices() is None:
                raise SpaceError(f"{source}: processor.{name}: the grid sampler needs a list or a linear range, "
                                 "not a log range")
            grid[PROCESSOR_PREFIX + name] = param.choices()
        return grid


def parse_processor(r: Reader, section: Any) -> ProcessorSpec:
    """The `processor` section: each setting a positive integer, a list of them, or {low, high, step | log}."""
    if not isinstance(section, dict) or not section:
        raise r.fail("processor", "must be a mapping of processor setting -> its values (e.g. max_pixels: "
                                  "[200704, 401408])")
    settings = {}
    for name, value in section.items():
        key = f"processor.{name}"
        if isinstance(value, list):
            if not value:
                raise r.fail(key, "the list of values is empty")
            values = [r.number(f"{key}[{i}]", v, integer=True, low=1) for i, v in enumerate(value)]
            settings[name] = ProcessorParam(values=tuple(dict.fromkeys(values)))
            continue
        if isinstance(value, int) and not isinstance(value, bool):
            settings[name] = ProcessorParam(values=(r.number(key, value, integer=True, low=1),))
            continue
        spec = r.mapping(key, value, {"low", "high", "step", "log"})
        if not {"low", "high"} <= set(spec):
            raise r.fail(key, "a range needs both low and high (or give a list of values)")
        low = r.number(f"{key}.low", spec["low"], integer=True, low=1)
        high = r.number(f"{key}.high", spec["high"], integer=True, low=low)
        step = r.number(f"{key}.step", spec.get("step", 1), integer=True, low=1)
        log = spec.get("log", False)
        if not isinstance(log, bool):
            raise r.fail(f"{key}.log", f"must be true or false, got {log!r}")
        if log and step != 1:
            raise r.fail(key, "give step or log, not both (Optuna samples a log range without a step)")
        settings[name] = ProcessorParam(low=low, high=high, step=step, log=log)
    return ProcessorSpec(settings)


def check_processor_space(spec: ProcessorSpec, loaded: LoadedModel, source: str | None) -> None:
    """Every searched setting is one the model's family has, and the model takes its values (each applied once,
    at most `_MAX_CHECKED` per setting), also together (every combination of the settings' smallest and largest
    values: Qwen's min_pixels above a drawn max_pixels): a SpaceError naming the first that is not, before any
    trial."""
    names = list(spec.settings)
    alone = [{name: value} for name in names for value in spec.settings[name].checked_values()]
    ends = [(min(values), max(values)) for values in (spec.settings[name].checked_values() for name in names)]
    together = [dict(zip(names, combination)) for combination in itertools.product(*ends)] if len(names) > 1 else []
    for settings in alone + together:
        try:
            with processor_settings(loaded, settings):
                pass
        except ValueError as error:
            raise SpaceError(f"{source}: {error}") from None
