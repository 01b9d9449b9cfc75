"""Where a search space comes from: a YAML file the user names, or one of the spaces shipped with the package.

The shipped spaces have one source, `search_spaces/` in the repository; a wheel installs them as `tuner/spaces/`
(setup.py maps the package there). A checkout or an editable install reads `search_spaces/` next to `tuner/`.
Torch-free, so `dart-tuner spaces` starts fast.
"""

from __future__ import annotations

from pathlib import Path

from tuner.config.yaml_files import read_yaml
from tuner.search.params import SpaceError

SUFFIXES = (".yaml", ".yml")
SOURCE_FOLDER = "search_spaces"  # the repository folder the packaged spaces are built from


def packaged_folder() -> Path:
    """The folder of the shipped spaces: `tuner/spaces/` once installed from a wheel, else the source tree's
    `search_spaces/` beside the imported `tuner` package (a checkout, or an editable install of one)."""
    package = Path(__file__).resolve().parents[1]
    installed = package / "spaces"
    return installed if installed.is_dir() else package.parent / SOURCE_FOLDER


def packaged_spaces() -> dict[str, Path]:
    """Name (the file's stem) -> file of every shipped space, sorted by name; empty when none ship."""
    folder = packaged_folder()
    if not folder.is_dir():
        return {}
    return {path.stem: path for path in sorted(folder.iterdir()) if path.suffix in SUFFIXES and path.is_file()}


def resolve_space(spec: str | Path) -> Path:
    """The file a `--space` argument means. An existing file wins; otherwise a shipped space by name: `demo`,
    `demo.yaml`, or the repository path `search_spaces/demo.yaml` typed in any folder. A bare name that matches no
    file and no shipped space is a one-line SpaceError listing the shipped names; any other path is returned as
    given, for the reader to name it when it cannot be read."""
    path = Path(spec)
    if path.is_file():
        return path
    bare = len(path.parts) == 1 or (len(path.parts) == 2 and path.parts[0] == SOURCE_FOLDER)
    if not bare:
        return path
    name = path.stem if path.suffix in SUFFIXES else path.name
    shipped = packaged_spaces()
    if name in shipped:
        return shipped[name]
    listed = ", ".join(shipped) or f"none (no {packaged_folder()})"
    raise SpaceError(f"cannot read search space {str(spec)!r}: no such file, and no packaged space {name!r} "
                     f"(packaged: {listed}; see `dart-tuner spaces`)")


def describe_space(path: Path) -> tuple[str, str]:
    """(model, description) of a space file for listings: its `model` and its first comment line, without '#'."""
    data = read_yaml(path, kind="search space", error=SpaceError)
    model = str(data.get("model", "")) if isinstance(data, dict) else ""
    with path.open(encoding="utf-8") as file:
        comment = next((line.strip().lstrip("#").strip() for line in file if line.lstrip().startswith("#")), "")
    return model, comment
