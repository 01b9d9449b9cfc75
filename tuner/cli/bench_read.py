"""The `bench-read` command: build a large study in a temporary SQLite file and time every reader of it next to
Optuna's own load of its trials."""

from __future__ import annotations

import tempfile
from pathlib import Path

import typer
from rich.console import Console

from tuner.cli.common import app, fail, json_option, show_sheet, wide_option


@app.command("bench-read")
def bench_read(
    trials: int = typer.Option(2000, min=2, help="Trials of the study to build (the baseline included)."),
    repeats: int = typer.Option(3, min=1, help="Timed runs of each reader (the median is reported)."),
    readers: str = typer.Option("optuna load,studies,front,export,dashboard",
                                help="Comma-separated readers to time."),
    seed: int = typer.Option(0, help="Seed of the study's made-up measurements."),
    wide: bool = wide_option(),
    as_json: bool = json_option(),
) -> None:
    """Seconds of `studies`, the Pareto front, `export` and the dashboard's first render on a stored study of
    --trials trials, against Optuna's own load of the same trials (each from a fresh connection)."""
    import optuna

    from tuner.bench.read import READERS, build_study, time_readers
    from tuner.results.tables import Column, Sheet

    names = [name.strip() for name in readers.split(",") if name.strip()]
    unknown = [name for name in names if name not in READERS]
    if not names or unknown:
        raise fail(f"--readers must be a comma-separated list of {', '.join(READERS)}, got {readers!r}")
    if "optuna load" not in names:
        names.insert(0, "optuna load")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    console = Console(stderr=as_json)  # with --json, stdout holds the JSON alone
    with tempfile.TemporaryDirectory(prefix="dart-tuner-bench-read-") as folder:
        url = f"sqlite:///{Path(folder) / 'bench.db'}"
        with console.status(f"writing a study of {trials} trials..."):
            build_study(url, trials, seed=seed)
        with console.status(f"timing {', '.join(names)} ({repeats} runs each)..."):
            timings = time_readers(url, names, repeats)
    base = timings[0].median
    sheet = Sheet(f"Reading a study of {trials} trials (SQLite; median of {repeats} runs)",
                  (Column("reader", "reader", "reader", "left"), Column("median_s", "median s", "median s"),
                   Column("runs_s", "runs s"), Column("ratio", "x Optuna's load", "x Optuna")))
    for timing in timings:
        sheet.add_row([timing.name, f"{timing.median:.2f}", " ".join(f"{s:.2f}" for s in timing.seconds),
                       f"{timing.median / base:.2f}"],
                      {"seconds": list(timing.seconds), "median_s": timing.median, "ratio": timing.median / base})
    show_sheet(console, sheet, wide=wide, as_json=as_json)
