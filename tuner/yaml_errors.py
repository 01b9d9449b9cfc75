"""One line for a YAML syntax error: where it is and what is wrong, not PyYAML's multi-line excerpt."""

from __future__ import annotations

import yaml


def yaml_problem(error: yaml.YAMLError) -> str:
    """'line 1, column 9: expected ',' or ']', but got '<stream end>'' (1-based, as editors count)."""
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = "; ".join(part for part in (error.context, error.problem) if part)
        return f"{where}{what}" or type(error).__name__
    return " ".join(str(error).split())
