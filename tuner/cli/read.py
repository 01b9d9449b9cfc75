"""Commands that read stored studies: `studies`, `export` and `dashboard` (no evaluation stack needed)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from tuner.cli.common import app, fail, json_option, print_json, show_fronts, show_sheet, storage_line, wide_option
from tuner.errors import DartTunerError
from tuner.results.storage import DEFAULT_STORAGE

if TYPE_CHECKING:
    from tuner.config.preset import Preset


@app.command("studies")
def studies(storage: str = typer.Option(DEFAULT_STORAGE, help="SQLAlchemy URL of the Optuna storage."),
            wide: bool = wide_option(), as_json: bool = json_option()) -> None:
    """Every study in a storage: trial counts, the unpruned baseline, the most accurate and fastest Pareto points."""
    from tuner.results import tables
    from tuner.results.storage import open_for_reading

    try:
        sheet = tables.studies_sheet(open_for_reading(storage))
    except DartTunerError as error:
        raise fail(str(error)) from None
    except Exception as error:  # a storage error while reading the studies; anything else keeps its traceback
        raise fail(storage_line(storage, error, "cannot read")) from None
    show_sheet(Console(), sheet, wide=wide, as_json=as_json)


@app.command("front")
def front(study: str = typer.Option(..., help="Study name (see `dart-tuner studies`)."),
          storage: str = typer.Option(DEFAULT_STORAGE, help="SQLAlchemy URL of the Optuna storage."),
          default_processor: bool = typer.Option(False, help="Only the trials at the processor as loaded: the "
                                                              "front a search without the processor knob finds."),
          wide: bool = wide_option(), as_json: bool = json_option()) -> None:
    """A study's feasible Pareto front with its confirmed numbers: the table `tune` prints at its end (a study
    that searched processor settings also shows the front at the default processor)."""
    from rich.markup import escape

    from tuner.results import open_study
    from tuner.results.evidence import CONFIRMATION_ATTR
    from tuner.results.storage import open_for_reading
    from tuner.results.tables import pareto_sheet

    try:
        loaded_study = open_study(open_for_reading(storage), study)
        pareto_sheet(loaded_study, default_processor=default_processor)  # a storage error surfaces here
    except DartTunerError as error:
        raise fail(str(error)) from None
    except Exception as error:  # a storage error while reading the study; anything else keeps its traceback
        raise fail(storage_line(storage, error, "cannot read")) from None
    confirmation = loaded_study.user_attrs.get(CONFIRMATION_ATTR)
    console = Console(stderr=as_json)
    show_fronts(console, loaded_study, wide=wide, as_json=as_json, default_processor=default_processor)
    if not confirmation:
        console.print(f"not confirmed yet: dart-tuner confirm --space SPACE --study {escape(study)} --storage "
                      f"{escape(storage)} re-measures the front", highlight=False)


@app.command("export")
def export(
    study: str = typer.Option(..., help="Study name (see `dart-tuner studies`)."),
    storage: str = typer.Option(DEFAULT_STORAGE, help="SQLAlchemy URL of the Optuna storage."),
    trial: int | None = typer.Option(None, help="Export this trial number."),
    min_accuracy: float | None = typer.Option(None, help="The fastest trial with at least this accuracy."),
    min_relative_accuracy: float | None = typer.Option(None, help="The fastest trial with at least this fraction "
                                                                  "of the baseline's accuracy (0.95 = 95%)."),
    max_latency_ms: float | None = typer.Option(None, help="The most accurate trial with prefill at most this "
                                                           "(with a minimum accuracy: the fastest meeting both)."),
    confidence: float | None = typer.Option(None, help="Judge the accuracy floor by the trial's one-sided lower "
                                                       "confidence bound at this level (0.9 = 90%) instead of its "
                                                       "measured accuracy."),
    output: Path = typer.Option(Path("preset.yaml"), "--output", "-o", help="Preset file to write."),
    target: str = typer.Option("transformers", help="Where the preset runs: transformers (tuner.apply_pruning), "
                                                    "vllm or sglang (also writes the engine's launch line next to "
                                                    "the preset, <output>.<target>.sh; refuses a trial that does "
                                                    "not run there, naming the nearest that does)."),
    as_json: bool = typer.Option(False, "--json", help="Print the chosen trial and its metrics as JSON on stdout; "
                                                       "messages go to stderr."),
) -> None:
    """Write the chosen trial of a study as a preset: its PruningConfig, metrics and provenance."""

    from rich.markup import escape

    from tuner.config.preset import save_preset
    from tuner.results import open_study
    from tuner.results.evidence import versus_baseline_text
    from tuner.results.export import Rule, choose_trial, preset_from_trial
    from tuner.results.ports import launch_file_text, ported_preset
    from tuner.results.storage import open_for_reading
    from tuner.results.tables import describe_trial, noise_warning, with_interval
    from tuner.results.trials import skipped_text, unreadable_trials

    try:
        rule = Rule(trial=trial, min_accuracy=min_accuracy, min_relative_accuracy=min_relative_accuracy,
                    max_prefill_ms=max_latency_ms, confidence=confidence)
        loaded_study = open_study(open_for_reading(storage), study)
        chosen = choose_trial(loaded_study, rule)
        preset = ported_preset(loaded_study, rule, chosen, preset_from_trial(loaded_study, chosen), target)
    except (DartTunerError, ValueError) as error:  # ValueError: Rule names the conflicting options
        raise fail(str(error), wrap=True) from None  # wrapped: the closest trials, one per line
    except Exception as error:  # a storage error while reading the study; anything else keeps its traceback
        raise fail(storage_line(storage, error, "cannot read")) from None
    launch_path = output.with_name(f"{output.stem}.{target}.sh") if target != "transformers" else None
    try:
        save_preset(preset, output)
        if launch_path is not None:
            launch_path.write_text(launch_file_text(preset))
    except DartTunerError as error:
        raise fail(str(error)) from None
    except OSError as error:
        raise fail(f"cannot write launch file {str(launch_path)!r}: {error.strerror or error}") from None
    metrics = preset.metrics
    warning = noise_warning(chosen, loaded_study)
    warning = warning and warning + _remeasure_command(preset, output)
    if as_json:
        ported = {} if launch_path is None else {"target": target, "launch": preset.provenance["launch"],
                                                 "launch_file": str(launch_path)}
        print_json({"rule": rule.describe(), "trial": chosen.number, "config": preset.config.to_dict(),
                    "output": str(output), "metrics": metrics, "warning": warning, **ported})
        return
    console = Console()
    skipped = skipped_text(loaded_study.study_name, unreadable_trials(loaded_study.get_trials(deepcopy=False)))
    if skipped:
        console.print(f"[yellow]warning:[/] {escape(skipped)}", highlight=False, soft_wrap=True)
    console.print(f"{escape(rule.describe())}: trial {chosen.number} ({escape(describe_trial(chosen))}), "
                  f"accuracy {with_interval(chosen, 'accuracy', metrics['accuracy'], '.3f')} (baseline "
                  f"{metrics['baseline_accuracy']}; vs baseline {versus_baseline_text(chosen)}), prefill "
                  f"{with_interval(chosen, 'prefill_ms', metrics['prefill_ms_median'], '.1f')} ms "
                  f"({metrics['speedup'] or float('nan'):.2f}x) -> {escape(str(output))}", highlight=False)
    if launch_path is not None:
        checked = preset.provenance["launch"]["engine_version_checked"]
        console.print(f"{target} launch (checked against {escape(checked)}) -> {escape(str(launch_path))}",
                      highlight=False, soft_wrap=True)
    if warning:
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)


def _remeasure_command(preset: Preset, output: Path) -> str:
    """': dart-tuner eval ...' timing the exported preset again with more rounds, on the study's model and task
    subset ('' when the preset does not name the model)."""
    model = preset.provenance.get("model_id")
    if not model:
        return ""
    tasks = [task for task in preset.provenance.get("tasks") or [] if task.get("name")]
    options = [f"--task {task['name']}" for task in tasks]
    if tasks and tasks[0].get("size") is not None:
        options.append(f"--limit {tasks[0]['size']} --seed {tasks[0].get('seed') or 0}")
    return ": " + " ".join(["dart-tuner eval --preset", str(output), "--model", str(model), *options, "--repeats 20"])


def dashboard_app_path() -> Path | None:
    """The installed dashboard app, `tuner/dashboard/app.py` (it ships in the wheel; None if it was removed)."""
    path = Path(__file__).resolve().parents[1] / "dashboard" / "app.py"
    return path if path.is_file() else None


def dashboard_command(app_path: Path, storage: str, port: int, address: str) -> list[str]:
    """The `streamlit run` command line that serves the dashboard headless on `address:port`."""
    import sys

    return [sys.executable, "-m", "streamlit", "run", str(app_path), "--server.headless", "true",
            "--server.port", str(port), "--server.address", address, "--browser.gatherUsageStats", "false",
            "--client.toolbarMode", "viewer", "--", "--storage", storage]


@app.command("dashboard")
def dashboard(
    storage: str = typer.Option(DEFAULT_STORAGE, help="SQLAlchemy URL of the Optuna storage (another one "
                                                                "can be typed into the app)."),
    port: int = typer.Option(8501, min=1, max=65535, help="Port to serve on."),
    address: str = typer.Option("127.0.0.1", help="Address to bind (0.0.0.0 to reach it from other machines)."),
) -> None:
    """Serve the Streamlit dashboard: Pareto fronts, choosing a point under bounds, downloading its preset."""
    import importlib.util
    import signal
    import subprocess

    missing = [name for name in ("streamlit", "plotly") if importlib.util.find_spec(name) is None]
    if missing:
        raise fail(f"the dashboard needs {' and '.join(missing)}: pip install 'dart-tuner[dashboard]'")
    app_path = dashboard_app_path()
    if app_path is None:
        raise fail("the dashboard app (tuner/dashboard/app.py) is missing from this install: reinstall "
                    "dart-tuner[dashboard]")
    from rich.markup import escape

    from tuner.results.storage import StorageError, open_for_reading

    try:
        open_for_reading(storage)
    except StorageError as problem:
        raise fail(str(problem)) from None
    Console().print(f"dart-tuner dashboard on http://{escape(address)}:{port} for {escape(storage)} (Ctrl-C stops "
                    "it)", highlight=False)
    server = subprocess.Popen(dashboard_command(app_path, storage, port, address))
    previous = signal.signal(signal.SIGTERM, lambda *_: server.terminate())  # stopping us stops the server
    try:
        code = server.wait()
        code = 128 - code if code < 0 else code  # killed by a signal: the shell convention
    except KeyboardInterrupt:
        server.terminate()
        server.wait()
        code = 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    raise typer.Exit(code)
