"""The search benchmark: 2-D hypervolume by hand, replay charging against a hand-built grid, and bad CLI input."""

import dataclasses

import pytest
from typer.testing import CliRunner

from tuner.bench.search import Curve, grid_hypervolume, hypervolume_2d
from tuner.cli import app
from tuner.config.workload import Workload
from tuner.search.replay import Measured, MeasuredGrid, ReplayError, config_key, grid_configs, replay
from tuner.search.space import parse_space

REF = (0.5, 20.0)  # (accuracy floor, prefill ms of the baseline)


def test_one_point_is_a_rectangle():
    assert hypervolume_2d([(0.9, 10.0)], REF) == pytest.approx((20 - 10) * (0.9 - 0.5))


def test_two_points_are_a_staircase_and_a_dominated_one_adds_nothing():
    # fastest (0.7 at 5 ms) covers 5..10 ms at height 0.2; then 0.9 at 10 ms covers 10..20 at height 0.4
    assert hypervolume_2d([(0.9, 10.0), (0.7, 5.0)], REF) == pytest.approx(5 * 0.2 + 10 * 0.4)
    assert hypervolume_2d([(0.9, 10.0), (0.7, 5.0), (0.6, 12.0), (0.7, 6.0)], REF) == pytest.approx(5.0)


def test_points_outside_the_reference_add_nothing():
    assert hypervolume_2d([(0.4, 3.0), (0.95, 25.0), (0.5, 1.0), (0.9, 20.0)], REF) == 0.0
    assert hypervolume_2d([], REF) == 0.0


def _measured(accuracy, ms, seconds, *, infeasible=False, stopped=False):
    return Measured(accuracy, ms, {"min_relative_accuracy": 0.1 if infeasible else -0.1}, stopped, seconds,
                    seconds / 2)


def test_infeasible_and_stopped_points_do_not_count():
    grid = MeasuredGrid(_measured(1.0, 20.0, 1.0), {
        "a": _measured(0.9, 10.0, 1.0), "b": _measured(0.99, 2.0, 1.0, infeasible=True),
        "c": _measured(0.98, 3.0, 1.0, stopped=True)})
    assert grid_hypervolume(grid, REF) == pytest.approx(10 * 0.4)


SPACE = parse_space({"model": "m", "tasks": ["t"], "methods": ["dart", "pooling"], "layer": [2],
                     "options": {"dart": {"n_image_pivots": 4, "n_text_pivots": 4}}, "keep_ratio": [0.1, 0.5],
                     "constraints": {"min_relative_accuracy": 0.75}})


def _four_point_grid() -> MeasuredGrid:
    """dart and pooling at 0.1 and 0.5; pooling 0.1 infeasible; every point its own seconds (powers of two)."""
    configs = {(c.method, c.keep_ratio): config_key(c) for c in grid_configs(SPACE)}
    return MeasuredGrid(_measured(1.0, 20.0, 1.0), {
        configs["dart", 0.1]: _measured(0.8, 8.0, 2.0), configs["dart", 0.5]: _measured(0.95, 14.0, 4.0),
        configs["pooling", 0.1]: _measured(0.6, 6.0, 8.0, infeasible=True),
        configs["pooling", 0.5]: _measured(0.9, 12.0, 16.0)})


@pytest.mark.parametrize("sampler", ["grid", "random", "tpe", "gp", "nsga2"])
def test_a_replay_gets_the_stored_values_and_pays_each_point_once(sampler):
    """Whatever the order and however many repeats a sampler proposes, the four points cost 1 + 2+4+8+16 s: a repeat
    is pruned unmeasured, as Tuner does (the grid sampler re-proposes the queued paper setting, dart 0.1)."""
    grid = _four_point_grid()
    steps = replay(SPACE, grid, sampler, seed=0)
    assert steps[0].n_configs == 0 and steps[0].seconds == 1.0  # the baseline first
    assert steps[1].points == ((0.8, 8.0),)  # then DART's paper setting (keep 0.1 is closest to 0.25)
    assert [s.n_configs for s in steps] == [0, 1, 2, 3, 4]
    assert steps[-1].seconds == 1.0 + 2 + 4 + 8 + 16
    assert sorted(b.seconds - a.seconds for a, b in zip(steps, steps[1:])) == [2.0, 4.0, 8.0, 16.0]
    assert sorted(steps[-1].points) == [(0.8, 8.0), (0.9, 12.0), (0.95, 14.0)]  # pooling 0.1 is infeasible


def test_a_grid_without_the_proposed_point_says_so():
    grid = _four_point_grid()
    partial = MeasuredGrid(grid.baseline, dict(list(grid.points.items())[:1]))
    with pytest.raises(ReplayError, match="has no trial for"):
        replay(SPACE, partial, "grid", seed=0)


def test_curve_lookups():
    curve = Curve("tpe", 0, (0, 1, 2), (1.0, 3.0, 7.0), (0.0, 2.0, 5.0))
    assert curve.at_configs(1) == 2.0 and curve.at_configs(9) == 5.0
    assert curve.at_seconds(0.5) == 0.0 and curve.at_seconds(6.9) == 2.0
    assert curve.first_reaching(4.0) == (2, 7.0) and curve.first_reaching(6.0) is None


@pytest.mark.parametrize(("args", "message"), [
    (["--samplers", "tpe,cmaes"], "--samplers must be a comma-separated list of grid, tpe, nsga2, gp, random"),
    (["--seeds", "0"], "--seeds must be at least 1, got 0"),
    (["--space", "nope.yaml"], "nope.yaml"),
    (["--stop-rule", "bayes"], "--stop-rule must be one of exact, confident, got 'bayes'"),
    (["--stop-level", "1.5"], "--stop-level must be a number in [0.5, 1), got 1.5"),
    (["--false-stop-orders", "-1"], "--false-stop-orders must be at least 0, got -1"),
])
def test_bad_input_is_one_line(args, message, tmp_path):
    result = CliRunner().invoke(app, ["bench-search", "--storage", f"sqlite:///{tmp_path}/b.db", *args])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_a_range_space_or_a_missing_grid_is_one_line(tmp_path):
    space = tmp_path / "s.yaml"
    space.write_text("model: m\ntasks: [t]\nmethods: [dart]\nlayer: [2]\nkeep_ratio: {low: 0.1, high: 0.5}\n")
    result = CliRunner().invoke(app, ["bench-search", "--space", str(space), "--no-measure"])
    assert result.exit_code == 2 and "keep_ratio: the grid sampler needs a list of values" in result.output
    space.write_text("model: m\ntasks: [t]\nmethods: [dart]\nlayer: [2]\nkeep_ratio: [0.1]\nstudy: b\n")
    result = CliRunner().invoke(app, ["bench-search", "--space", str(space), "--no-measure",
                                      "--storage", f"sqlite:///{tmp_path}/b.db"])
    assert result.exit_code == 2
    assert "study 'b-grid' is not a complete measured grid: no study 'b-grid' in this storage" in result.output


def test_a_grid_sums_its_latency_seconds_and_rounds():
    point = Measured(accuracy=0.9, prefill_ms=10.0, constraints={}, stopped=False, trial_seconds=5.0,
                     eval_seconds=3.0, documents=12, latency_seconds=1.5, latency_rounds=10)
    old = Measured(accuracy=0.9, prefill_ms=10.0, constraints={}, stopped=False, trial_seconds=5.0, eval_seconds=3.0)
    grid = MeasuredGrid(point, {"a": point, "b": old})  # "b": a trial stored before latency seconds were
    assert grid.latency() == (3.0, 20) and grid.seconds() == (15.0, 9.0) and grid.documents() == 24


@pytest.mark.parametrize("adaptive", [True, False])
def test_only_the_fast_grid_runs_adaptive_rounds_and_off_has_its_own_study(adaptive):
    """Catches a plain grid that stops its rounds early (its rounds are the yardstick), or a fast grid replayed
    from another setting's study (fixed rounds, another rule, level or dominance)."""
    from tuner.cli.search_bench import grid_variants
    from tuner.measure.early_stop import EarlyStopping

    base = dataclasses.replace(SPACE, latency=Workload(repeats=10))
    policy = EarlyStopping(8, "confident", 0.95, True)
    variants = grid_variants(base, policy, 64, adaptive)
    (plain, plain_study), (fast, fast_study) = variants["plain"], variants["fast"]
    assert not plain.latency.adaptive and plain.early_stopping is None and plain_study == f"{SPACE.study}-grid"
    assert fast.latency.adaptive is adaptive and fast.early_stopping == policy and fast.feature_cache_mb == 64
    assert fast_study == f"{SPACE.study}-grid-fast-confident0.95-dominance" + ("" if adaptive else "-fixed-rounds")
    names = {grid_variants(base, other, 64, adaptive)["fast"][1] for other in (
        policy, EarlyStopping(8), EarlyStopping(8, "confident", 0.9, True), EarlyStopping(8, "confident", 0.95))}
    assert len(names) == 4
    assert plain.latency.share_timings == "off" and fast.latency.share_timings == "study"
    unshared, unshared_study = grid_variants(base, policy, 64, adaptive, shared_timings=False)["fast"]
    assert unshared.latency.share_timings == "off" and unshared_study == fast_study + "-unshared"


def test_the_targets_are_judged_from_the_report():
    """A report where the fast grid took 40% of the seconds, 60% of the rounds, kept 98% of the hypervolume like for
    like and TPE reached 96% within a quarter of the seconds: targets 1 missed (rounds), 2 and 3 met."""
    from rich.console import Console

    from tuner.cli.search_bench import _print_targets

    grid = {"trial_seconds": 100.0, "eval_seconds": 50.0, "latency_seconds": 40.0, "latency_rounds": 100,
            "documents": 1000, "hypervolume": 10.0, "feasible": ["a"], "points": 32, "stopped": 0}
    fast = {**grid, "trial_seconds": 40.0, "latency_rounds": 60, "documents": 700, "hypervolume": 9.0, "stopped": 9}
    report = {"grids": {"plain": grid, "fast": fast}, "fast_hypervolume_with_plain_latency": 9.8,
              "adaptive_rounds": True, "second_marks": [25.0, 50.0, 100.0],
              "early_stopping": {"chunk_size": 8, "rule": "confident", "level": 0.95, "dominance": True},
              "summaries": [{"variant": "fast", "sampler": "tpe", "fraction_at_seconds": {25.0: 0.96}}],
              "fast_tpe_with_plain_latency": 0.99}
    console = Console(record=True, width=400)
    _print_targets(console, report)
    text = console.export_text()
    assert "40.0% of the seconds, 60.0% of the rounds -> missed" in text
    assert "like for like (its feasible points at the plain run's latencies): 98.0% -> met" in text
    assert "quarter of its seconds (25 s): 96.0% (mean of seeds) -> met (at the plain run's latencies: 99.0%)" in text
    assert "confident at 0.95 in chunks of 8, with dominance" in text


def test_tpe_like_for_like_takes_the_plain_latencies_and_the_fast_seconds():
    """A fast grid timed 10x slower (every point outside the reference) and 2x cheaper: with its own latencies it
    has no hypervolume, at the plain run's it has all of it, within half the plain grid's seconds."""
    from tuner.cli.search_bench import _tpe_like_for_like

    plain = _four_point_grid()
    slow = {key: dataclasses.replace(m, prefill_ms=m.prefill_ms * 10, trial_seconds=m.trial_seconds / 2)
            for key, m in plain.points.items()}
    fast = MeasuredGrid(dataclasses.replace(plain.baseline, prefill_ms=200.0, trial_seconds=0.5), slow)
    assert grid_hypervolume(fast, REF) == 0.0
    full = grid_hypervolume(plain, REF)
    assert _tpe_like_for_like(SPACE, {"plain": plain, "fast": fast}, REF, full, 2, 31 / 2) == pytest.approx(1.0)
    assert _tpe_like_for_like(SPACE, {"plain": plain, "fast": fast}, REF, full, 2, 0.4) == 0.0  # not even the baseline
