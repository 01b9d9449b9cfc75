"""The `dart-tuner` command line (typer + rich)."""

from __future__ import annotations

import contextlib
import functools
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tuner.errors import DartTunerError
from tuner.storage import DEFAULT_STORAGE
from tuner.tiny.recipe import TrainConfig

if TYPE_CHECKING:
    from tuner.presets import Preset

app = typer.Typer(help="Find and apply the best visual-token pruning configuration for a multimodal LLM.",
                  no_args_is_help=True, add_completion=False)


@app.callback()
def main() -> None:
    """dart-tuner: DART visual-token pruning, tuned per model, task and hardware."""


@app.command("bench-pruning")
def bench_pruning(
    layer: int = typer.Option(2, help="Prune before decoder layer K."),
    repeats: int = typer.Option(7, min=1, help="Timed rounds; every configuration runs once per round."),
    warmup: int = typer.Option(2, min=0, help="Discarded rounds before timing."),
    threads: int = typer.Option(2, min=1, help="torch CPU threads."),
    hidden: int = typer.Option(1024, help="Hidden size of the Llama-shaped text model."),
    layers: int = typer.Option(8, help="Decoder layers."),
    attn_implementation: str = typer.Option("sdpa", help="sdpa or eager."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the rows here."),
) -> None:
    """Prefill time of no hooks, keep_all, and DART / random / FastV at 64, 128, 192 kept vision tokens."""
    import torch

    from tuner.bench_pruning import N_VISION, TEXT_AFTER, TEXT_BEFORE, rows_as_dicts, run_benchmark

    torch.set_num_threads(threads)
    console = Console()
    with console.status(f"Timing {repeats} interleaved rounds of 11 configurations..."):
        rows, selection = run_benchmark(layer=layer, repeats=repeats, warmup=warmup, hidden=hidden, layers=layers,
                                        attn_implementation=attn_implementation)
    n_tokens = N_VISION + TEXT_BEFORE + TEXT_AFTER
    table = Table(title=f"Prefill, Llama-shaped hidden {hidden} x {layers} layers, fp32, {threads} threads, "
                        f"{attn_implementation}; {N_VISION} vision + {n_tokens - N_VISION} text tokens, K={layer}")
    for column in ("config", "tokens after K", "median ms", "IQR ms", "speed-up", "bound", "of bound"):
        table.add_column(column, justify="left" if column == "config" else "right")
    for row in rows:
        table.add_row(row.name, str(row.tokens_after_k), f"{row.median_ms:.1f}", f"{row.iqr_ms:.1f}",
                      f"{row.speedup:.2f}x", f"{row.bound:.2f}x", f"{100 * row.fraction_of_bound:.0f}%")
    console.print(table)
    by_name = {row.name: row for row in rows}
    overhead = by_name["keep_all"].median_ms / by_name["no hooks"].median_ms - 1
    console.print(f"keep_all overhead over no hooks: {100 * overhead:+.1f}%")
    for name, ms in selection.items():
        console.print(f"{name}: selection alone {ms:.2f} ms = {100 * ms / by_name[name].median_ms:.2f}% "
                      "of its pruned prefill")
    if json_path is not None:
        json_path.write_text(json.dumps({"rows": rows_as_dicts(rows), "dart_selection_ms": selection,
                                         "keep_all_overhead": overhead, "torch": torch.__version__,
                                         "threads": threads, "layer": layer}, indent=1))


def _quiet_libraries() -> None:
    """Keep lmms-eval's debug logs out of the rich output; its warnings still go to stderr."""
    import sys

    try:
        from loguru import logger  # lmms-eval's logger
    except ImportError:
        return
    logger.remove()
    logger.add(sys.stderr, level="WARNING")


def _hide_library_progress_bars() -> contextlib.AbstractContextManager:
    """lmms-eval draws a tqdm bar per evaluation on sys.stderr; the rich bar on stdout replaces them.

    loguru's sink (set up in `_quiet_libraries`) holds the real stderr, so lmms-eval warnings still show.
    """
    return contextlib.redirect_stderr(io.StringIO())


def _fail(message: str, code: int = 2) -> typer.Exit:
    """Print a one-line error (no traceback: the message names the culprit) and return the exit to raise.

    Exit code 2 means bad input (the command never started); 1 means it ran and failed.
    """
    Console(stderr=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _log_to(console: Console, name: str) -> None:
    """Print the warnings of logger `name` on `console` as one yellow line each."""
    import logging

    class ConsoleHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            console.print(f"[yellow]warning:[/] {escape(record.getMessage())}", highlight=False, soft_wrap=True)

    logger = logging.getLogger(name)
    logger.handlers = [ConsoleHandler(logging.WARNING)]
    logger.propagate = False


def _storage_line(url: str, error: Exception, doing: str = "cannot use") -> str:
    """The one line for a storage error found in `error`'s chain; any other error is a bug and is raised again."""
    from tuner.storage import StorageError, describe, storage_failure

    failure = storage_failure(error)
    if failure is None:
        raise error
    return str(failure) if isinstance(failure, StorageError) else describe(url, failure, doing)


def _storage_fail(url: str, error: Exception, code: int = 1) -> typer.Exit:
    """One line for a storage that failed while tuning (lost for longer than the worker waits, turned read-only,
    ...). The next worker re-queues the trial it was running."""
    return _fail(f"{_storage_line(url, error)}; the trials stored so far are kept", code=code)


def _interruptible(command: Callable[..., None]) -> Callable[..., None]:
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


def _parse_options(pairs: list[str]) -> dict[str, object]:
    """`--option key=value` pairs as a dict; values parsed as YAML scalars (numbers, booleans, strings)."""
    import yaml

    options: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option expects key=value, got {pair!r}")
        options[key] = yaml.safe_load(value)
    return options


@app.command("eval")
@_interruptible
def eval_command(
    model: str = typer.Option(..., "--model", "-m", help="Hugging Face hub id or local folder of a supported VLM."),
    task: list[str] = typer.Option(..., "--task", "-t", help="lmms-eval task name, or the bundled 'dart_shapes'. "
                                                             "Repeat for several tasks."),
    preset: Path | None = typer.Option(None, help="Preset file to evaluate (instead of --method ...)."),
    method: list[str] = typer.Option([], help="Pruning method: dart, random, pooling, avgpool, fastv, keep_all. "
                                              "Repeat to compare several."),
    layer: int = typer.Option(2, help="Prune before decoder layer K."),
    keep_ratio: list[float] = typer.Option([], help="Fraction of vision tokens kept, in (0, 1]. Repeat to compare "
                                                    "several (every method x every ratio)."),
    budget: int | None = typer.Option(None, help="Vision tokens kept per image prompt (instead of --keep-ratio)."),
    image_pivots: int = typer.Option(4, help="DART image pivots."),
    text_pivots: int = typer.Option(4, help="DART text pivots."),
    option: list[str] = typer.Option([], help="Method option key=value (repeatable)."),
    limit: int | None = typer.Option(None, min=1, help="Documents per task: a seeded subset, stratified by "
                                                       "category (not a prefix)."),
    seed: int = typer.Option(0, help="Seed of the subset."),
    include_path: list[Path] = typer.Option([], help="Extra folder of lmms-eval task YAMLs (repeatable)."),
    batch_size: int = typer.Option(1, min=1, help="Requests per generate() call (left padding)."),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    attn_implementation: str = typer.Option("auto", "--attn", help="auto, sdpa, eager or flash_attention_2."),
    new_tokens: int = typer.Option(8, min=2, help="Tokens generated per latency run (decode = the ones after "
                                                  "the first)."),
    repeats: int = typer.Option(5, min=1, help="Timed latency rounds (every configuration once per round)."),
    warmup: int = typer.Option(1, min=0, help="Discarded latency rounds."),
    max_failures: int = typer.Option(0, min=0, help="Empty generations tolerated before the run counts as failed."),
    json_path: Path | None = typer.Option(None, "--json", help="Write every number and per-sample result here."),
) -> None:
    """Accuracy, kept tokens, prefill and decode latency, FLOPs and KV bytes: a configuration next to the unpruned
    baseline."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tuner.config import PruningConfig
    from tuner.evaluation.tasks import load_tasks
    from tuner.presets import load_preset

    console = Console()
    _quiet_libraries()
    try:
        if preset is not None and method:
            raise ValueError("give --preset or --method, not both")
        if preset is not None:
            configs = {"preset": load_preset(preset).config}
        else:
            options = _parse_options(option)
            ratios: list[float | None] = list(keep_ratio) or [None]
            configs = {f"{name} {ratio}": PruningConfig(method=name, layer=layer, keep_ratio=ratio, budget=budget,
                                                        n_image_pivots=image_pivots, n_text_pivots=text_pivots,
                                                        options=options)
                       for name in method for ratio in ratios}
        from tuner.evaluation.compare import BASELINE, compare_configs
        from tuner.models import load_model

        with console.status(f"Loading {model} and {', '.join(task)}..."), _hide_library_progress_bars():
            loaded = load_model(model, dtype=dtype, device=device, attn_implementation=attn_implementation)
            tasks = load_tasks(task, subset_size=limit, seed=seed, include_paths=include_path)
        n_requests = sum(t.subset.size for t in tasks)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as progress:
            bars = {name: progress.add_task(f"accuracy: {name}", total=n_requests)
                    for name in [BASELINE, *configs]}
            latency_bar = progress.add_task("latency (interleaved)", total=1)

            def advance(stage: str, n: int) -> None:
                if stage == "latency":
                    progress.update(latency_bar, description=f"latency: {len(bars)} configurations x "
                                                             f"{warmup + repeats} rounds")
                else:
                    progress.advance(bars[stage], n)

            with _hide_library_progress_bars():
                reports = compare_configs(loaded, tasks, configs, batch_size=batch_size, max_failures=max_failures,
                                          new_tokens=new_tokens, repeats=repeats, warmup=warmup,
                                          on_progress=advance)
            progress.advance(latency_bar, 1)
    except (DartTunerError, ValueError) as error:  # ValueError: PruningConfig and check_layer name the bad field
        raise _fail(str(error)) from None
    _print_and_save_eval(console, reports, loaded, tasks, json_path)


def _print_and_save_eval(console: Console, reports: list, loaded: object, tasks: list, json_path: Path | None) -> None:
    """The eval table, the subset line, and the JSON file when asked for."""
    from tuner.evaluation.table import comparison_table
    from tuner.provenance import environment

    subsets = ", ".join(f"{t.name}: {t.subset.size}/{t.subset.total} docs (seed {t.subset.seed}, "
                        f"stratified by {t.subset.stratified_by}, hash {t.subset.hash[:12]})" for t in tasks)
    timing = reports[0].latency
    title = (f"{loaded.model_id} ({loaded.family}, {loaded.provenance()['dtype']}, {loaded.attn_implementation}, "
             f"{loaded.provenance()['device']})")
    console.print(comparison_table(reports, title))
    console.print(f"subset: {subsets}")
    console.print(f"latency: {reports[0].cost.n_tokens} prompt tokens, {timing.new_tokens} new tokens, median of "
                  f"{timing.prefill.repeats} interleaved rounds; GFLOPs and KV bytes are analytic (text model, "
                  "same inputs)")
    if json_path is not None:
        payload = {"model": loaded.provenance(), "environment": environment(),
                   "tasks": [{"name": t.name, "primary_metric": t.primary_metric, "subset": t.subset.to_dict()}
                             for t in tasks],
                   "rows": [r.to_dict(with_samples=True) for r in reports]}
        json_path.write_text(json.dumps(payload, indent=1, default=str))
        console.print(f"wrote {json_path}")


_TRAIN = TrainConfig()


@app.command("train-tiny")
@_interruptible
def train_tiny(
    out: Path = typer.Option(Path("artifacts/tiny-llava-shapes"), help="Checkpoint folder to write."),
    steps: int = typer.Option(_TRAIN.steps, min=1, help="Optimizer steps (about 1.7 s each on 2 CPU cores)."),
    batch_size: int = typer.Option(_TRAIN.batch_size, min=1, help="Images per step."),
    turns_per_image: int = typer.Option(_TRAIN.turns_per_image, min=1, help="Question/answer turns after each image."),
    lr: float = typer.Option(_TRAIN.lr, help="Peak learning rate (warm-up, then cosine to 5%)."),
    warmup_steps: int = typer.Option(_TRAIN.warmup_steps, min=0, help="Linear warm-up steps."),
    seed: int = typer.Option(0, help="Seed of the weights and of the training scenes."),
    eval_every: int = typer.Option(_TRAIN.eval_every, min=0, help="Steps between validation accuracies (0: only at the end)."),
    threads: int = typer.Option(2, min=1, help="torch CPU threads."),
    init_from: Path | None = typer.Option(None, help="Continue from this checkpoint's weights (new schedule)."),
    first_image: int = typer.Option(0, min=0, help="First training scene; when continuing, the images seen so far "
                                                   "(steps x batch size) so none is repeated."),
    bf16: bool = typer.Option(_TRAIN.bf16, help="bfloat16 autocast (weights and optimizer stay fp32)."),
    guidance: float = typer.Option(_TRAIN.guidance, min=0.0, help="Weight of the attention-guidance loss (0: none)."),
    guidance_steps: int = typer.Option(_TRAIN.guidance_steps, min=0, help="Steps over which that weight falls linearly to 0."),
    resume: bool = typer.Option(False, help="Go on from the last evaluation saved in --out (same settings)."),
) -> None:
    """Train the embedded tiny LLaVA from scratch on generated dart_shapes scenes (seeded, reproducible), or
    continue a run from its checkpoint."""
    import torch

    from tuner.tiny.train import TrainConfig, train

    torch.set_num_threads(threads)
    config = TrainConfig(steps=steps, batch_size=batch_size, turns_per_image=turns_per_image, lr=lr, seed=seed,
                         warmup_steps=warmup_steps, eval_every=eval_every or steps,
                         init_from=str(init_from) if init_from else None,
                         first_image=first_image, bf16=bf16, guidance=guidance, guidance_steps=guidance_steps)
    if init_from is not None and not (init_from / "config.json").exists():
        raise _fail(f"--init-from {str(init_from)!r} is not a checkpoint folder (no config.json)")
    console = Console()
    console.print(f"training {steps} steps x {batch_size} images into {out}")
    try:
        _, _, history = train(config, out_dir=out, log=console.print, resume=resume)
    except ValueError as error:
        raise _fail(str(error)) from None
    final = history.evaluations[-1]["val_accuracy"] if history.evaluations else float("nan")
    console.print(f"done in {history.seconds:.0f} s: validation accuracy {final:.3f} (first answer token, "
                  f"{config.eval_docs} held-out questions); checkpoint in {out}")


@app.command("tune")
@_interruptible
def tune(
    space_path: Path = typer.Option(..., "--space", "-s", help="Search-space YAML (see search_spaces/)."),
    model: str | None = typer.Option(None, help="Override the space's model (hub id or folder)."),
    task: list[str] = typer.Option([], help="Override the space's tasks (repeatable)."),
    trials: int | None = typer.Option(None, min=1, help="Complete trials the study should hold (all workers)."),
    timeout: float | None = typer.Option(None, min=1, help="Stop starting trials after this many seconds."),
    storage: str = typer.Option(DEFAULT_STORAGE, help="SQLAlchemy URL of the Optuna storage "
                                                                "(postgresql+psycopg://... for many machines)."),
    study: str | None = typer.Option(None, help="Study name (default: the space's `study`, else its file name)."),
    sampler: str | None = typer.Option(None, help="tpe, nsga2, gp, random or grid (default: the space's)."),
    limit: int | None = typer.Option(None, min=1, help="Override the subset size (documents per task)."),
    seed: int | None = typer.Option(None, help="Override the subset seed."),
    allow_mixed: bool = typer.Option(False, help="Add trials to a study whose provenance differs from this run."),
    allow_repeats: bool = typer.Option(False, help="Measure a configuration again although a complete trial of "
                                                   "the study already holds it (default: such trials are pruned)."),
    heartbeat_interval: int = typer.Option(30, min=1, help="Seconds between a running trial's heartbeats; a trial "
                                                           "silent for 2x this is marked failed and re-queued."),
    max_same_failures: int = typer.Option(3, min=1, help="Stop after this many trials in a row fail with the same "
                                                         "exception type (a broken setup, not a bad configuration)."),
) -> None:
    """Create or resume an Optuna study over a search space: unpruned baseline first, then (accuracy, prefill ms)
    trials; prints the Pareto front. Exits non-zero when the baseline fails, when trials keep failing the same
    way, or when no trial completed."""
    import logging
    import time

    import optuna
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tuner.reporting import describe_trial, latency_noise, pareto_table, speedup_text
    from tuner.results import pareto_trials
    from tuner.space import load_space
    from tuner.study import Tuner, TuningStopped

    console = Console()
    _quiet_libraries()
    _log_to(console, "tuner")  # e.g. "storage lost, retrying" must show, also inside the hidden stderr
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Optuna logs every failed trial with its traceback; the per-trial line below says the same in one line.
    logging.getLogger("optuna.study._optimize").addFilter(lambda record: " failed " not in record.getMessage())
    try:
        space = load_space(space_path)
        if sampler is not None:
            space = space.with_sampler(sampler)
        space = space.with_overrides(model=model, tasks=tuple(task) or None, subset_size=limit, subset_seed=seed,
                                     trials=trials, timeout_s=timeout)
        with console.status(f"Loading {space.model} and {', '.join(space.tasks)}..."), \
                _hide_library_progress_bars():
            tuner_ = Tuner(space, storage, study_name=study, allow_mixed=allow_mixed,
                           heartbeat_interval=heartbeat_interval, allow_repeats=allow_repeats)
    except (DartTunerError, ValueError) as error:  # ValueError: PruningConfig and check_layer name the bad field
        raise _fail(str(error)) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/] while loading; no trial was started")
        raise typer.Exit(130) from None
    except Exception as error:
        raise _storage_fail(storage, error, code=2) from error
    target = space.trials
    console.print(f"study {tuner_.study_name!r} in {storage}: {tuner_.n_complete()} complete trials stored; "
                  f"target {target if target else 'unbounded'}"
                  f"{f', timeout {space.timeout_s:.0f} s' if space.timeout_s else ''}")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        trials_bar = progress.add_task("trials", total=target, completed=tuner_.n_complete())
        requests_bar = progress.add_task("current trial", total=tuner_.evaluator.n_requests)
        started = [time.perf_counter()]
        ran = [0]
        complete_before = tuner_.n_complete()
        tuner_.on_request = lambda n: progress.advance(requests_bar, n)

        def after_trial(study_: object, trial: object) -> None:
            seconds = time.perf_counter() - started[0]
            started[0] = time.perf_counter()
            ran[0] += 1
            if trial.state.name == "COMPLETE":
                noise = latency_noise(trial)
                line = (f"trial {trial.number}: {describe_trial(trial)}: accuracy "
                        f"{trial.values[0]:.3f}, prefill {trial.values[1]:.1f} ms "
                        f"({speedup_text(trial, tuner_.study)})"
                        + (f", [yellow]noisy latency[/]: {escape(noise)}" if noise else ""))
            elif "duplicate_of" in trial.user_attrs:
                line = f"trial {trial.number} skipped: trial {trial.user_attrs['duplicate_of']} measured that configuration"
            else:
                line = f"trial {trial.number} {trial.state.name.lower()}: {trial.user_attrs.get('failure', '')}"
            progress.console.print(f"{line}  [{seconds:.1f} s; Pareto set: {len(pareto_trials(tuner_.study))}]")
            progress.update(trials_bar, completed=tuner_.n_complete())
            progress.reset(requests_bar)

        try:
            with _hide_library_progress_bars():
                tuner_.run(target, space.timeout_s, callbacks=[after_trial], max_same_failures=max_same_failures)
        except KeyboardInterrupt:
            progress.stop()
            requeued = (f"trial {tuner_.requeued} queued again in place of the interrupted one"
                        if tuner_.requeued is not None else "no trial was running")
            console.print(f"[yellow]interrupted[/]: {tuner_.n_complete()} complete trials are stored in {storage}; "
                          f"{requeued}. Run the same command to resume.")
            raise typer.Exit(130) from None
        except TuningStopped as error:
            progress.stop()
            raise _fail(str(error), code=1) from None
        except Exception as error:
            progress.stop()
            raise _storage_fail(storage, error) from error
    if tuner_.n_complete() == complete_before and (ran[0] or not complete_before):
        raise _fail(f"no trial completed in study {tuner_.study_name!r}: {ran[0]} ran and failed (their reasons "
                    "are printed above and stored in the study)", code=1)
    console.print(pareto_table(tuner_.study))
    console.print(f"{tuner_.n_complete()} complete trials in {storage}, study {tuner_.study_name!r}. "
                  f"List studies: dart-tuner studies --storage {storage}")


@app.command("studies")
def studies(storage: str = typer.Option(DEFAULT_STORAGE, help="SQLAlchemy URL of the Optuna storage.")
            ) -> None:
    """Every study in a storage: trial counts, the unpruned baseline, the most accurate and fastest Pareto points."""
    from tuner.reporting import studies_table
    from tuner.storage import open_for_reading

    try:
        table = studies_table(open_for_reading(storage))
    except DartTunerError as error:
        raise _fail(str(error)) from None
    except Exception as error:  # a storage error while reading the studies; anything else keeps its traceback
        raise _fail(_storage_line(storage, error, "cannot read")) from None
    Console().print(table)


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
    output: Path = typer.Option(Path("preset.yaml"), "--output", "-o", help="Preset file to write."),
) -> None:
    """Write the chosen trial of a study as a preset: its PruningConfig, metrics and provenance."""

    from rich.markup import escape

    from tuner.export import Rule, choose_trial, preset_from_trial
    from tuner.presets import save_preset
    from tuner.reporting import describe_trial, noise_warning
    from tuner.results import open_study
    from tuner.storage import open_for_reading

    try:
        rule = Rule(trial=trial, min_accuracy=min_accuracy, min_relative_accuracy=min_relative_accuracy,
                    max_prefill_ms=max_latency_ms)
        loaded_study = open_study(open_for_reading(storage), study)
        chosen = choose_trial(loaded_study, rule)
        preset = preset_from_trial(loaded_study, chosen)
    except (DartTunerError, ValueError) as error:  # ValueError: Rule names the conflicting options
        raise _fail(str(error)) from None
    except Exception as error:  # a storage error while reading the study; anything else keeps its traceback
        raise _fail(_storage_line(storage, error, "cannot read")) from None
    try:
        save_preset(preset, output)
    except DartTunerError as error:
        raise _fail(str(error)) from None
    metrics = preset.metrics
    console = Console()
    console.print(f"{rule.describe()}: trial {chosen.number} ({describe_trial(chosen)}), "
                  f"accuracy {metrics['accuracy']:.3f} (baseline {metrics['baseline_accuracy']}), prefill "
                  f"{metrics['prefill_ms_median']:.1f} ms ({metrics['speedup'] or float('nan'):.2f}x) -> {output}")
    warning = noise_warning(chosen, loaded_study)
    if warning:
        console.print(f"[yellow]warning:[/] {escape(warning + _remeasure_command(preset, output))}", highlight=False,
                      soft_wrap=True)


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
    """`dashboard/app.py` of the checkout this package runs from (None in a non-editable install)."""
    path = Path(__file__).resolve().parent.parent / "dashboard" / "app.py"
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
        raise _fail(f"the dashboard needs {' and '.join(missing)}: pip install 'dart-tuner[dashboard]'")
    app_path = dashboard_app_path()
    if app_path is None:
        raise _fail("dashboard/app.py is not next to this tuner package: install dart-tuner from a checkout "
                    "(pip install -e '.[dashboard]'), or run `streamlit run <checkout>/dashboard/app.py -- "
                    "--storage URL`")
    from tuner.storage import StorageError, open_for_reading

    try:
        open_for_reading(storage)
    except StorageError as problem:
        raise _fail(str(problem)) from None
    Console().print(f"dart-tuner dashboard on http://{address}:{port} for {storage} (Ctrl-C stops it)")
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
