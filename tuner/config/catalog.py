"""The pruning methods by name: a torch-free catalog that `PruningConfig` validates its method against.

Methods come from the `dart_tuner.methods` entry points of every installed package (the bundled ones are
declared in pyproject.toml, a plugin declares its own), loaded on the first lookup, and from
`tuner.pruning.registry.register_method`, which adds a class defined in a running program. So this module and
`tuner.config` never import the pruning package (and torch) themselves: the dependency runs from `tuner.pruning`
to `tuner.config` only.
"""

from __future__ import annotations

import threading
import warnings
from importlib.metadata import EntryPoint, entry_points
from typing import Any

ENTRY_POINTS = "dart_tuner.methods"  # name = "package.module:Class" per method

_CLASSES: dict[str, type[Any]] = {}
_loaded = False
_loading = threading.RLock()


class MethodsNotInstalled(RuntimeError):
    """No installed package declares dart-tuner's bundled methods (a checkout used without being installed)."""


def add_method(name: str, cls: type[Any]) -> None:
    """Make `cls` the method called `name`; a ValueError if another class already holds the name."""
    known = _CLASSES.get(name)
    if known is not None and known is not cls:
        raise ValueError(f"pruning method {name!r} is already registered by {known.__name__}")
    _CLASSES[name] = cls


def method_names() -> tuple[str, ...]:
    """Names of all methods, the installed ones and any registered so far, sorted."""
    _load_entry_points()
    return tuple(sorted(_CLASSES))


def method_class(name: str) -> type[Any]:
    """The class of the method called `name`, or a one-line ValueError listing the known ones."""
    _load_entry_points()
    try:
        return _CLASSES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown pruning method {name!r}; available: {', '.join(sorted(_CLASSES))}") from None


def _load_entry_points() -> None:
    """Load every installed method (once). A plugin that fails to load is skipped with one warning naming it."""
    global _loaded
    with _loading:
        if _loaded:
            return
        _loaded = True
        points = list(entry_points(group=ENTRY_POINTS))
        if not any(point.value.startswith("tuner.") for point in points):
            _loaded = False
            raise MethodsNotInstalled(f"no installed package declares the {ENTRY_POINTS!r} entry points of "
                                      "dart-tuner's methods: install it (`pip install -e .` in a checkout)")
        for point in points:
            _load(point)


def _load(point: EntryPoint) -> None:
    try:
        cls = point.load()
    except Exception as error:  # a broken plugin must not take every other method down
        warnings.warn(f"pruning method {point.name!r} ({point.value}) cannot be loaded, skipped: "
                      f"{type(error).__name__}: {error}", stacklevel=3)
        return
    declared = getattr(cls, "name", None)
    if declared != point.name:
        warnings.warn(f"entry point {point.name!r} ({point.value}) names a method registered as {declared!r}; "
                      "skipped", stacklevel=3)
        return
    add_method(point.name, cls)
