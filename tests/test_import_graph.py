"""No import cycle between tuner's top-level parts (counting imports inside functions and modules named in strings),
and `tuner.config.pruning_config` sits below the pruning package: it validates methods through the torch-free
`tuner.config.catalog`, which finds them by entry points, never by importing `tuner.pruning` itself; any pruning
module imports cleanly as the first thing a process does."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
import warnings
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

import pytest

import tuner
import tuner.pruning.methods
from tuner.config import catalog

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


_MODULE_NAME = re.compile(r"tuner(\.\w+)+(:\w+)?")


def _named_modules(source: str) -> list[tuple[str, int, bool]]:
    """(module, line, by_string) for every import (function bodies included, `if TYPE_CHECKING:` not; a
    `from m import n` names both `m` and `m.n`) and every string that is exactly a tuner module's name
    (`"tuner.pruning.methods"`, `"pkg.mod:Class"`: an import by name)."""
    found: list[tuple[str, int, bool]] = []
    todo: list[ast.AST] = [ast.parse(source)]
    while todo:
        node = todo.pop()
        if _is_type_checking(node):
            todo.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, False) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import"
            found.append((node.module, node.lineno, False))
            found += [(f"{node.module}.{alias.name}", node.lineno, False) for alias in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _MODULE_NAME.fullmatch(node.value):
            found.append((node.value.split(":")[0], node.lineno, True))
        todo.extend(ast.iter_child_nodes(node))
    return found


def _imported_names(source: str) -> set[str]:
    """Every module an import statement in `source` names, function bodies included, `if TYPE_CHECKING:` not."""
    return {name for name, _, by_string in _named_modules(source) if not by_string}


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



def _part(module: str) -> str | None:
    """tuner's top-level part a module belongs to (`tuner.search.study` -> `search`); None outside tuner.
    A name imported from the package itself (`from tuner import __version__`) belongs to the package, "tuner"."""
    bits = module.split(".")
    if bits[0] != "tuner":
        return None
    return bits[1] if len(bits) > 1 and _source(f"tuner.{bits[1]}") is not None else "tuner"


def _part_graph() -> dict[tuple[str, str], str]:
    """(importing part, imported part) -> where the first such import is (file:line)."""
    edges: dict[tuple[str, str], str] = {}
    for path in sorted((PACKAGE_ROOT / "tuner").rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE_ROOT).with_suffix("").parts).removesuffix(".__init__")
        source_part = _part(module)
        if module == "tuner":
            continue  # the package's face re-exports every part; it is no part itself
        for name, line, _ in _named_modules(path.read_text()):
            target = _part(name)
            if target is not None and target not in (source_part, "tuner"):
                edges.setdefault((source_part, target), f"{path.relative_to(PACKAGE_ROOT)}:{line}")
    return edges


def _a_cycle(edges: dict[tuple[str, str], str]) -> list[str] | None:
    """One cycle of the directed graph as [a, b, ..., a], or None."""
    graph: dict[str, list[str]] = {}
    for a, b in edges:
        graph.setdefault(a, []).append(b)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in graph.get(node, []):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in list(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    edges = {("a", "b"): "x", ("b", "c"): "y", ("c", "a"): "z", ("c", "d"): "w"}
    assert _a_cycle(edges) == ["a", "b", "c", "a"]
    assert _a_cycle({("a", "b"): "x", ("b", "c"): "y"}) is None
    lazy = 'def f():\n    import importlib\n    importlib.import_module("tuner.pruning.methods")'
    assert sorted((m, by_string) for m, _, by_string in _named_modules(lazy)) == [
        ("importlib", False), ("tuner.pruning.methods", True)]
    assert [m for m, _, _ in _named_modules('X = "tuner.pruning.methods:DART"\nY = "not tuner.x"')] == [
        "tuner.pruning.methods"]


def test_no_import_cycle_between_tuners_parts() -> None:
    edges = _part_graph()
    assert ("search", "results") in edges and ("pruning", "config") in edges  # the walker sees the real graph
    cycle = _a_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(
        f"{a} ({edges[a, b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def _documented_order() -> dict[str, int]:
    """Each part's level in docs/architecture.md's "Layer order" (`errors < config < ... < cli`)."""
    text = (PACKAGE_ROOT / "docs" / "architecture.md").read_text()
    line = re.search(r"## Layer order.*?```\n(.*?)\n```", text, re.S).group(1)
    return {part.strip(): level for level, parts in enumerate(line.split("<")) for part in parts.split(",")}


def test_every_import_goes_down_the_documented_layer_order() -> None:
    order = _documented_order()
    edges = _part_graph()
    parts = {part for edge in edges for part in edge}
    assert parts <= set(order), f"parts missing from docs/architecture.md's layer order: {parts - set(order)}"
    upward = [f"{a} imports {b} ({where})" for (a, b), where in edges.items() if order[b] >= order[a]]
    assert not upward, "; ".join(upward)


def _declared_methods() -> dict[str, str]:
    project = tomllib.loads((PACKAGE_ROOT / "pyproject.toml").read_text())["project"]
    return project["entry-points"][catalog.ENTRY_POINTS]


def test_the_entry_points_declare_every_bundled_method_under_its_own_name() -> None:
    declared = _declared_methods()
    bundled = {getattr(tuner.pruning.methods, name).name: f"{getattr(tuner.pruning.methods, name).__module__}:{name}"
               for name in tuner.pruning.methods.__all__}
    assert declared == bundled
    installed = {point.name: point.value for point in entry_points(group=catalog.ENTRY_POINTS)}
    assert installed.items() >= declared.items(), "the installed metadata is stale: pip install -e . again"


def test_a_plugin_that_cannot_load_is_skipped_with_a_warning_naming_it() -> None:
    before = catalog.method_names()
    broken = EntryPoint("broken_plugin", "no_such_package.methods:Broken", catalog.ENTRY_POINTS)
    misnamed = EntryPoint("alias", "tuner.pruning.methods.dart:DART", catalog.ENTRY_POINTS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        catalog._load(broken)
        catalog._load(misnamed)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert "'broken_plugin' (no_such_package.methods:Broken) cannot be loaded" in messages[0]
    assert "registered as 'dart'" in messages[1]
    assert catalog.method_names() == before


def test_an_uninstalled_checkout_is_told_to_install(monkeypatch) -> None:
    monkeypatch.setattr(catalog, "_loaded", False)
    monkeypatch.setattr(catalog, "entry_points", lambda group: [])
    with pytest.raises(catalog.MethodsNotInstalled, match="pip install -e"):
        catalog.method_class("dart")
