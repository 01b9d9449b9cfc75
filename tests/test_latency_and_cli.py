"""The timing protocol (interleaving, warm-up, statistics) and the bench-pruning command's output."""

import json
from contextlib import contextmanager

import pytest
from typer.testing import CliRunner

from tuner.cli import app
from tuner.latency import Timing, measure_interleaved


def test_timing_statistics():
    timing = Timing((10.0, 12.0, 11.0, 100.0, 13.0))
    assert timing.median_ms == 12.0
    assert timing.iqr_ms == pytest.approx(13.0 - 11.0)  # the one stall does not widen the spread
    assert timing.repeats == 5


def test_configurations_are_interleaved_with_rotating_order_and_warmup_discarded():
    order: list[str] = []
    current: list[str] = []

    def setup(name):
        @contextmanager
        def enter():
            current.append(name)
            yield
            current.pop()
        return enter

    timings = measure_interleaved(lambda: order.append(current[-1]), {n: setup(n) for n in "abc"},
                                  repeats=3, warmup=1)
    assert order == list("abc" "bca" "cab" "abc")  # one warm-up round, then rotated rounds
    assert all(t.repeats == 3 for t in timings.values())
    with pytest.raises(ValueError, match="repeats"):
        measure_interleaved(lambda: None, {"a": None}, repeats=0)


def test_bench_pruning_prints_and_writes_every_configuration(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench-pruning", "--repeats", "1", "--warmup", "0", "--hidden", "128",
                                      "--layers", "4", "--threads", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "keep_all overhead" in result.output
    data = json.loads(out.read_text())
    rows = {row["name"]: row for row in data["rows"]}
    assert set(rows) == {"no hooks", "keep_all"} | {f"{m} {b}" for m in ("dart", "random", "fastv")
                                                     for b in (64, 128, 192)}
    assert rows["no hooks"]["bound"] == 1.0 and rows["no hooks"]["speedup"] == 1.0
    assert rows["dart 64"]["tokens_after_k"] == 40 + 64
    assert rows["dart 64"]["bound"] == pytest.approx(4 * 616 / (2 * 616 + 2 * 104))
    assert set(data["dart_selection_ms"]) == {"dart 64", "dart 128", "dart 192"}
