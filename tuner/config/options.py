"""How a pruning method declares its options: type, default, what is valid, and the range a search draws from.

A method class lists its options as `option_specs = {"alpha": Option(float, 1.0, low=0, high=1, search=(0, 1))}`.
`PruningConfig` checks a configuration's options against these specs and fills in the defaults, and a search
space draws each option it names as the Optuna parameter `<method>.<option>` (`param_name`). Torch-free, like
`tuner.config.catalog`, so configurations and search spaces validate without importing the pruning package.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

KINDS = (int, float, str, bool)


@dataclass(frozen=True)
class Option:
    """One option of a method.

    `kind` is int, float, str or bool (None: any value, unchecked; what a method that declares only
    `option_defaults` gets); `low` / `high` bound a number (inclusive), `choices` list the valid values
    of any kind; `nullable` lets None through (e.g. 'automatic'). `search` is the range a search space draws from
    when it names the option without a range, written as in a space file: `{"low": 1, "high": 8}` (a float range
    may add `"log": True`) or a list of values; None: the option is searched only with an explicit range.
    `vision_bound`:
    the value counts vision tokens (DART's image pivots): a search space may not exceed the latency prompt's, and
    a row with fewer gets what it has (the method clamps it per row).
    """

    kind: type | None
    default: Any
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is excluded: (low, ...
    high_open: bool = False  # high itself is excluded: ..., high)
    choices: tuple[Any, ...] | None = None
    nullable: bool = False
    search: dict[str, Any] | list[Any] | None = None
    vision_bound: bool = False
    help: str = ""

    def __post_init__(self) -> None:
        if self.kind is not None and self.kind not in KINDS:
            raise TypeError(f"Option kind must be one of {[k.__name__ for k in KINDS]}, got {self.kind!r}")
        if self.choices is not None:
            object.__setattr__(self, "choices", tuple(self.choices))
        self.check("default", self.default)

    def problem(self, value: Any) -> str | None:
        """Why `value` is not valid for this option ('must be ...'), or None when it is."""
        if self.kind is None:
            return None
        if value is None:
            return None if self.nullable else f"must be {self.describe()}"
        if self.choices is not None:
            return None if value in self.choices and _is_kind(value, self.kind) else f"must be {self.describe()}"
        if not _is_kind(value, self.kind) or (self.kind is float and not math.isfinite(value)) \
                or (self.low is not None and (value < self.low or (self.low_open and value == self.low))) \
                or (self.high is not None and (value > self.high or (self.high_open and value == self.high))):
            return f"must be {self.describe()}"
        return None

    def check(self, name: str, value: Any, method: str = "") -> Any:
        """`value` when valid (an int given for a float option becomes a float); a one-line ValueError otherwise."""
        problem = self.problem(value)
        if problem is not None:
            raise ValueError(f"{method + ' option ' if method else ''}{name} {problem}, got {value!r}")
        return float(value) if self.kind is float and value is not None else value

    def describe(self) -> str:
        """What the option takes, in words: 'an int >= 0', 'a number in [0, 1]', 'one of (...)'."""
        if self.choices is not None:
            text = f"one of {self.choices}"
        else:
            text = {int: "an int", float: "a number", str: "a string", bool: "true or false", None: "any value"}[
                self.kind]
            if self.low is not None and self.high is not None:
                left, right = "[("[self.low_open], "])"[self.high_open]
                text += f" in {left}{self.low:g}, {self.high:g}{right}"
            elif self.low is not None:
                text += f" {'>' if self.low_open else '>='} {self.low:g}"
            elif self.high is not None:
                text += f" {'<' if self.high_open else '<='} {self.high:g}"
        return text + (" or null" if self.nullable else "")


@dataclass(frozen=True)
class PaperSetting:
    """A method's published setting, queued as a study's first pruned trial when the space contains it: its
    layer, the keep ratio (or budget) the space's nearest value stands in for, and its options."""

    layer: int
    keep_ratio: float
    budget: int
    options: dict[str, Any] = field(default_factory=dict)


def param_name(method: str, option: str) -> str:
    """The Optuna parameter that draws `option` of `method`: '<method>.<option>'."""
    return f"{method}.{option}"


def resolve_options(method: str, specs: Mapping[str, Option], given: Mapping[str, Any]) -> dict[str, Any]:
    """`given` checked against the method's specs, with every default filled in; one-line ValueErrors naming the
    method and the option (unknown names list the allowed ones)."""
    unknown = sorted(set(given) - set(specs))
    if unknown:
        allowed = ", ".join(sorted(specs)) or "none"
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}; allowed: {allowed}")
    return {name: spec.check(name, given[name], method) if name in given else spec.default
            for name, spec in specs.items()}


def _is_kind(value: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)
