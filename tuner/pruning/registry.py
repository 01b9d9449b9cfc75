"""Method registry: maps a method name (a categorical search parameter) to its class.

The names live in `tuner.config.catalog`, which `PruningConfig` validates against without importing torch;
this module is its typed face for method classes.
"""

from __future__ import annotations

from collections.abc import Callable

from tuner.config.catalog import add_method, method_class, method_names
from tuner.pruning.base import PruningMethod


def register_method(name: str) -> Callable[[type[PruningMethod]], type[PruningMethod]]:
    """Class decorator that makes a method available under `name` (and checks configs with its `validate`)."""

    def decorate(cls: type[PruningMethod]) -> type[PruningMethod]:
        add_method(name, cls)
        cls.name = name
        return cls

    return decorate


def available_methods() -> tuple[str, ...]:
    """Names of all registered methods, sorted."""
    return method_names()


def get_method_class(name: str) -> type[PruningMethod]:
    """The class registered under `name`, or a ValueError listing the known ones."""
    return method_class(name)
