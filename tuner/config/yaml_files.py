"""Reading the YAML files a user writes or is handed (search spaces, presets): bounded in size, UTF-8, and every
problem one line naming the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tuner.errors import DartTunerError

MAX_BYTES = 1 << 20  # spaces and presets are a few kB; a larger file is not one, and reading it could exhaust memory


def yaml_problem(error: yaml.YAMLError) -> str:
    """'line 1, column 9: expected ',' or ']', but got '<stream end>'' (1-based, as editors count)."""
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = "; ".join(part for part in (error.context, error.problem) if part)
        return f"{where}{what}" or type(error).__name__
    return " ".join(str(error).split())


def read_yaml(path: str | Path, *, kind: str, error: type[DartTunerError],
              loader: type[yaml.SafeLoader] = yaml.SafeLoader) -> Any:
    """The parsed content of a YAML file; `error` with a message naming the `kind` of file and its path when it
    cannot be read, is over MAX_BYTES, is not UTF-8 text, or is not valid YAML."""
    path = Path(path)
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_BYTES + 1)
    except OSError as problem:
        raise error(f"cannot read {kind} {str(path)!r}: {problem.strerror or problem}") from problem
    if len(raw) > MAX_BYTES:
        raise error(f"{kind} {str(path)!r} is over {MAX_BYTES >> 20} MiB; a {kind} is a few kB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{kind} {str(path)!r} is not a UTF-8 text file; a {kind} is YAML") from None
    try:
        return yaml.load(text, Loader=loader)
    except yaml.YAMLError as problem:
        raise error(f"{kind} {str(path)!r} is not valid YAML: {yaml_problem(problem)}") from problem
