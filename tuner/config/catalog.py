"""The pruning methods by name: a torch-free catalog that `PruningConfig` validates its method against.

`tuner.pruning.registry.register_method` adds each method class here, users' methods included, and
`PruningConfig` looks its method up here to run the class's `validate`. The bundled methods are the module
named `BUILTIN_METHODS`, imported by name on a lookup, so neither this module nor `tuner.config` imports the
pruning package (and torch) when it is imported: `tuner.pruning` -> `tuner.config` -> this module is the only
direction, and `tuner.pruning.registry` -> this module.
"""

from __future__ import annotations

import importlib
from typing import Any

BUILTIN_METHODS = "tuner.pruning.methods"  # importing it registers the bundled methods

_CLASSES: dict[str, type[Any]] = {}


def add_method(name: str, cls: type[Any]) -> None:
    """Make `cls` the method called `name`; a ValueError if another class already holds the name."""
    known = _CLASSES.get(name)
    if known is not None and known is not cls:
        raise ValueError(f"pruning method {name!r} is already registered by {known.__name__}")
    _CLASSES[name] = cls


def method_names() -> tuple[str, ...]:
    """Names of all methods, the bundled ones and any registered so far, sorted."""
    _load_builtin_methods()
    return tuple(sorted(_CLASSES))


def method_class(name: str) -> type[Any]:
    """The class of the method called `name`, or a one-line ValueError listing the known ones."""
    _load_builtin_methods()
    try:
        return _CLASSES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown pruning method {name!r}; available: {', '.join(sorted(_CLASSES))}") from None


def _load_builtin_methods() -> None:
    """Import the bundled methods so their `register_method` decorators run (once; imports are cached)."""
    importlib.import_module(BUILTIN_METHODS)
