"""The `tune` command: create or resume a study, show each trial as it ends, print the Pareto front."""

from __future__ import annotations

import logging
from pathlib import Path

import typer
from rich.console import Console

from tuner.cli.common import (
    app,
    fail,
    hide_library_progress_bars,
    interruptible,
    log_to,
    quiet_libraries,
    show_fronts,
    start_up_line,
    storage_fail,
    wide_option,
)
from tuner.cli.confirming import run_confirmation
from tuner.errors import DartTunerError
from tuner.results.record import TrialRecord
from tuner.results.storage import DEFAULT_STORAGE


def _no_failed_trial_logs(record: logging.LogRecord) -> bool:
    """Drop Optuna's log of a failed trial (with its traceback): tune's per-trial line says the same in one line."""
    return " failed " not in record.getMessage()


@app.command("tune")
@interruptible
def tune(
    space_path: Path = typer.Option(..., "--space", "-s", help="Search space: a packaged name "
                                                               "(see `dart-tuner spaces`) or a YAML file."),
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
    feature_cache_mb: int | None = typer.Option(None, min=0, help="MiB of host memory for image features kept "
                                                "across trials (exact; never used while timing); 0 = off "
                                                "(default: the space's `feature_cache_mb`, else 2048)."),
    objective: str | None = typer.Option(None, help="The study's latency objective: prefill_ms (one request), "
                                         "ttft_ms, e2e_ms or throughput (at --latency-batch requests with "
                                         "--new-tokens each; default: the space's latency.objective, else "
                                         "prefill_ms)."),
    latency_batch: int | None = typer.Option(None, help="Requests timed together (default: the space's "
                                                        "latency.batch_size, else 1)."),
    new_tokens: int | None = typer.Option(None, help="Tokens each timed request decodes, forced (default: the "
                                                     "space's latency.new_tokens, else 8)."),
    memory_budget_gb: float | None = typer.Option(None, help="GiB of accelerator memory a deployment has: each "
                                                  "trial also stores how many requests fit in it at the workload "
                                                  "(measured on CUDA, analytic weights + KV cache elsewhere; "
                                                  "default: the space's latency.memory_budget_gb, else off)."),
    portable: str | None = typer.Option(None, help="Search only what this serving engine runs (vllm or sglang): "
                                        "keep_all over the processor settings it takes; the study records the "
                                        "target (see docs/serving.md)."),
    allow_mixed: bool = typer.Option(False, help="Add trials to a study whose provenance differs from this run."),
    allow_repeats: bool = typer.Option(False, help="Measure a configuration again although a complete trial of "
                                                   "the study already holds it (default: such trials are pruned)."),
    heartbeat_interval: int = typer.Option(30, min=1, help="Seconds between a running trial's heartbeats; a trial "
                                                           "silent for 2x this is marked failed and re-queued."),
    early_stop_chunk: int | None = typer.Option(None, min=1, help="Score each trial in chunks of this many "
                                                             "documents and stop it once even perfect scores on "
                                                             "the rest cannot meet the accuracy constraint "
                                                             "(default: the space's early_stopping.chunk_size)."),
    confirm: bool = typer.Option(True, help="At the end, re-measure the front (`dart-tuner confirm`): one "
                                            "interleaved latency run with the baseline and more repeats, and "
                                            "accuracy on a fresh disjoint subset."),
    confirm_repeats: int = typer.Option(20, min=1, help="Latency rounds of the confirmation run."),
    max_same_failures: int = typer.Option(3, min=1, help="Stop after this many trials in a row fail with the same "
                                                         "exception type (a broken setup, not a bad configuration)."),
    wide: bool = wide_option(),
    as_json: bool = typer.Option(False, "--json", help="Print the final Pareto front as JSON on stdout; the "
                                                       "progress and messages go to stderr."),
) -> None:
    """Create or resume an Optuna study over a search space: unpruned baseline first, then (accuracy, latency
    objective: prefill ms unless --objective says otherwise) trials; prints the Pareto front. Exits non-zero when
    the baseline fails, when trials keep failing the same way, or when no trial completed."""
    import time

    import optuna
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tuner.results import pareto_trials
    from tuner.results.tables import describe_trial, latency_noise, speedup_text
    from tuner.search.early_stopping import with_chunk_size
    from tuner.search.portable import portable_space
    from tuner.search.space import load_space
    from tuner.search.study import TrialLost, Tuner, TuningStopped

    console = Console(stderr=as_json)
    quiet_libraries()
    log_to(console, "tuner")  # e.g. "storage lost, retrying" must show, also inside the hidden stderr
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("optuna.study._optimize").addFilter(_no_failed_trial_logs)  # one object: added only once
    try:
        space = load_space(space_path)
        if sampler is not None:
            space = space.with_sampler(sampler)
        space = space.with_overrides(model=model, tasks=tuple(task) or None, subset_size=limit, subset_seed=seed,
                                     trials=trials, timeout_s=timeout, feature_cache_mb=feature_cache_mb,
                                     early_stopping=with_chunk_size(space.early_stopping, early_stop_chunk))
        space = space.with_workload(objective=objective, batch_size=latency_batch, new_tokens=new_tokens,
                                    memory_budget_gb=memory_budget_gb)
        if portable is not None:
            space = portable_space(space, portable)
        if portable not in (None, "transformers"):  # transformers runs every point: nothing restricted
            console.print(f"--portable {escape(portable)}: keep_all over processor "
                          f"{escape(', '.join(space.processor.settings))}", highlight=False)
        with console.status(f"Loading {escape(space.model)} and {escape(', '.join(space.tasks))}..."), \
                hide_library_progress_bars():
            tuner_ = Tuner(space, storage, study_name=study, allow_mixed=allow_mixed,
                           heartbeat_interval=heartbeat_interval, allow_repeats=allow_repeats,
                           target=portable or "transformers")
    except Exception as error:  # noqa: BLE001 - start_up_line raises a bug again
        raise fail(start_up_line(storage, error)) from None
    target = space.trials
    console.print(f"study {escape(repr(tuner_.study_name))} in {escape(storage)}: {tuner_.n_complete()} complete "
                  "trials stored; "
                  f"target {target if target else 'unbounded'}"
                  f"{f', timeout {space.timeout_s:.0f} s' if space.timeout_s else ''}")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        trials_bar = progress.add_task("trials", total=target, completed=tuner_.n_complete())
        requests_bar = progress.add_task("current trial", total=tuner_.measurer.evaluator.n_requests)
        started = [time.perf_counter()]
        ran = [0]
        complete_before = tuner_.n_complete()
        tuner_.measurer.on_request = lambda n: progress.advance(requests_bar, n)

        def after_trial(study_: object, trial: object) -> None:
            seconds = time.perf_counter() - started[0]
            started[0] = time.perf_counter()
            ran[0] += 1
            record = TrialRecord.from_trial(trial)
            if trial.state.name == "COMPLETE" and record.stopped_early:
                reason = escape(record.stop_reason or "")
                line = (f"trial {trial.number}: {escape(describe_trial(trial))}: [yellow]{reason}[/] (stored as "
                        "infeasible)")
            elif trial.state.name == "COMPLETE":
                noise = latency_noise(trial)
                line = (f"trial {trial.number}: {escape(describe_trial(trial))}: accuracy "
                        f"{trial.values[0]:.3f}, {tuner_.goal.label} {trial.values[1]:.1f} {tuner_.goal.unit} "
                        f"({speedup_text(trial, tuner_.study)})"
                        + (f", [yellow]noisy latency[/]: {escape(noise)}" if noise else ""))
            elif record.duplicate_of is not None:
                line = (f"trial {trial.number} skipped: trial {record.duplicate_of} measured that "
                        "configuration")
            else:
                line = f"trial {trial.number} {trial.state.name.lower()}: {escape(str(record.failure or ''))}"
            progress.console.print(f"{line}  [{seconds:.1f} s; Pareto set: {len(pareto_trials(tuner_.study))}]")
            progress.update(trials_bar, completed=tuner_.n_complete())
            progress.reset(requests_bar)

        try:
            with hide_library_progress_bars():
                tuner_.run(target, space.timeout_s, callbacks=[after_trial], max_same_failures=max_same_failures)
        except KeyboardInterrupt:
            progress.stop()
            requeued = (f"trial {tuner_.requeued} queued again in place of the interrupted one"
                        if tuner_.requeued is not None else "no trial was running")
            console.print(f"[yellow]interrupted[/]: {tuner_.n_complete()} complete trials are stored in "
                          f"{escape(storage)}; {requeued}. Run the same command to resume.")
            raise typer.Exit(130) from None
        except (TuningStopped, TrialLost) as error:  # TrialLost: names the trial a later run must measure again
            progress.stop()
            raise fail(str(error), code=1) from None
        except Exception as error:
            progress.stop()
            raise storage_fail(storage, error) from error
    if tuner_.n_complete() == complete_before and (ran[0] or not complete_before):
        raise fail(f"no trial completed in study {tuner_.study_name!r}: {ran[0]} ran and failed (their reasons "
                    "are printed above and stored in the study)", code=1)
    cache = tuner_.measurer.feature_cache
    console.print(f"feature cache of this worker: {cache.stats().describe(cache.max_bytes)}" if cache else
                  "feature cache: off (--feature-cache-mb 0)")
    if confirm:
        try:
            run_confirmation(console, tuner_.study, tuner_.setup, repeats=confirm_repeats, fresh_limit=None,
                             fresh_seed=1, wide=wide, as_json=as_json)
        except (DartTunerError, ValueError) as error:
            raise fail(f"confirmation failed (the study is stored; run `dart-tuner confirm` to retry): {error}",
                       code=1) from None
    else:
        show_fronts(console, tuner_.study, wide=wide, as_json=as_json)
    console.print(f"{tuner_.n_complete()} complete trials in {escape(storage)}, study "
                  f"{escape(repr(tuner_.study_name))}. List studies: dart-tuner studies --storage {escape(storage)}",
                  highlight=False)
