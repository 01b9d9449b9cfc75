"""A space's `early_stopping` section: `{chunk_size, rule: exact|confident, level: 0.95, dominance: false}`,
validated into the measurer's `EarlyStopping` policy (`tuner.measure.early_stop`), each key with a one-line error."""

from __future__ import annotations

import dataclasses
from typing import Any

from tuner.measure.early_stop import RULES, EarlyStopping
from tuner.search.params import Reader

KEYS = {field.name for field in dataclasses.fields(EarlyStopping)}


def parse_early_stopping(r: Reader, value: Any) -> EarlyStopping | None:
    """The policy of a space's `early_stopping` mapping; None when the section is absent (early stopping off)."""
    section = r.mapping("early_stopping", value, KEYS)
    if not section:
        return None
    if "chunk_size" not in section:
        raise r.fail("early_stopping", "needs chunk_size (documents scored between two looks), e.g. {chunk_size: 8}")
    r.number("early_stopping.chunk_size", section["chunk_size"], integer=True, low=1)
    if "rule" in section:
        r.choice("early_stopping.rule", section["rule"], RULES)
    if "level" in section:
        r.number("early_stopping.level", section["level"], integer=False, low=0.5)
        if section["level"] >= 1:
            raise r.fail("early_stopping.level", f"must be < 1 (a confidence level), got {section['level']!r}")
    if "dominance" in section and not isinstance(section["dominance"], bool):
        raise r.fail("early_stopping.dominance", f"must be true or false, got {section['dominance']!r}")
    return EarlyStopping(**section)


def with_chunk_size(policy: EarlyStopping | None, chunk_size: int | None) -> EarlyStopping | None:
    """The policy with another chunk size (`tune --early-stop-chunk`), or a default exact one if there was none."""
    if chunk_size is None:
        return policy
    return EarlyStopping(chunk_size) if policy is None else dataclasses.replace(policy, chunk_size=chunk_size)
