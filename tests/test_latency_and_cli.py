"""The timing protocol (interleaving, warm-up, statistics) and the bench-pruning command's output."""

import json
from contextlib import contextmanager

import pytest
from typer.testing import CliRunner

from tuner.cli import app
from tuner.latency import MIN_ROUNDS, Timing, measure_interleaved, speedup_spread


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


def test_hook_selection_ms_reads_the_hooks_record_for_every_method_and_budget():
    from tuner.bench_pruning import hook_selection_ms

    times = hook_selection_ms(("divprune", ("dart", {"pivot_metric": "hidden_l1"})), budgets=(64, 192), repeats=2,
                              warmup=1, hidden=64, layers=3)
    assert set(times) == {"divprune 64", "divprune 192", "dart pivot_metric=hidden_l1 64",
                          "dart pivot_metric=hidden_l1 192"}
    assert all(0 < t["min"] <= t["median"] for t in times.values())  # 0.0 is the default: nothing was recorded


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
