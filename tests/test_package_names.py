"""Every subpackage of tuner states its public names, and each of them exists: `from tuner.X import *` works."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import tuner

SUBPACKAGES = sorted(info.name for info in pkgutil.iter_modules(tuner.__path__) if info.ispkg)


def test_the_stages_are_all_found() -> None:
    assert {"bench", "cli", "config", "dashboard", "evaluation", "measure", "models", "pruning", "results",
            "search", "tiny"} <= set(SUBPACKAGES)


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_each_subpackage_declares_its_public_names(name: str) -> None:
    package = importlib.import_module(f"tuner.{name}")
    public = getattr(package, "__all__", None)
    assert public, f"tuner.{name}/__init__.py states no __all__"
    assert len(set(public)) == len(public), f"tuner.{name}.__all__ repeats a name"
    for item in public:
        assert not item.startswith("_"), f"tuner.{name}.__all__ exports the private {item}"
        if not hasattr(package, item):  # a public submodule: it must import
            importlib.import_module(f"tuner.{name}.{item}")
