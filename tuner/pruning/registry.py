"""Method registry: maps a method name (a categorical search parameter) to its class."""

from __future__ import annotations

from collections.abc import Callable

from tuner.pruning.base import PruningMethod

_METHODS: dict[str, type[PruningMethod]] = {}


def register_method(name: str) -> Callable[[type[PruningMethod]], type[PruningMethod]]:
    """Class decorator that makes a method available under `name`."""

    def decorate(cls: type[PruningMethod]) -> type[PruningMethod]:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"pruning method {name!r} is already registered by {_METHODS[name].__name__}")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return decorate


def available_methods() -> tuple[str, ...]:
    """Names of all registered methods, sorted."""
    _load_builtin_methods()
    return tuple(sorted(_METHODS))


def get_method_class(name: str) -> type[PruningMethod]:
    """The class registered under `name`, or a ValueError listing the known ones."""
    _load_builtin_methods()
    try:
        return _METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown pruning method {name!r}; available: {', '.join(sorted(_METHODS))}") from None


def _load_builtin_methods() -> None:
    """Import the bundled methods so their decorators run (once; imports are cached)."""
    import tuner.pruning.methods  # noqa: F401
