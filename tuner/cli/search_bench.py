"""The `bench-search` command: measure a small grid twice (plain: fixed latency rounds; fast: early stopping by the
confident rule with dominance, feature cache and adaptive latency rounds on, each switchable), then replay every
sampler against each measured grid, report hypervolume against trials and seconds, and the early stop's false-stop
rate replayed in random orders over the plain grid's stored scores."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape

from tuner.cli.common import (
    app,
    fail,
    hide_library_progress_bars,
    interruptible,
    print_json,
    quiet_libraries,
    show_sheet,
    wide_option,
)
from tuner.errors import DartTunerError
from tuner.results.storage import DEFAULT_STORAGE

if TYPE_CHECKING:
    import optuna

    from tuner.config import PruningConfig
    from tuner.measure.early_stop import EarlyStopping
    from tuner.search.replay import MeasuredGrid
    from tuner.search.space import SearchSpace


@app.command("bench-search")
@interruptible
def bench_search(
    space_path: Path = typer.Option(Path("bench_search"), "--space", "-s",
                                    help="Search space whose grid is measured (lists, not ranges): a packaged "
                                         "name (see `dart-tuner spaces`) or a YAML file."),
    storage: str = typer.Option(DEFAULT_STORAGE, help="SQLAlchemy URL holding the two measured grid studies."),
    samplers: str = typer.Option("grid,tpe,nsga2,gp,random", help="Comma-separated samplers to replay."),
    seeds: int = typer.Option(3, help="Seeds per sampler (0..N-1)."),
    early_stop_chunk: int = typer.Option(8, help="Chunk size of the early-stopping grid."),
    feature_cache_mb: int = typer.Option(2048, help="Feature cache of the early-stopping grid (MiB)."),
    stop_rule: str = typer.Option("confident", help="Early stopping rule of the fast grid: exact (no outcome of "
                                                    "the rest reaches the floor) or confident (an upper "
                                                    "confidence bound below it)."),
    stop_level: float = typer.Option(0.95, help="Confidence level of the confident rule (and of its dominance)."),
    dominance: bool = typer.Option(True, help="Also stop a fast-grid trial whose accuracy bound is below a stored, "
                                              "faster trial's accuracy (latency measured first)."),
    false_stop_orders: int = typer.Option(200, help="Random document orders per plain-grid trial in which the fast "
                                                    "grid's floor rule is replayed, for its false-stop rate (0: "
                                                    "skip)."),
    adaptive_rounds: bool = typer.Option(True, help="Adaptive latency rounds in the fast grid (the space's "
                                                    "latency.tolerance, 5% by default); the plain grid always runs "
                                                    "all of latency.repeats. Off: its own stored grid, "
                                                    "'<study>-grid-fast-fixed-rounds'."),
    shared_timings: bool = typer.Option(True, help="Fast-grid configurations of the same prefill work share one "
                                                   "timing (latency.share_timings: study); the plain grid times "
                                                   "each. Off: its own stored grid, '...-unshared'."),
    measure: bool = typer.Option(True, help="Measure the grids that are not stored complete yet (else only "
                                            "replay stored ones)."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write summaries and every curve here ('-': on "
                                                               "stdout; messages go to stderr)."),
    csv_path: Path | None = typer.Option(None, "--csv", help="Also write every curve's steps here."),
    wide: bool = wide_option(),
) -> None:
    """Hypervolume against trials and evaluation seconds for the grid, TPE, NSGA-II, GP and random (replayed
    against a measured grid), with and without early stopping and the feature cache."""
    from tuner.bench.search import SAMPLERS, grid_hypervolume, hypervolume_2d, reference_point
    from tuner.search.replay import ReplayError
    from tuner.search.space import load_space

    names = [name.strip() for name in samplers.split(",") if name.strip()]
    unknown = [name for name in names if name not in SAMPLERS]
    if not names or unknown:
        raise fail(f"--samplers must be a comma-separated list of {', '.join(SAMPLERS)}, got {samplers!r}")
    for option, value, low in (("--seeds", seeds, 1), ("--early-stop-chunk", early_stop_chunk, 1),
                               ("--feature-cache-mb", feature_cache_mb, 1), ("--false-stop-orders",
                                                                             false_stop_orders, 0)):
        if value < low:
            raise fail(f"{option} must be at least {low}, got {value}")
    from tuner.measure.early_stop import EarlyStopping

    try:
        policy = EarlyStopping(early_stop_chunk, stop_rule, stop_level, dominance)
    except ValueError as error:
        raise fail(str(error).replace("early_stopping.rule", "--stop-rule").replace("early_stopping.level",
                                                                                     "--stop-level")) from None
    import optuna

    to_stdout = json_path == Path("-")
    console = Console(stderr=to_stdout)
    quiet_libraries()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        base = load_space(space_path).with_sampler("grid")
        grids = {variant: _grid(console, space, storage, study, measure) for variant, (space, study) in
                 grid_variants(base, policy, feature_cache_mb, adaptive_rounds, shared_timings).items()}
        reference = reference_point(grids["plain"], _floor(base, grids["plain"].baseline.accuracy))
        full = {variant: grid_hypervolume(grid, reference) for variant, grid in grids.items()}
        if full["plain"] <= 0:
            raise ReplayError("no feasible grid point is faster than the baseline: the hypervolume is 0")
        report = _report(console, base, grids, reference, full, names, seeds, wide=wide, show=not to_stdout)
    except (DartTunerError, ValueError) as error:
        raise fail(str(error)) from None
    plain_latency = {key: (m.accuracy, grids["plain"].points[key].prefill_ms)
                     for key, m in grids["fast"].points.items() if m.feasible}
    report["fast_hypervolume_with_plain_latency"] = hypervolume_2d(plain_latency.values(), reference)
    if "tpe" in names:
        report["fast_tpe_with_plain_latency"] = _tpe_like_for_like(base, grids, reference, full["plain"], seeds,
                                                                   report["second_marks"][0])
    report["adaptive_rounds"] = adaptive_rounds
    report["early_stopping"] = dataclasses.asdict(policy)
    if false_stop_orders:
        from tuner.bench.false_stops import replay_false_stops

        rate = replay_false_stops(grids["plain"], policy, reference[0], orders=false_stop_orders)
        report["false_stops"] = dataclasses.asdict(rate)
        console.print(rate.describe())
    _print_targets(console, report)
    if to_stdout:
        print_json(report)
    elif json_path is not None:
        json_path.write_text(json.dumps(report, indent=1))
    if csv_path is not None:
        with csv_path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(report["curves"][0]))
            writer.writeheader()
            writer.writerows(report["curves"])


def grid_variants(base: SearchSpace, policy: EarlyStopping, feature_cache_mb: int, adaptive_rounds: bool,
                  shared_timings: bool = True) -> dict[str, tuple[SearchSpace, str]]:
    """The two grids' spaces and study names: plain (no early stop, no cache, all latency rounds, every
    configuration timed) and fast (early stopping by `policy`, cache, adaptive rounds and shared timings unless
    switched off), in a study named by its levers, so that each setting has a stored grid of its own."""
    fixed = dataclasses.replace(base.latency, tolerance=0.0, share_timings="off")
    plain = dataclasses.replace(base, early_stopping=None, feature_cache_mb=0, latency=fixed)
    fast_latency = dataclasses.replace(base.latency if adaptive_rounds else fixed,
                                       share_timings="study" if shared_timings else "off")
    fast = dataclasses.replace(base, early_stopping=policy, feature_cache_mb=feature_cache_mb, latency=fast_latency)
    rule = "exact" if policy.rule == "exact" else f"confident{policy.level:g}"
    levers = (f"{rule}{'-dominance' if policy.dominance else ''}{'' if adaptive_rounds else '-fixed-rounds'}"
              f"{'' if shared_timings else '-unshared'}")
    return {"plain": (plain, f"{base.study}-grid"), "fast": (fast, f"{base.study}-grid-fast-{levers}")}


def _floor(space: SearchSpace, baseline_accuracy: float) -> float:
    """The study's accuracy floor, as `Tuner.accuracy_floor` computes it (0 without an accuracy constraint)."""
    floor = space.constraints.accuracy_floor(lambda: baseline_accuracy)
    return 0.0 if floor is None else floor


def _grid(console: Console, space: SearchSpace, storage: str, name: str, measure: bool) -> MeasuredGrid:
    """The measured grid of study `name` (see `_measured_grid`); ReplayError for a study that maximises its latency
    objective (throughput), since the hypervolume here is of a latency down."""
    from tuner.config.workload import objective_named
    from tuner.search.replay import ReplayError

    if space.latency.goal.maximize:  # before measuring anything
        raise ReplayError(f"{space.source}: latency.objective {space.latency.objective} is maximised; bench-search's "
                          "hypervolume needs a latency objective (prefill_ms, ttft_ms or e2e_ms)")
    grid = _measured_grid(console, space, storage, name, measure)
    if objective_named(grid.objective).maximize:
        raise ReplayError(f"study {name!r} maximises {grid.objective}; bench-search's hypervolume needs a latency "
                          "objective (prefill_ms, ttft_ms or e2e_ms)")
    return grid


def _measured_grid(console: Console, space: SearchSpace, storage: str, name: str, measure: bool) -> MeasuredGrid:
    """The measured grid of study `name`, measuring (through `Tuner`) the points it lacks when `measure`."""
    from tuner.results import StudyNotFound, open_study
    from tuner.search.replay import ReplayError, config_key, grid_configs, grid_params, measured_grid

    wanted = {config_key(c) for c in grid_configs(space)}
    try:
        grid = measured_grid(open_study(storage, name))
        lacking = wanted - set(grid.points)
        if not lacking:
            return grid
        missing = f"{len(lacking)} of its {len(wanted)} points are not measured"
    except (StudyNotFound, ReplayError) as error:
        missing = str(error)
    if not measure:
        raise ReplayError(f"study {name!r} is not a complete measured grid: {missing} (run without --no-measure "
                          "to measure it)")
    from tuner.search.study import Tuner

    rounds = (f"adaptive {space.latency.min_rounds}-{space.latency.repeats} (tolerance {space.latency.tolerance:g})"
              if space.latency.adaptive else f"{space.latency.repeats} fixed")
    console.print(f"measuring the grid into study {escape(repr(name))} ({len(wanted)} points; early stopping "
                  f"{_policy_text(space.early_stopping)}, feature cache {space.feature_cache_mb} MiB, latency rounds "
                  f"{rounds})")
    with hide_library_progress_bars():
        tuner = Tuner(space, storage, study_name=name)
        for config in _unmeasured(tuner.study, grid_configs(space)):  # grid: no retries
            tuner.study.enqueue_trial(grid_params(space, config), skip_if_exists=False)
        tuner.run(len(wanted) + 1, callbacks=[lambda study, trial: console.print(
            f"  trial {trial.number}: {trial.state.name.lower()} "
            f"{escape(str(trial.values or trial.user_attrs.get('failure', '')))}", highlight=False)])
    return measured_grid(tuner.study)


def _unmeasured(study: optuna.Study, configs: list[PruningConfig]) -> list[PruningConfig]:
    """The configurations among `configs` that no complete trial of `study` holds yet, once it has trials."""
    from optuna.trial import TrialState

    from tuner.results import config_of
    from tuner.search.replay import config_key

    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not trials:
        return []  # a new study: the grid sampler visits every point
    done = {config_key(config_of(t)) for t in trials if config_of(t) is not None}
    return [c for c in configs if config_key(c) not in done]


def _report(console: Console, space: SearchSpace, grids: dict[str, MeasuredGrid], reference: tuple[float, float],
            full: dict[str, float], names: list[str], seeds: int, *, wide: bool = False, show: bool = True) -> dict:
    """Replay every sampler on both grids, print the table (compact or `wide`; not when `show` is False), and
    return everything measured as plain data, the table's cells included."""
    from tuner.bench.search import checkpoints_for, curve_rows, hypervolume_sheet, run_replays, summarise

    n_points = len(grids["plain"].points)
    checkpoints = checkpoints_for(n_points)
    plain_seconds = grids["plain"].seconds()[0]
    second_marks = [round(plain_seconds * f, 1) for f in (0.25, 0.5, 1.0)]
    summaries, curves = [], []
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # GP's and the grid's per-trial fallback warnings
    for variant, grid in grids.items():
        with console.status(f"replaying {', '.join(names)} x {seeds} seeds against the {variant} grid..."):
            replayed = run_replays(space, grid, reference, names, range(seeds))
        summaries += summarise(variant, replayed, full["plain"], checkpoints, second_marks)
        curves += curve_rows(variant, replayed, full["plain"])
    sheet = hypervolume_sheet(summaries, checkpoints, second_marks, n_points=n_points, seeds=seeds,
                              reference=reference)
    if show:
        show_sheet(console, sheet, wide=wide)
    return {"note": "replayed against a measured grid: each sampler proposes grid points and receives the values "
                    "and seconds measured once per point; a repeated proposal is pruned at no cost, as in tune",
            "reference": {"accuracy": reference[0], "prefill_ms": reference[1]},
            "grids": {v: {"points": len(g.points), "trial_seconds": g.seconds()[0], "eval_seconds": g.seconds()[1],
                          "documents": g.documents(), "latency_seconds": g.latency()[0],
                          "latency_rounds": g.latency()[1],
                          "hypervolume": full[v], "feasible": sorted(k for k, m in g.points.items() if m.feasible),
                          "stopped": sum(m.stopped for m in g.points.values())} for v, g in grids.items()},
            "checkpoints": checkpoints, "second_marks": second_marks,
            "summaries": [dataclasses.asdict(s) for s in summaries], "curves": curves, "table": sheet.as_json()}


def _tpe_like_for_like(space: SearchSpace, grids: dict[str, MeasuredGrid], reference: tuple[float, float],
                       full: float, seeds: int, budget: float) -> float:
    """TPE replayed on the fast grid with the plain grid's latencies (its own accuracies, stops and seconds): the
    mean fraction of the plain grid's hypervolume within `budget` seconds, free of the two runs' latency noise."""
    from tuner.bench.search import run_replays

    plain, fast = grids["plain"], grids["fast"]
    points = {key: dataclasses.replace(m, prefill_ms=plain.points[key].prefill_ms) for key, m in fast.points.items()}
    like = dataclasses.replace(fast, points=points, baseline=dataclasses.replace(
        fast.baseline, prefill_ms=plain.baseline.prefill_ms))
    curves = run_replays(space, like, reference, ["tpe"], range(seeds))
    return sum(c.at_seconds(budget) for c in curves) / len(curves) / full


def _policy_text(policy: EarlyStopping | None) -> str:
    """An early-stopping policy in a few words, for the progress line."""
    if policy is None:
        return "off"
    rule = "exact" if policy.rule == "exact" else f"confident at {policy.level:g}"
    return f"{rule} in chunks of {policy.chunk_size}{', with dominance' if policy.dominance else ''}"


def _print_targets(console: Console, report: dict) -> None:
    """The issue's targets, met or not, with what was measured."""
    from tuner.measure.early_stop import EarlyStopping

    plain, fast = report["grids"]["plain"], report["grids"]["fast"]
    levers = (f"early stopping ({_policy_text(EarlyStopping(**report['early_stopping']))}), feature cache"
              f"{', adaptive rounds' if report['adaptive_rounds'] else ''}")
    for kind, unit in (("trial_seconds", " s"), ("eval_seconds", " s"), ("latency_seconds", " s"),
                       ("latency_rounds", ""), ("documents", "")):
        change = fast[kind] / plain[kind] - 1
        console.print(f"{kind.replace('_', ' ')}: plain grid {plain[kind]:.0f}{unit}, fast grid ({levers}) "
                      f"{fast[kind]:.0f}{unit}: {100 * abs(change):.1f}% {'fewer' if change < 0 else 'more'}")
    seconds = fast["trial_seconds"] / plain["trial_seconds"]
    rounds = fast["latency_rounds"] / plain["latency_rounds"]
    console.print(f"target 1, the fast grid within 50% of the plain grid's trial seconds and latency rounds: "
                  f"{100 * seconds:.1f}% of the seconds, {100 * rounds:.1f}% of the rounds -> "
                  f"{'met' if seconds <= 0.5 and rounds <= 0.5 else 'missed'}")
    kept = report["fast_hypervolume_with_plain_latency"] / plain["hypervolume"]
    own = fast["hypervolume"] / plain["hypervolume"]
    same = plain["feasible"] == fast["feasible"]
    console.print(f"target 2, the fast grid keeps >= 97% of the plain grid's hypervolume like for like (its feasible "
                  f"points at the plain run's latencies): {100 * kept:.1f}% -> {'met' if kept >= 0.97 else 'missed'}"
                  f" (with its own latencies {100 * own:.1f}%; same feasible set: {'yes' if same else 'no'}; "
                  f"{fast['stopped']} of {fast['points']} trials stopped early)")
    quarter = report["second_marks"][0]
    tpe = next((s for s in report["summaries"] if s["variant"] == "fast" and s["sampler"] == "tpe"), None)
    if tpe is not None:
        at = tpe["fraction_at_seconds"][quarter]
        like = report.get("fast_tpe_with_plain_latency")
        console.print(f"target 3, TPE on the fast grid >= 95% of the plain grid's hypervolume within a quarter of its "
                      f"seconds ({quarter:.0f} s): {100 * at:.1f}% (mean of seeds) -> "
                      f"{'met' if at >= 0.95 else 'missed'}"
                      + ("" if like is None else f" (at the plain run's latencies: {100 * like:.1f}%)"))
