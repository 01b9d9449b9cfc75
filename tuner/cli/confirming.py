"""The `confirm` command (also run at the end of `tune`): the front re-measured, printed with its confirmed numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from tuner.cli.common import (
    app,
    fail,
    hide_library_progress_bars,
    interruptible,
    json_option,
    quiet_libraries,
    show_sheet,
    start_up_line,
    wide_option,
)
from tuner.errors import DartTunerError
from tuner.results.storage import DEFAULT_STORAGE


def run_confirmation(console: Console, study: Any, setup: Any, *, repeats: int, fresh_limit: int | None,
                     fresh_seed: int, wide: bool = False, as_json: bool = False) -> None:
    """Confirm `study`'s front with `setup`'s measurer (a `tuner.search.setup.MeasuringSetup`;
    `tuner.search.confirm.confirm`) with a spinner, then print the front with its confirmed numbers (just the front
    when it holds no pruned trial), compact, `wide` or `as_json` on stdout. `fresh_limit` None: the study's subset
    size; 0: latency only."""
    from tuner.results.tables import pareto_sheet
    from tuner.search.confirm import confirm, front_to_confirm

    if not front_to_confirm(study):
        show_sheet(console, pareto_sheet(study), wide=wide, as_json=as_json)
        console.print("nothing to confirm: the feasible Pareto front holds no pruned trial")
        return
    size = fresh_limit if fresh_limit is not None else min(t.subset.size for t in setup.tasks)
    with console.status("Confirming the front...") as status, hide_library_progress_bars():
        confirm(setup.measurer, study, setup.space, repeats=repeats, fresh_size=size or None,
                fresh_seed=fresh_seed, on_step=lambda step: status.update(f"Confirming the front: {step}..."))
    show_sheet(console, pareto_sheet(study), wide=wide, as_json=as_json)
    console.print(f"confirmed: {repeats} interleaved rounds with the baseline"
                  + (f", accuracy on a fresh subset of {size} documents per task (seed {fresh_seed}), disjoint "
                     "from the search's" if size else "") + "; the search-time numbers are unchanged")


@app.command("confirm")
@interruptible
def confirm_command(
    space_path: Path = typer.Option(..., "--space", "-s", help="The search space the study was tuned with: a "
                                                               "packaged name (see `dart-tuner spaces`) or a "
                                                               "YAML file."),
    storage: str = typer.Option(DEFAULT_STORAGE, help="SQLAlchemy URL of the Optuna storage."),
    study: str | None = typer.Option(None, help="Study name (default: the space's `study`, else its file name)."),
    limit: int | None = typer.Option(None, min=1, help="Override the subset size (documents per task; default: "
                                                       "the size the study was tuned on, `tune --limit` included)."),
    allow_mixed: bool = typer.Option(False, help="Confirm a study whose provenance differs from this run."),
    repeats: int = typer.Option(20, min=1, help="Interleaved latency rounds of the front and the baseline."),
    fresh_limit: int | None = typer.Option(None, min=0, help="Documents per task of the fresh accuracy subset, "
                                                             "disjoint from the search's (default: the same size; "
                                                             "0: latency only)."),
    fresh_seed: int = typer.Option(1, help="Seed of the fresh subset."),
    wide: bool = wide_option(),
    as_json: bool = json_option(),
) -> None:
    """Re-measure a study's Pareto front: one interleaved latency run with the baseline and more repeats, and
    accuracy on a fresh disjoint subset. Stored next to the search-time numbers, which stay unchanged."""
    import optuna
    from rich.markup import escape

    from tuner.results import open_study
    from tuner.results.record import PROVENANCE_ATTR
    from tuner.results.storage import open_for_reading, open_for_tuning
    from tuner.search.confirm import stored_subset
    from tuner.search.provenance import check_same_setup
    from tuner.search.setup import MeasuringSetup
    from tuner.search.space import load_space

    console = Console(stderr=as_json)
    quiet_libraries()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        space = load_space(space_path)
        name = study or space.study
        stored = open_study(open_for_reading(storage), name)  # confirm never creates a study
        size, seed = stored_subset(stored)  # the documents the study was tuned on, not the space's default
        space = space.with_overrides(subset_size=limit if limit is not None else size, subset_seed=seed)
        with console.status(f"Loading {escape(space.model)} and {escape(', '.join(space.tasks))}..."), \
                hide_library_progress_bars():
            setup = MeasuringSetup.load(space)  # it draws nothing, so a space changed since tuning still confirms
        check_same_setup(stored.user_attrs.get(PROVENANCE_ATTR), setup.provenance, name, allow_mixed=allow_mixed)
        writable = optuna.load_study(study_name=name, storage=open_for_tuning(storage))  # stores the confirmation
    except Exception as error:  # noqa: BLE001 - start_up_line raises a bug again
        raise fail(start_up_line(storage, error)) from None
    try:
        run_confirmation(console, writable, setup, repeats=repeats, fresh_limit=fresh_limit, fresh_seed=fresh_seed,
                         wide=wide, as_json=as_json)
    except (DartTunerError, ValueError) as error:
        raise fail(str(error), code=1) from None
