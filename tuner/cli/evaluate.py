"""Commands that run a model: `bench-pruning`, `eval` and `train-tiny`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import typer
from rich.console import Console

from tuner.cli.common import (
    app,
    fail,
    hide_library_progress_bars,
    interruptible,
    options_for,
    parse_options,
    print_json,
    quiet_libraries,
    raised_in_our_code,
    show_sheet,
    wide_option,
    with_stage_options,
)
from tuner.errors import DartTunerError
from tuner.tiny.recipe import TrainConfig

STDOUT = Path("-")  # `--json -`: the JSON on stdout instead of a file, and every message on stderr


@app.command("bench-pruning")
def bench_pruning(
    layer: int = typer.Option(2, help="Prune before decoder layer K."),
    method: list[str] = typer.Option([], help="Method to time (repeatable; default: every registered method but "
                                              "keep_all, which always has its own row)."),
    budget: list[int] = typer.Option([], min=1, help="Vision tokens kept (repeatable; default 1/9, 2/9 and 3/9 of the "
                                                     "shape's: 64 128 192 of 576)."),
    repeats: int = typer.Option(7, min=1, help="Timed rounds; every configuration runs once per round."),
    warmup: int = typer.Option(2, min=0, help="Discarded rounds before timing."),
    threads: int = typer.Option(2, min=1, help="torch CPU threads."),
    hidden: int | None = typer.Option(None, min=1, help="Hidden size (default: the shape's; smaller for a quick run)."),
    layers: int | None = typer.Option(None, min=1, help="Decoder layers (default: the shape's)."),
    attn_implementation: str = typer.Option("sdpa", help="sdpa, eager or flash_attention_2."),
    shape: str = typer.Option("small", help="Text stack and prompt: small, llava-1.5-7b, llava-next-7b or "
                                            "qwen2.5-vl-7b (random weights, nothing downloaded)."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the rows here ('-': on stdout, with the "
                                                               "table's cells; messages go to stderr)."),
    profile: bool = typer.Option(False, "--profile", help="Instead of the timing table, split each prefill with "
                                                          "torch.profiler: layers, capture, selection, the hooks' "
                                                          "steps, against the unhooked model at the kept length."),
    wide: bool = wide_option(),
) -> None:
    """Prefill time and selection cost of no hooks, keep_all and every method at each budget, interleaved."""
    import torch
    from rich.markup import escape

    from tuner.bench.pruning import bench_sheet, default_methods, rows_as_dicts, run_benchmark
    from tuner.bench.shapes import get_shape

    torch.set_num_threads(threads)
    to_stdout = json_path == STDOUT
    console = Console(stderr=to_stdout)
    try:
        bench_shape = get_shape(shape)
    except ValueError as error:
        raise fail(str(error)) from None
    methods, budgets = tuple(method) or default_methods(), tuple(budget) or bench_shape.budgets()
    n_configs = 2 + len([m for m in dict.fromkeys(methods) if m != "keep_all"]) * len(set(budgets))
    if profile:
        return _profile_pruning(console, methods=methods, budgets=budgets, layer=layer, repeats=repeats, hidden=hidden,
                                layers=layers, attn_implementation=attn_implementation, shape=shape, device=device,
                                dtype=dtype, threads=threads, json_path=json_path, wide=wide)
    try:
        with console.status(f"Timing {repeats} interleaved rounds of {n_configs} configurations..."):
            result = run_benchmark(layer=layer, budgets=budgets, methods=methods, repeats=repeats, warmup=warmup,
                                   hidden=hidden, layers=layers, attn_implementation=attn_implementation,
                                   shape=shape, device=device, dtype=dtype)
    except ValueError as error:  # an unknown method, shape, device, dtype or attention; a layer K out of range
        raise fail(str(error)) from None
    sheet = bench_sheet(result, hidden=hidden, layers=layers, threads=threads, layer=layer, repeats=repeats,
                        attn_implementation=attn_implementation, shape=shape, device=device, dtype=dtype)
    if not to_stdout:
        show_sheet(console, sheet, wide=wide)
    by_name = {row.name: row for row in result.rows}
    overhead = by_name["keep_all"].median_ms / by_name["no hooks"].median_ms - 1
    console.print(f"keep_all overhead over no hooks: {100 * overhead:+.1f}%; select ms: the hooks' timing of the "
                  "selection inside each timed prefill (part of the prefill time)")
    for name, reason in result.skipped.items():
        console.print(f"[yellow]skipped {escape(name)}[/yellow]: {escape(reason)}", highlight=False)
    payload = {"rows": rows_as_dicts(result.rows), "skipped": result.skipped, "keep_all_overhead": overhead,
               "torch": torch.__version__, "threads": threads, "layer": layer, "repeats": repeats, "warmup": warmup,
               "hidden": hidden or bench_shape.hidden, "layers": layers or bench_shape.layers,
               "attn_implementation": attn_implementation, "shape": shape, "device": device, "dtype": dtype,
               "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else None}
    if to_stdout:
        print_json({**payload, "table": sheet.as_json()})
    elif json_path is not None:
        json_path.write_text(json.dumps(payload, indent=1))


def _profile_pruning(console: Console, *, methods: tuple[str, ...], budgets: tuple[int, ...], layer: int, repeats: int,
                     hidden: int | None, layers: int | None, attn_implementation: str, shape: str, device: str,
                     dtype: str, threads: int, json_path: Path | None, wide: bool) -> None:
    """`bench-pruning --profile`: the split of each prefill (tuner.bench.pruning_profile), a table and --json."""
    import torch

    from tuner.bench.pruning_profile import profile_dicts, profile_sheet, run_profile
    from tuner.bench.shapes import get_shape

    bench_shape = get_shape(shape)
    try:
        with console.status(f"Profiling {repeats} interleaved rounds..."):
            rows = run_profile(layer=layer, budgets=budgets, methods=methods, rounds=repeats, hidden=hidden,
                               layers=layers, attn_implementation=attn_implementation, shape=shape, device=device,
                               dtype=dtype)
    except ValueError as error:
        raise fail(str(error)) from None
    title = (f"Prefill split, {shape}: hidden {hidden or bench_shape.hidden} x {layers or bench_shape.layers} layers, "
             f"{dtype}, {threads if device == 'cpu' else device} threads, {attn_implementation}, K={layer}; "
             f"ms per prefill, medians of {repeats} interleaved profiled rounds")
    sheet = profile_sheet(rows, title=title.replace(f"{device} threads", device))
    payload = {"profile": profile_dicts(rows), "torch": torch.__version__, "threads": threads, "layer": layer,
               "repeats": repeats, "shape": shape, "device": device, "dtype": dtype,
               "attn_implementation": attn_implementation}
    if json_path == STDOUT:
        print_json({**payload, "table": sheet.as_json()})
        return
    show_sheet(console, sheet, wide=wide)
    console.print("mechanics: capture + hook steps + (layers >= K - the unhooked layers >= K at the kept length P), "
                  "as a share of the prefill; 'w/o': the share of the bound without them", highlight=False)
    if json_path is not None:
        json_path.write_text(json.dumps(payload, indent=1))


@app.command("eval")
@interruptible
def eval_command(
    model: str = typer.Option(..., "--model", "-m", help="Hugging Face hub id or local folder of a supported VLM."),
    task: list[str] = typer.Option(..., "--task", "-t", help="lmms-eval task name, or the bundled 'dart_shapes'. "
                                                             "Repeat for several tasks."),
    preset: Path | None = typer.Option(None, help="Preset file to evaluate (instead of --method ...)."),
    method: list[str] = typer.Option([], help="Pruning method: dart, random, pooling, avgpool, fastv, window_fastv, "
                                              "divprune, cdpruner, sparsevlm, visionzip, keep_all. "
                                              "Repeat to compare several."),
    schedule: list[str] = typer.Option([], help="A multi-stage schedule as the tables print it, e.g. "
                                                "'fastv@2:0.5>4:0.5>6:64t' (instead of --method ...). Repeat to "
                                                "compare several."),
    layer: int | None = typer.Option(None, help="Prune before decoder layer K (default: the method's own: 2, or 0 "
                                                "for visionzip, divprune and cdpruner)."),
    keep_ratio: list[float] = typer.Option([], help="Fraction of vision tokens kept, in (0, 1]. Repeat to compare "
                                                    "several (every method x every ratio)."),
    budget: int | None = typer.Option(None, help="Vision tokens kept per image prompt (instead of --keep-ratio)."),
    image_pivots: int | None = typer.Option(None, help="Shorthand for --option dart.n_image_pivots=N."),
    text_pivots: int | None = typer.Option(None, help="Shorthand for --option dart.n_text_pivots=N."),
    option: list[str] = typer.Option([], help="Method option key=value (repeatable): set for every --method that "
                                              "has it, or method.key=value for one method."),
    processor: list[str] = typer.Option([], help="Processor setting name=value (repeatable), e.g. image_size=224 "
                                                 "or max_pixels=401408: every configuration runs on the images "
                                                 "processed so (--method keep_all: plain downsampling)."),
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
    json_path: Path | None = typer.Option(None, "--json", help="Write every number and per-sample result here "
                                                               "('-': on stdout, with the table's cells; messages "
                                                               "go to stderr)."),
    wide: bool = wide_option(),
) -> None:
    """Accuracy, kept tokens, prefill and decode latency, FLOPs and KV bytes: a configuration next to the unpruned
    baseline."""
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tuner.config import PruningConfig, parse_schedule
    from tuner.config.preset import load_preset
    from tuner.config.workload import Workload, workload_warning
    from tuner.evaluation.lmms_model import GenerationFailure
    from tuner.evaluation.tasks import load_tasks

    console = Console(stderr=json_path == STDOUT)
    quiet_libraries()
    try:
        given = [flag for flag, value in (("--preset", preset), ("--method", method), ("--schedule", schedule))
                 if value]
        if len(given) > 1:
            raise ValueError(f"give one of --preset, --method or --schedule, not {' and '.join(given)}")
        if schedule and (layer is not None or keep_ratio or budget is not None):
            raise ValueError("--schedule sets every stage's layer and amount; drop --layer, --keep-ratio and --budget")
        shorthands = {"dart.n_image_pivots": image_pivots, "dart.n_text_pivots": text_pivots}
        options = {**parse_options(option), **{k: v for k, v in shorthands.items() if v is not None}}
        settings = parse_options(processor, "--processor")
        if preset is not None and settings:
            raise ValueError("a preset carries its own processor settings; drop --processor")
        if preset is not None:
            loaded_preset = load_preset(preset)
            configs = {"preset": loaded_preset.config}
            # eval times one request decoding --new-tokens: say so when the preset was tuned for another workload
            mismatch = workload_warning(loaded_preset.provenance, Workload(new_tokens=new_tokens),
                                        ("batch_size", "new_tokens"))
            if mismatch:
                console.print(f"[yellow]warning[/]: {escape(mismatch)} (eval times 1 request, {new_tokens} new "
                              "tokens; `dart-tuner bench-serving --preset` times the workload)", highlight=False)
        elif schedule:
            configs = {text: with_stage_options(parse_schedule(text), options) for text in schedule}
        else:
            ratios: list[float | None] = list(keep_ratio) or [None]
            amounts = {ratio: f" {ratio}" if ratio is not None else f" {budget}t" if budget else "" for ratio in ratios}
            configs = {f"{name}{amounts[ratio]}": PruningConfig(method=name, layer=_method_layer(name, layer),
                                                        keep_ratio=ratio, budget=budget,
                                                        options=options_for(name, options, method))
                       for name in method for ratio in ratios}
        if settings:  # stacked under every configuration's pruning (checked against the family once loaded)
            configs = {f"{name} [{', '.join(f'{k}={v}' for k, v in settings.items())}]":
                       dataclasses.replace(config, processor=settings) for name, config in configs.items()}
        from tuner.measure.compare import BASELINE, compare_configs
        from tuner.models import load_model

        with console.status(f"Loading {escape(model)} and {escape(', '.join(task))}..."), \
                hide_library_progress_bars():
            loaded = load_model(model, dtype=dtype, device=device, attn_implementation=attn_implementation)
            tasks = load_tasks(task, subset_size=limit, seed=seed, include_paths=include_path)
        n_requests = sum(t.subset.size for t in tasks)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as progress:
            bars = {name: progress.add_task(f"accuracy: {escape(name)}", total=n_requests)
                    for name in [BASELINE, *configs]}
            latency_bar = progress.add_task("latency (interleaved)", total=1)

            def advance(stage: str, n: int) -> None:
                if stage == "latency":
                    progress.update(latency_bar, description=f"latency: {len(bars)} configurations x "
                                                             f"{warmup + repeats} rounds")
                else:
                    progress.advance(bars[stage], n)

            with hide_library_progress_bars():
                reports = compare_configs(loaded, tasks, configs, batch_size=batch_size, max_failures=max_failures,
                                          new_tokens=new_tokens, repeats=repeats, warmup=warmup,
                                          on_progress=advance)
            progress.advance(latency_bar, 1)
    except (DartTunerError, ValueError) as error:  # ValueError: PruningConfig and check_layer name the bad field
        raise fail(str(error)) from None
    except GenerationFailure as error:  # the task's hooks or the model failed; a bug of ours keeps its traceback
        if raised_in_our_code(error):
            raise
        raise fail(str(error), code=1) from None
    _print_and_save_eval(console, reports, loaded, tasks, json_path, wide)


def _method_layer(name: str, layer: int | None) -> int:
    """`--layer` when given, else the method's own K (`PruningMethod.default_layer`: 2, or 0 for visionzip)."""
    if layer is not None:
        return layer
    from tuner.config.catalog import method_class

    return getattr(method_class(name), "default_layer", 2)


def _print_and_save_eval(console: Console, reports: list, loaded: object, tasks: list, json_path: Path | None,
                         wide: bool = False) -> None:
    """The eval table (compact or `wide`), the subset line, and the JSON file when asked for (`STDOUT`: on stdout,
    with the table's cells, instead of the table)."""
    from rich.markup import escape

    from tuner.config.environment import environment
    from tuner.measure.table import comparison_sheet

    subsets = ", ".join(f"{t.name}: {t.subset.size}/{t.subset.total} docs (seed {t.subset.seed}, "
                        f"stratified by {t.subset.stratified_by}, hash {t.subset.hash[:12]})" for t in tasks)
    timing = reports[0].latency
    title = (f"{loaded.model_id} ({loaded.family}, {loaded.provenance()['dtype']}, {loaded.attn_implementation}, "
             f"{loaded.provenance()['device']})")
    sheet = comparison_sheet(reports, title)
    if json_path != STDOUT:
        show_sheet(console, sheet, wide=wide)
    console.print(f"subset: {escape(subsets)}", highlight=False)
    console.print(f"latency: {reports[0].cost.n_tokens} prompt tokens, {timing.new_tokens} new tokens, median of "
                  f"{timing.prefill.repeats} interleaved rounds; GFLOPs and KV bytes are analytic (text model, "
                  "same inputs)")
    if json_path is not None:
        payload = {"model": loaded.provenance(), "environment": environment(),
                   "tasks": [{"name": t.name, "primary_metric": t.primary_metric, "subset": t.subset.to_dict()}
                             for t in tasks],
                   "rows": [r.to_dict(with_samples=True) for r in reports]}
        if json_path == STDOUT:
            print_json({**payload, "table": sheet.as_json()})
            return
        json_path.write_text(json.dumps(payload, indent=1, default=str))
        console.print(f"wrote {escape(str(json_path))}", highlight=False)


_TRAIN = TrainConfig()


@app.command("train-tiny")
@interruptible
def train_tiny(
    out: Path = typer.Option(Path("artifacts/tiny-llava-shapes"), help="Checkpoint folder to write."),
    steps: int = typer.Option(_TRAIN.steps, min=1, help="Optimizer steps (about 1.7 s each on 2 CPU cores)."),
    batch_size: int = typer.Option(_TRAIN.batch_size, min=1, help="Images per step."),
    turns_per_image: int = typer.Option(_TRAIN.turns_per_image, min=1, help="Question/answer turns after each image."),
    lr: float = typer.Option(_TRAIN.lr, help="Peak learning rate (warm-up, then cosine to 5%)."),
    warmup_steps: int = typer.Option(_TRAIN.warmup_steps, min=0, help="Linear warm-up steps."),
    seed: int = typer.Option(0, help="Seed of the weights and of the training scenes."),
    eval_every: int = typer.Option(_TRAIN.eval_every, min=0,
                                   help="Steps between validation accuracies (0: only at the end)."),
    threads: int = typer.Option(2, min=1, help="torch CPU threads."),
    init_from: Path | None = typer.Option(None, help="Continue from this checkpoint's weights (new schedule)."),
    first_image: int = typer.Option(0, min=0, help="First training scene; when continuing, the images seen so far "
                                                   "(steps x batch size) so none is repeated."),
    bf16: bool = typer.Option(_TRAIN.bf16, help="bfloat16 autocast (weights and optimizer stay fp32)."),
    guidance: float = typer.Option(_TRAIN.guidance, min=0.0, help="Weight of the attention-guidance loss (0: none)."),
    guidance_steps: int = typer.Option(_TRAIN.guidance_steps, min=0,
                                       help="Steps over which that weight falls linearly to 0."),
    resume: bool = typer.Option(False, help="Go on from the last evaluation saved in --out (same settings)."),
) -> None:
    """Train the embedded tiny LLaVA from scratch on generated dart_shapes scenes (seeded, reproducible), or
    continue a run from its checkpoint."""
    import torch
    from rich.markup import escape

    from tuner.tiny.train import TrainConfig, train

    torch.set_num_threads(threads)
    config = TrainConfig(steps=steps, batch_size=batch_size, turns_per_image=turns_per_image, lr=lr, seed=seed,
                         warmup_steps=warmup_steps, eval_every=eval_every or steps,
                         init_from=str(init_from) if init_from else None,
                         first_image=first_image, bf16=bf16, guidance=guidance, guidance_steps=guidance_steps)
    if init_from is not None and not (init_from / "config.json").exists():
        raise fail(f"--init-from {str(init_from)!r} is not a checkpoint folder (no config.json)")
    console = Console()
    console.print(f"training {steps} steps x {batch_size} images into {escape(str(out))}", highlight=False)
    try:
        _, _, history = train(config, out_dir=out, log=console.print, resume=resume)
    except ValueError as error:
        raise fail(str(error)) from None
    final = history.evaluations[-1]["val_accuracy"] if history.evaluations else float("nan")
    console.print(f"done in {history.seconds:.0f} s: validation accuracy {final:.3f} (first answer token, "
                  f"{config.eval_docs} held-out questions); checkpoint in {escape(str(out))}", highlight=False)
