"""The timing protocol (interleaving, warm-up, statistics) and the bench-pruning command: its rows, the selection
cost of every method, and the methods it cannot run."""

import json
import time
from contextlib import contextmanager

import pytest
from typer.testing import CliRunner

from conftest import bundled_methods
from tuner.bench.pruning import DEFAULT_BUDGETS, default_methods, run_benchmark
from tuner.cli import app
from tuner.measure.latency import MIN_ROUNDS, Timing, measure_interleaved, speedup_spread
from tuner.pruning import PruningMethod, Selection, SelectionContext, register_method


def test_timing_statistics():
    timing = Timing((10.0, 12.0, 11.0, 100.0, 13.0))
    assert timing.median_ms == 12.0
    assert timing.iqr_ms == pytest.approx(13.0 - 11.0)  # the one stall does not widen the spread
    assert timing.repeats == 5


# Ten rounds of a tight baseline near 100 ms, and a candidate at half of it.
TIGHT = (100.0, 101.0, 99.0, 100.5, 100.2, 99.8, 100.1, 100.3, 99.9, 100.0)
HALF = tuple(ms / 2 + wobble for ms, wobble in zip(TIGHT, (0.2, -0.3, 0.1, 0.0, -0.1, 0.3, -0.2, 0.1, 0.0, -0.1)))
# Ten rounds on a busy machine: the same spread for both, the baseline's slow rounds paired with fast candidates.
BUSY = (20.0, 190.0, 35.0, 160.0, 60.0, 45.0, 180.0, 25.0, 150.0, 100.0)
BUSY_SHUFFLED = (180.0, 25.0, 150.0, 45.0, 190.0, 160.0, 20.0, 100.0, 35.0, 60.0)


def test_a_clear_speedup_with_tight_rounds_is_not_noisy():
    spread = speedup_spread(Timing(TIGHT), Timing(HALF))
    assert spread.speedup == pytest.approx(2.0, rel=0.01)
    assert spread.low <= spread.speedup <= spread.high and spread.high - spread.low < 0.05
    assert not spread.noisy and spread.warning == ""


def test_equal_medians_with_huge_spread_are_noisy_and_say_why():
    """The busy-machine case: both medians equal, the rounds spread over 10x; the speed-up means nothing."""
    spread = speedup_spread(Timing(BUSY), Timing(BUSY_SHUFFLED))
    assert spread.speedup == pytest.approx(1.0) and spread.noisy
    assert "baseline's prefill IQR" in spread.warning and "candidate's prefill IQR" in spread.warning
    assert spread.low < 0.5 and spread.high > 2.0


def test_an_interval_holding_one_makes_a_large_speedup_noisy():
    """A 1.5x median speed-up whose rounds disagree (two candidate rounds slower than the baseline's) is noisy,
    although each configuration's own IQR is small."""
    baseline = Timing((100.0,) * 10)
    candidate = Timing((66.0, 67.0, 130.0, 65.0, 68.0, 140.0, 66.0, 67.0, 68.5, 66.5))
    spread = speedup_spread(baseline, candidate)
    assert spread.speedup == pytest.approx(100 / 67) and candidate.iqr_ms < 0.1 * candidate.median_ms
    assert spread.noisy and spread.warning == "its interval 0.77-1.52x holds 1.00x"  # ratios x_(2), x_(9) of 10


@pytest.mark.parametrize(("baseline", "candidate"), [(TIGHT, HALF), (BUSY, BUSY_SHUFFLED), (TIGHT[:5], HALF[:5]),
                                                     ((40.0, 90.0, 41.0, 43.0, 88.0, 42.0, 39.0, 91.0),
                                                      (30.0, 21.0, 35.0, 90.0, 22.0, 60.0, 33.0, 20.0))])
def test_the_interval_brackets_the_speedup_shown(baseline, candidate):
    """The interval of the per-round ratios must hold the ratio of the medians that tables print."""
    spread = speedup_spread(Timing(baseline), Timing(candidate))
    assert spread.low <= spread.speedup <= spread.high
    assert spread.speedup == pytest.approx(Timing(baseline).median_ms / Timing(candidate).median_ms)


def test_too_few_rounds_are_noisy_and_unpaired_timings_are_refused():
    spread = speedup_spread(Timing(TIGHT[:MIN_ROUNDS - 1]), Timing(HALF[:MIN_ROUNDS - 1]))
    assert spread.noisy and f"only {MIN_ROUNDS - 1} timed rounds" in spread.warning
    assert not speedup_spread(Timing(TIGHT[:MIN_ROUNDS]), Timing(HALF[:MIN_ROUNDS])).noisy
    with pytest.raises(ValueError, match="same number of rounds"):
        speedup_spread(Timing(TIGHT), Timing(HALF[:5]))


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


@register_method("test_sleepy_selection")
class SleepySelection(PruningMethod):
    """Test-only: keeps each row's first vision tokens after sleeping SLEEP_MS, so its selection cost is known."""

    def select(self, ctx: SelectionContext) -> Selection:
        time.sleep(SLEEP_MS / 1000)
        return Selection([ctx.vision_positions(row)[:budget] for row, budget in enumerate(ctx.budgets)])


@register_method("test_needs_option")
class NeedsOption(PruningMethod):
    """Test-only: refuses a configuration without its `size` option (as a method with a required option would)."""

    option_defaults = {"size": None}

    @classmethod
    def validate(cls, config) -> None:
        super().validate(config)
        if config.options.get("size") is None:
            raise ValueError("test_needs_option needs option size")


@register_method("test_breaks")
class Breaks(PruningMethod):
    """Test-only: fails inside the prefill, as a method needing what the bench model lacks would."""

    def select(self, ctx: SelectionContext) -> Selection:
        raise RuntimeError("no image grids here")


SLEEP_MS = 20.0
TINY = {"hidden": 64, "layers": 2, "layer": 1, "repeats": 1, "warmup": 0}


def test_bench_pruning_prints_and_writes_every_configuration(tmp_path):
    """Every default method at every budget (or a skip saying why), and the selection column of each row."""
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench-pruning", "--repeats", "1", "--warmup", "0", "--hidden", "64",
                                      "--layers", "4", "--threads", "1", "--json", str(out)],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "keep_all overhead" in result.output and "select ms (IQR)" in result.output
    data = json.loads(out.read_text())
    rows = {row["name"]: row for row in data["rows"]}
    expected = {f"{m} {b}" for m in default_methods() for b in DEFAULT_BUDGETS}
    assert set(rows) | set(data["skipped"]) == {"no hooks", "keep_all"} | expected
    assert all(name.startswith("test_") for name in data["skipped"]), data["skipped"]  # bundled methods all run
    assert rows["no hooks"]["bound"] == 1.0 and rows["no hooks"]["speedup"] == 1.0
    assert rows["no hooks"]["select_ms"] is None and rows["keep_all"]["select_ms"] >= 0
    assert rows["dart 64"]["tokens_after_k"] == 40 + 64
    assert rows["dart 64"]["bound"] == pytest.approx(4 * 616 / (2 * 616 + 2 * 104))
    for name, row in rows.items():
        assert row["tokens_after_k"] == 40 + row["kept_vision"]
        if row["budget"] is not None and row["method"] in bundled_methods():  # not other test files' methods
            assert 0 < row["kept_vision"] < 576, name  # what the method kept: avgpool keeps a square grid
            assert 0 < row["select_ms"] < row["median_ms"], name
            assert row["select_share"] == pytest.approx(row["select_ms"] / row["median_ms"])
    for method in ("dart", "fastv", "random", "window_fastv"):
        assert [rows[f"{method} {b}"]["kept_vision"] for b in DEFAULT_BUDGETS] == list(DEFAULT_BUDGETS)
    # The kept count is what the hooks saw kept: avgpool pools 3x3 windows at 64 (8 x 8 = 64), 2x2 at 128 and 192.
    assert [rows[f"avgpool {b}"]["kept_vision"] for b in DEFAULT_BUDGETS] == [64, 144, 144]
    assert "dart_selection_ms" not in data


def test_bench_selection_cost_is_the_one_inside_each_timed_prefill():
    """A selection that sleeps SLEEP_MS shows at least that, inside its own prefill; keep_all's stays far below."""
    result = run_benchmark(methods=("test_sleepy_selection", "fastv", "keep_all"), budgets=(32, 100), **TINY)
    rows = {row.name: row for row in result.rows}
    assert list(rows) == ["no hooks", "keep_all", "test_sleepy_selection 32", "test_sleepy_selection 100",
                          "fastv 32", "fastv 100"]  # keep_all is its own row once, never a method x budget row
    for budget in (32, 100):
        sleepy = rows[f"test_sleepy_selection {budget}"]
        assert SLEEP_MS <= sleepy.select_ms <= sleepy.median_ms and sleepy.kept_vision == budget
        assert rows[f"fastv {budget}"].select_ms < SLEEP_MS
    assert rows["keep_all"].select_ms < SLEEP_MS and rows["keep_all"].kept_vision == 576
    assert rows["no hooks"].select_ms is None and not result.skipped


def test_bench_reports_methods_that_cannot_run_and_refuses_unknown_ones():
    result = run_benchmark(methods=("test_needs_option", "test_breaks", "random"), budgets=(64,), **TINY)
    assert [row.name for row in result.rows] == ["no hooks", "keep_all", "random 64"]
    assert result.skipped == {"test_needs_option 64": "ValueError: test_needs_option needs option size",
                              "test_breaks 64": "RuntimeError: no image grids here"}
    with pytest.raises(ValueError, match="unknown pruning method 'nope'"):
        run_benchmark(methods=("nope",), **TINY)
    cli = CliRunner().invoke(app, ["bench-pruning", "--method", "nope", "--hidden", "64", "--layers", "2"])
    assert cli.exit_code == 2 and "nope" in cli.output and "Traceback" not in cli.output
    cli = CliRunner().invoke(app, ["bench-pruning", "--layer", "2", "--hidden", "64", "--layers", "2"])
    assert cli.exit_code == 2 and "layer K=2 is out of range" in " ".join(cli.output.split())
