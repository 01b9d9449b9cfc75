"""What every `dart-tuner` command shares: the typer app, one-line errors, Ctrl-C handling and quiet libraries."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    from tuner.results.tables import Sheet

app = typer.Typer(help="Find and apply the best visual-token pruning configuration for a multimodal LLM.",
                  no_args_is_help=True, add_completion=False)


@app.callback()
def main() -> None:
    """dart-tuner: DART visual-token pruning, tuned per model, task and hardware."""


def quiet_libraries() -> None:
    """Keep lmms-eval's debug logs out of the rich output; its warnings still go to stderr."""
    import sys

    try:
        from loguru import logger  # lmms-eval's logger
    except ImportError:
        return
    logger.remove()
    logger.add(sys.stderr, level="WARNING")


def hide_library_progress_bars() -> contextlib.AbstractContextManager:
    """lmms-eval draws a tqdm bar per evaluation on sys.stderr; the rich bar on stdout replaces them.

    loguru's sink (set up in `quiet_libraries`) holds the real stderr, so lmms-eval warnings still show.
    """
    return contextlib.redirect_stderr(io.StringIO())


def fail(message: str, code: int = 2, *, wrap: bool = False) -> typer.Exit:
    """Print a one-line error (no traceback: the message names the culprit) and return the exit to raise.

    Exit code 2 means bad input (the command never started); 1 means it ran and failed. `wrap`: fold a message of
    several lines (a list of the closest trials) at the terminal's width instead of keeping each line whole.
    """
    Console(stderr=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False,
                               soft_wrap=not (wrap and "\n" in message))  # one line stays one line
    return typer.Exit(code)


def wide_option() -> Any:
    """The `--wide` flag of every command that prints a table."""
    return typer.Option(False, "--wide", help="Show every column (the default columns fit 80 characters).")


def json_option() -> Any:
    """The `--json` flag of every command that prints a table (commands that write JSON files take `--json -`)."""
    return typer.Option(False, "--json", help="Print the table as JSON on stdout; messages go to stderr.")


def print_json(data: object) -> None:
    """`data` as one JSON document on stdout (what `--json` promises: nothing else is printed there)."""
    sys.stdout.write(json.dumps(data, indent=1, default=str) + "\n")
    sys.stdout.flush()


def show_sheet(console: Console, sheet: Sheet, *, wide: bool = False, as_json: bool = False) -> None:
    """Print a table: compact (fits 80 columns), every column (`wide`), or as JSON on stdout (`as_json`)."""
    if as_json:
        print_json(sheet.as_json())
    else:
        console.print(sheet.table(wide))


def show_fronts(console: Console, study: Any, *, wide: bool = False, as_json: bool = False,
                default_processor: bool = False) -> None:
    """The study's Pareto front (`default_processor`: the front at the processor as loaded only); a study that
    searched processor settings also shows the front without them, to compare (tables only: JSON is one front)."""
    from tuner.results.tables import pareto_sheet
    from tuner.results.trials import searched_processor

    show_sheet(console, pareto_sheet(study, default_processor=default_processor), wide=wide, as_json=as_json)
    if not as_json and not default_processor and searched_processor(study.get_trials(deepcopy=False)):
        show_sheet(console, pareto_sheet(study, default_processor=True), wide=wide)


def log_to(console: Console, name: str) -> None:
    """Print the warnings of logger `name` on `console` as one yellow line each."""
    import logging

    class ConsoleHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            console.print(f"[yellow]warning:[/] {escape(record.getMessage())}", highlight=False, soft_wrap=True)

    logger = logging.getLogger(name)
    logger.handlers = [ConsoleHandler(logging.WARNING)]
    logger.propagate = False


def storage_line(url: str, error: Exception, doing: str = "cannot use") -> str:
    """The one line for a storage error found in `error`'s chain; any other error is a bug and is raised again."""
    from tuner.results.storage import StorageError, describe, storage_failure

    failure = storage_failure(error)
    if failure is None:
        raise error
    return str(failure) if isinstance(failure, StorageError) else describe(url, failure, doing)


def start_up_line(url: str, error: Exception) -> str:
    """The one line for a command that could not start: a user-facing error's own message (a bad space, model,
    task, preset; a ValueError of PruningConfig or check_layer naming the field), or the storage error in `error`'s
    chain. Anything else is a bug in our code and is raised again with its traceback."""
    from tuner.errors import DartTunerError

    if isinstance(error, (DartTunerError, ValueError)):
        return str(error)
    return storage_line(url, error)


def raised_in_our_code(error: BaseException) -> bool:
    """Whether the root cause of `error` was raised inside dart-tuner itself (a bug: it keeps its traceback), not
    in a task's hooks, a library or the model (the bundled task's hooks count as a task's)."""
    import traceback
    from pathlib import Path

    root = error
    while root.__cause__ is not None:
        root = root.__cause__
    frames = traceback.extract_tb(root.__traceback__)
    if not frames:
        return False
    package = Path(__file__).resolve().parents[1]
    where = Path(frames[-1].filename).resolve()
    return where.is_relative_to(package) and not where.is_relative_to(package / "evaluation" / "bundled_tasks")


def storage_fail(url: str, error: Exception, code: int = 1) -> typer.Exit:
    """One line for a storage that failed while tuning (lost for longer than the worker waits, turned read-only,
    ...). The next worker re-queues the trial it was running."""
    from tuner.results.storage import sqlite_file_gone

    kept = "; the file is gone, and the trials it held with it" if sqlite_file_gone(url) else \
        "; the trials stored so far are kept"
    return fail(f"{storage_line(url, error)}{kept}", code=code)


def interruptible(command: Callable[..., None]) -> Callable[..., None]:
    """A Ctrl-C that the command does not handle itself (while it imports its libraries, say) ends it with one
    line and the shell's exit code 130, instead of Click's "Aborted!" and exit 1."""

    @functools.wraps(command)
    def run(*args: object, **kwargs: object) -> None:
        try:
            command(*args, **kwargs)
        except KeyboardInterrupt:
            Console(stderr=True).print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return run


def options_for(method: str, options: dict[str, object], methods: list[str]) -> dict[str, object]:
    """The `--option`s that apply to `method`: 'method.key' ones, and plain keys the method declares. A plain key
    that none of `methods` declares, or a 'method.key' for a method not among them, is a ValueError."""
    from tuner.config.catalog import method_class

    mine: dict[str, object] = {}
    for key, value in options.items():
        owner, dot, name = key.rpartition(".")
        if dot and owner not in methods:
            raise ValueError(f"--option {key}: {owner!r} is not one of the --method values ({', '.join(methods)})")
        if not dot and not any(key in method_class(m).option_specs for m in methods):
            raise ValueError(f"--option {key}: no --method takes it; their options: " + "; ".join(
                f"{m}: {', '.join(method_class(m).option_specs) or 'none'}" for m in methods))
        if (dot and owner == method) or (not dot and key in method_class(method).option_specs):
            mine[name if dot else key] = value
    return mine


def with_stage_options(config: Any, options: dict[str, object]) -> Any:
    """A parsed schedule (a PruningConfig) with the `--option`s each stage's method takes (`options_for`): the
    first stage's become its options (inherited by the stages without a method), a stage naming a method gets
    its own."""
    from dataclasses import replace

    methods = list(dict.fromkeys(stage.method for stage in config.stage_configs()))
    stages = tuple(replace(stage, options={**options_for(stage.method, options, methods), **stage.options})
                   if stage.method is not None else stage for stage in config.stages)
    return replace(config, options=options_for(config.method, options, methods), stages=stages)


def parse_options(pairs: list[str], flag: str = "--option") -> dict[str, object]:
    """`--option key=value` pairs (or another `flag`'s) as a dict; values parsed as YAML scalars (numbers,
    booleans, strings)."""
    import yaml

    options: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} expects key=value, got {pair!r}")
        options[key] = yaml.safe_load(value)
    return options
