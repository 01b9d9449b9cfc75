"""What every `dart-tuner` command shares: the typer app, one-line errors, Ctrl-C handling and quiet libraries."""

from __future__ import annotations

import contextlib
import functools
import io
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

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


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print a one-line error (no traceback: the message names the culprit) and return the exit to raise.

    Exit code 2 means bad input (the command never started); 1 means it ran and failed.
    """
    Console(stderr=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


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


def parse_options(pairs: list[str]) -> dict[str, object]:
    """`--option key=value` pairs as a dict; values parsed as YAML scalars (numbers, booleans, strings)."""
    import yaml

    options: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option expects key=value, got {pair!r}")
        options[key] = yaml.safe_load(value)
    return options
