"""A --limit above a task's size says so in one line instead of silently using the whole task."""

from __future__ import annotations

import logging

import pytest

from tuner.evaluation.tasks import BUNDLED_TASKS_DIR, load_tasks


def test_a_limit_above_the_tasks_size_is_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="tuner.evaluation.tasks"):
        (task,) = load_tasks(["dart_shapes"], subset_size=100000, include_paths=[BUNDLED_TASKS_DIR])
    lines = [r.getMessage() for r in caplog.records if "--limit" in r.getMessage()]
    total = task.subset.total
    assert lines == [f"task dart_shapes: --limit 100000 is more than its {total} documents; using all {total}"]
    assert task.subset.size == total
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tuner.evaluation.tasks"):
        load_tasks(["dart_shapes"], subset_size=10, include_paths=[BUNDLED_TASKS_DIR])
    assert not [r for r in caplog.records if "--limit" in r.getMessage()]
