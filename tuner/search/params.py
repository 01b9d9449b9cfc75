"""The building blocks of a search space: its error, parameter types, the validating reader and `pdrop` schedules.

`tuner.search.space` assembles them into a `SearchSpace`; they live here so each file stays one job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from tuner.config import PruningConfig, Stage, stack
from tuner.config.catalog import method_class, method_names
from tuner.config.options import Option, param_name
from tuner.errors import DartTunerError

PDROP = "pdrop"  # a `methods` entry: a schedule from `schedule`, each stage scored like FastV at its own layer
PDROP_METHOD = "fastv"


class SpaceError(DartTunerError, ValueError):
    """A search space that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class IntParam:
    """Integers in [low, high] (step 1), or a fixed list of values."""

    low: int | None = None
    high: int | None = None
    values: tuple[int, ...] | None = None

    def choices(self) -> list[int]:
        return list(self.values) if self.values is not None else list(range(self.low, self.high + 1))

    def contains(self, value: int) -> bool:
        return value in self.choices()

    def suggest(self, trial: Any, name: str) -> int:
        if self.values is not None:
            return trial.suggest_categorical(name, list(self.values))
        return trial.suggest_int(name, self.low, self.high)


@dataclass(frozen=True)
class FloatParam:
    """Floats in [low, high] (optionally log-uniform), or a fixed list of values."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    values: tuple[float, ...] | None = None

    def contains(self, value: float) -> bool:
        if self.values is not None:
            return value in self.values
        return self.low <= value <= self.high

    def suggest(self, trial: Any, name: str) -> float:
        if self.values is not None:
            return trial.suggest_categorical(name, list(self.values))
        return trial.suggest_float(name, self.low, self.high, log=self.log)


@dataclass(frozen=True)
class OptionParam:
    """The search range of one method option: numbers in [low, high] (a float range optionally log-uniform), or a
    list of values of any kind the option takes (strings, booleans, null)."""

    kind: type | None
    low: float | None = None
    high: float | None = None
    log: bool = False
    values: tuple[Any, ...] | None = None

    def choices(self) -> list[Any] | None:
        """Every value, or None for a float range (which cannot be enumerated)."""
        if self.values is not None:
            return list(self.values)
        return list(range(int(self.low), int(self.high) + 1)) if self.kind is int else None

    def contains(self, value: Any) -> bool:
        if self.values is not None:
            return any(value == v and type(value) is type(v) for v in self.values)
        return isinstance(value, (int, float)) and not isinstance(value, bool) and self.low <= value <= self.high

    def extremes(self) -> list[Any]:
        """The values a space check tries: every listed value, or both ends of a range."""
        return list(self.values) if self.values is not None else list(dict.fromkeys((self.low, self.high)))

    def suggest(self, trial: Any, name: str) -> Any:
        if self.values is not None:
            return trial.suggest_categorical(name, list(self.values))
        if self.kind is int:
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(name, self.low, self.high, log=self.log)


@dataclass(frozen=True)
class ScheduleSpec:
    """PyramidDrop-style schedules (`pdrop`): FastV at every stage layer, each stage keeping a share of the tokens
    the stage before it kept. Each layer entry is a parameter whose every value lies below the next entry's, so any
    draw is strictly increasing; `keep_ratio` is one parameter per stage, or one for all (`shared`, PDrop's λ)."""

    layers: tuple[IntParam, ...]
    keep_ratio: FloatParam
    shared: bool = False

    def suggest(self, trial: Any) -> PruningConfig:
        """The schedule of one trial: parameters pdrop_layer_i and pdrop_keep_ratio_i (or pdrop_keep_ratio)."""
        layers = [param.suggest(trial, f"pdrop_layer_{i}") for i, param in enumerate(self.layers)]
        if self.shared:
            ratios = [self.keep_ratio.suggest(trial, "pdrop_keep_ratio")] * len(layers)
        else:
            ratios = [self.keep_ratio.suggest(trial, f"pdrop_keep_ratio_{i}") for i in range(len(layers))]
        return PruningConfig(method=PDROP_METHOD, layer=layers[0], keep_ratio=ratios[0],
                             stages=tuple(Stage(layer, ratio) for layer, ratio in zip(layers[1:], ratios[1:])))

    def grid(self, source: str | None) -> dict[str, list]:
        """The schedule's parameters for Optuna's GridSampler (keep ratios must be lists of values)."""
        if self.keep_ratio.values is None:
            raise SpaceError(f"{source}: schedule.keep_ratio: the grid sampler needs a list of values, not a range")
        grid: dict[str, list] = {f"pdrop_layer_{i}": param.choices() for i, param in enumerate(self.layers)}
        names = ["pdrop_keep_ratio"] if self.shared else [f"pdrop_keep_ratio_{i}" for i in range(len(self.layers))]
        grid.update({name: list(self.keep_ratio.values) for name in names})
        return grid

    def max_layer(self) -> int:
        """The deepest stage layer a trial can draw."""
        return max(self.layers[-1].choices())


BEFORE_LM_PREFIX = "before_lm."  # in front of a before-LM method's option parameters: before_lm.cdpruner.theta
NO_STAGE = "none"  # a `before_lm.methods` entry: the trial has no stage before the language model


@dataclass(frozen=True)
class BeforeLMSpec:
    """An optional stage at K = 0 stacked under each trial's in-LM configuration: its method (or `none`) and the
    share of the vision tokens it keeps; the in-LM stage then keeps its own share of those."""

    methods: tuple[str, ...]
    keep_ratio: FloatParam
    options: dict[str, dict[str, OptionParam]] = field(default_factory=dict)  # method -> option -> its range

    def suggest(self, trial: Any, config: PruningConfig, grid: bool = False) -> PruningConfig:
        """`config` with a K = 0 stage in front of it (parameters before_lm_method, before_lm_keep_ratio and
        before_lm.<method>.<option> for the drawn method's searched options)."""
        method = trial.suggest_categorical("before_lm_method", list(self.methods))
        if method == NO_STAGE and not grid:
            return config
        ratio = self.keep_ratio.suggest(trial, "before_lm_keep_ratio")
        options = suggest_options(trial, self.options, method, grid, prefix=BEFORE_LM_PREFIX)
        if method == NO_STAGE:
            return config
        return stack(PruningConfig(method=method, layer=0, keep_ratio=ratio, options=options), config)

    def grid(self, source: str | None) -> dict[str, list]:
        if self.keep_ratio.values is None:
            raise SpaceError(f"{source}: before_lm.keep_ratio: the grid sampler needs a list of values, not a range")
        return {"before_lm_method": list(self.methods), "before_lm_keep_ratio": list(self.keep_ratio.values),
                **options_grid(self.options, f"{source}: before_lm.options", prefix=BEFORE_LM_PREFIX)}


def suggest_options(trial: Any, options: dict[str, dict[str, OptionParam]], method: str, grid: bool,
                    prefix: str = "") -> dict[str, Any]:
    """The searched options of `method` for one trial (parameters `<prefix><method>.<option>`); under the grid
    sampler every method's options are drawn, as it needs every parameter in every trial."""
    chosen: dict[str, Any] = {}
    for owner, params in options.items():
        if owner == method or grid:
            drawn = {name: param.suggest(trial, prefix + param_name(owner, name)) for name, param in params.items()}
            chosen = drawn if owner == method else chosen
    return chosen


def options_grid(options: dict[str, dict[str, OptionParam]], where: str, prefix: str = "") -> dict[str, list]:
    """Every searched option's values for Optuna's GridSampler; a float range is a SpaceError naming it."""
    grid = {}
    for owner, params in options.items():
        for name, param in params.items():
            if param.choices() is None:
                raise SpaceError(f"{where}.{owner}.{name}: the grid sampler needs a list of values, not a float range")
            grid[prefix + param_name(owner, name)] = param.choices()
    return grid


def refuses_layer_0(method: str) -> bool:
    """Whether `method` (with its default options) reads layer K-1's keys or attention, so cannot run at K = 0."""
    cls = method_class(method)
    return cls.reads_previous_layer(PruningConfig(method="keep_all", layer=1))


class Reader:
    """Validation helpers that know the file name, so every message says where the problem is."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, problem: str) -> SpaceError:
        return SpaceError(f"{self.source}: {key}: {problem}")

    def number(self, key: str, value: Any, *, integer: bool, low: float | None = None,
               high: float | None = None, low_open: bool = False) -> Any:
        kind = int if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise self.fail(key, f"must be {'an integer' if integer else 'a number'}, got {value!r}")
        if not math.isfinite(value):  # NaN passes every comparison below, and no setting is infinite
            raise self.fail(key, f"must be a finite number, got {value!r}")
        if low is not None and (value < low or (low_open and value == low)):
            raise self.fail(key, f"must be {'>' if low_open else '>='} {low}, got {value!r}")
        if high is not None and value > high:
            raise self.fail(key, f"must be <= {high}, got {value!r}")
        return value

    def choice(self, key: str, value: Any, allowed: tuple[str, ...]) -> str:
        if value not in allowed:
            raise self.fail(key, f"must be one of {', '.join(allowed)}, got {value!r}")
        return value

    def mapping(self, key: str, value: Any, allowed: set[str]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a mapping with keys {sorted(allowed)}, got {type(value).__name__}")
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise self.fail(key, f"unknown key(s) {unknown}; allowed: {sorted(allowed)}")
        return value

    def int_param(self, key: str, value: Any, *, low: int, high: int | None = None) -> IntParam:
        if isinstance(value, list):
            if not value:
                raise self.fail(key, "the list of values is empty")
            values = tuple(self.number(f"{key}[{i}]", v, integer=True, low=low, high=high) for i, v in enumerate(value))
            return IntParam(values=tuple(dict.fromkeys(values)))
        if isinstance(value, int) and not isinstance(value, bool):
            return IntParam(values=(self.number(key, value, integer=True, low=low, high=high),))
        spec = self.mapping(key, value, {"low", "high"})
        if set(spec) != {"low", "high"}:
            raise self.fail(key, "a range needs both low and high (or give a list of values)")
        lo = self.number(f"{key}.low", spec["low"], integer=True, low=low, high=high)
        hi = self.number(f"{key}.high", spec["high"], integer=True, low=low, high=high)
        if lo > hi:
            raise self.fail(key, f"low ({lo}) is above high ({hi})")
        return IntParam(low=lo, high=hi)

    def float_param(self, key: str, value: Any) -> FloatParam:
        if isinstance(value, list):
            if not value:
                raise self.fail(key, "the list of values is empty")
            values = tuple(float(self.number(f"{key}[{i}]", v, integer=False, low=0, high=1, low_open=True))
                           for i, v in enumerate(value))
            return FloatParam(values=tuple(dict.fromkeys(values)))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return FloatParam(values=(float(self.number(key, value, integer=False, low=0, high=1, low_open=True)),))
        spec = self.mapping(key, value, {"low", "high", "log"})
        if not {"low", "high"} <= set(spec):
            raise self.fail(key, "a range needs both low and high (or give a list of values)")
        lo = float(self.number(f"{key}.low", spec["low"], integer=False, low=0, high=1, low_open=True))
        hi = float(self.number(f"{key}.high", spec["high"], integer=False, low=0, high=1, low_open=True))
        if lo > hi:
            raise self.fail(key, f"low ({lo}) is above high ({hi})")
        log = spec.get("log", False)
        if not isinstance(log, bool):
            raise self.fail(f"{key}.log", f"must be true or false, got {log!r}")
        return FloatParam(low=lo, high=hi, log=log)

    def option_param(self, key: str, value: Any, spec: Option) -> OptionParam:
        """A method option's range from the space: `{low, high[, log]}`, a list of values, one value, or null (the
        option's default search range, `spec.search`, else all its `choices`). Every value must be one it takes."""
        if value is None:
            if spec.search is None and spec.choices is None:
                raise self.fail(key, "this option has no default search range; give {low: .., high: ..} or a list "
                                     "of values")
            value = spec.search if spec.search is not None else list(spec.choices)
        if isinstance(value, list):
            if not value:
                raise self.fail(key, "the list of values is empty")
            values = tuple(self._option_value(f"{key}[{i}]", v, spec) for i, v in enumerate(value))
            return OptionParam(spec.kind, values=tuple(dict.fromkeys(values)))
        if not isinstance(value, dict):
            return OptionParam(spec.kind, values=(self._option_value(key, value, spec),))
        if spec.kind not in (int, float) or spec.choices is not None:
            raise self.fail(key, f"a range needs a numeric option; this one takes {spec.describe()}: give a list")
        spec_map = self.mapping(key, value, {"low", "high", "log"})
        if not {"low", "high"} <= set(spec_map):
            raise self.fail(key, "a range needs both low and high (or give a list of values)")
        lo, hi = (self._option_value(f"{key}.{end}", spec_map[end], spec) for end in ("low", "high"))
        if lo is None or hi is None:
            raise self.fail(key, "a range needs numbers at both ends (list null among values instead)")
        if lo > hi:
            raise self.fail(key, f"low ({lo}) is above high ({hi})")
        log = spec_map.get("log", False)
        if not isinstance(log, bool):
            raise self.fail(f"{key}.log", f"must be true or false, got {log!r}")
        if log and lo <= 0:
            raise self.fail(f"{key}.log", f"a log range needs low > 0, got {lo}")
        return OptionParam(spec.kind, low=lo, high=hi, log=log)

    def _option_value(self, key: str, value: Any, spec: Option) -> Any:
        try:
            return spec.check(key, value)
        except ValueError as error:
            raise SpaceError(f"{self.source}: {error}") from None


def parse_schedule(r: Reader, value: Any) -> ScheduleSpec:
    """`schedule: {layers: [2, {low: 3, high: 5}, 8], keep_ratio: {low: 0.3, high: 0.9}, shared: false}`."""
    spec = r.mapping("schedule", value, {"layers", "keep_ratio", "shared"})
    if set(spec) - {"shared"} != {"layers", "keep_ratio"}:
        raise r.fail("schedule", "needs layers (a list, one entry per stage) and keep_ratio")
    if not isinstance(spec["layers"], list) or len(spec["layers"]) < 2:
        raise r.fail("schedule.layers", f"must list at least two stage layers, got {spec['layers']!r}")
    layers = tuple(r.int_param(f"schedule.layers[{i}]", v, low=1) for i, v in enumerate(spec["layers"]))
    for i in range(1, len(layers)):
        if min(layers[i].choices()) <= max(layers[i - 1].choices()):
            low, high = min(layers[i].choices()), max(layers[i - 1].choices())
            raise r.fail(f"schedule.layers[{i}]", f"its lowest layer {low} must be above the highest of "
                                                  f"schedule.layers[{i - 1}] ({high})")
    shared = spec.get("shared", False)
    if not isinstance(shared, bool):
        raise r.fail("schedule.shared", f"must be true or false, got {shared!r}")
    return ScheduleSpec(layers=layers, keep_ratio=r.float_param("schedule.keep_ratio", spec["keep_ratio"]),
                        shared=shared)


def parse_before_lm(r: Reader, value: Any) -> BeforeLMSpec:
    """`before_lm: {methods: [none, random, divprune], keep_ratio: {low: 0.25, high: 1.0}}`."""
    spec = r.mapping("before_lm", value, {"methods", "keep_ratio", "options"})
    if set(spec) - {"options"} != {"methods", "keep_ratio"}:
        raise r.fail("before_lm", "needs methods (a list; 'none' for trials without the stage) and keep_ratio")
    methods = spec["methods"] if isinstance(spec["methods"], list) else [spec["methods"]]
    if not methods:
        raise r.fail("before_lm.methods", "the list is empty")
    for i, method in enumerate(methods):
        r.choice(f"before_lm.methods[{i}]", method, (NO_STAGE, *method_names()))
        if method != NO_STAGE and refuses_layer_0(method):
            raise r.fail(f"before_lm.methods[{i}]", f"{method} reads layer K-1's keys or attention, which do not "
                                                    "exist before the language model")
    section = spec.get("options") or {}
    if not isinstance(section, dict):
        raise r.fail("before_lm.options", f"must be a mapping of method name -> its options, got {section!r}")
    options = parse_option_section(r, "before_lm.options", section, [m for m in methods if m != NO_STAGE])
    return BeforeLMSpec(methods=tuple(methods), keep_ratio=r.float_param("before_lm.keep_ratio", spec["keep_ratio"]),
                        options=options)


def parse_option_section(r: Reader, key: str, section: dict[str, Any],
                         methods: list[str]) -> dict[str, dict[str, OptionParam]]:
    """An options section (`key`): per method of `methods`, its searched options, as a mapping of ranges or a list
    of option names that take the method's default ranges."""
    parsed: dict[str, dict[str, OptionParam]] = {}
    for method, spec in section.items():
        where = f"{key}.{method}"
        if method not in methods:
            raise r.fail(where, f"{method!r} is not a method of this space (methods: {', '.join(methods)})")
        specs = method_class(method).option_specs
        if isinstance(spec, list):
            spec = dict.fromkeys(spec)
        if not isinstance(spec, dict):
            raise r.fail(where, f"must map option names to ranges, or list option names, got {spec!r}")
        unknown = sorted(str(name) for name in set(spec) - set(specs))
        if unknown:
            raise r.fail(where, f"unknown option(s) {unknown}; {method} takes: {', '.join(sorted(specs)) or 'none'}")
        parsed[method] = {name: r.option_param(f"{where}.{name}", value, specs[name]) for name, value in spec.items()}
    return parsed
