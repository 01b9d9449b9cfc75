"""`tuner.config.pruning_config` sits below the pruning package: it validates methods through the torch-free
`tuner.config.catalog`, never by importing `tuner.pruning` (at module level or inside a function), so the two
cannot form an import cycle again, and any pruning module imports cleanly as the first thing a process does."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import tuner

PACKAGE_ROOT = Path(tuner.__file__).resolve().parent.parent


def _source(module: str) -> Path | None:
    """The file of a `tuner` module or package, or None for anything else."""
    path = PACKAGE_ROOT.joinpath(*module.split("."))
    if path.is_dir() and (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_names(source: str) -> set[str]:
    """Every module an import statement in `source` names, function bodies included, `if TYPE_CHECKING:` not."""
    names: set[str] = set()
    todo: list[ast.AST] = [ast.parse(source)]
    while todo:
        node = todo.pop()
        if _is_type_checking(node):
            todo.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import"
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
        todo.extend(ast.iter_child_nodes(node))
    return names


def _static_closure(module: str) -> set[str]:
    """Modules `module` imports, directly or through other `tuner` modules (parent packages included)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        if _source(current) is None:
            continue  # outside tuner (or a name imported from a module): a leaf
        for name in _imported_names(_source(current).read_text()):
            parts = name.split(".")
            todo.extend(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return seen


def test_the_walker_sees_lazy_imports_and_skips_type_checking_ones() -> None:
    """Without this, the test below could pass on a walker that sees nothing."""
    names = _imported_names("""
if TYPE_CHECKING:
    import typing_only
else:
    import runtime_fallback
def f():
    from tuner.pruning.registry import get_method_class
""")
    assert names == {"runtime_fallback", "tuner.pruning.registry", "tuner.pruning.registry.get_method_class"}
    closure = _static_closure("tuner.pruning.registry")
    assert {"tuner", "tuner.config", "tuner.config.catalog", "tuner.pruning", "tuner.pruning.base", "torch"} <= closure


def test_config_never_imports_the_pruning_package_or_torch() -> None:
    closure = _static_closure("tuner.config.pruning_config")
    assert "tuner.config.catalog" in closure
    assert not {name for name in closure if name == "torch" or name.startswith(("torch.", "tuner.pruning"))}


def _fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=PACKAGE_ROOT)


def test_config_validates_every_bundled_method_without_anyone_importing_pruning() -> None:
    result = _fresh("""
import sys
from tuner.config import PruningConfig
assert not [n for n in sys.modules if n == "torch" or n.startswith("tuner.pruning")]
try:
    PruningConfig(method="nope")
except ValueError as error:
    print(error)
try:
    PruningConfig(method="avgpool", options={"stride": 0})
except ValueError as error:
    print(error)
""")
    assert result.returncode == 0, result.stderr
    unknown, stride = result.stdout.splitlines()
    assert unknown == ("unknown pruning method 'nope'; available: avgpool, cdpruner, dart, divprune, fastv, keep_all, "
                       "pooling, random, sparsevlm, visionzip, window_fastv")
    assert "stride must be an int >= 1" in stride


@pytest.mark.parametrize("first", ["tuner.pruning.registry", "tuner.pruning.methods.dart"])
def test_a_pruning_module_imports_first_thing(first: str) -> None:
    result = _fresh(f"""
import {first}
from tuner.pruning.registry import available_methods, get_method_class
from tuner.config import PruningConfig
assert get_method_class("dart").name == "dart" and "keep_all" in available_methods()
print(PruningConfig(method="dart", keep_ratio=0.5).method)
""")
    assert result.returncode == 0 and result.stdout.strip() == "dart", result.stderr
