"""Named ranges around the hooks' steps, for `torch.profiler` (`bench-pruning --profile`); free when none runs.

`step(name)` is a `record_function` range `dart_tuner::<name>` while a profiler records, else one shared no-op
context: one C call per step, so the hooks pay nothing measurable outside a profile.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch.autograd.profiler import record_function

PREFIX = "dart_tuner::"
_IDLE = nullcontext()


def step(name: str) -> AbstractContextManager:
    """A profiler range `dart_tuner::<name>` while a profiler records; a no-op context otherwise."""
    return record_function(PREFIX + name) if torch.autograd._profiler_enabled() else _IDLE


__all__ = ["PREFIX", "step"]
