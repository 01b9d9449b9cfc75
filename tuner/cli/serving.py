"""The `bench-serving` command: what serving pays, every latency objective at each batch size, one table."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from tuner.cli.common import (
    app,
    fail,
    hide_library_progress_bars,
    interruptible,
    quiet_libraries,
    show_sheet,
    wide_option,
)
from tuner.errors import DartTunerError


@app.command("bench-serving")
@interruptible
def bench_serving(
    model: str = typer.Option("embedded:tiny-llava-shapes", "--model", "-m", help="Hub id, folder or embedded "
                                                                                  "model."),
    task: str = typer.Option("dart_shapes", "--task", "-t", help="Task whose first B documents are timed."),
    method: list[str] = typer.Option(["dart", "random"], help="Methods timed next to the unpruned baseline "
                                                              "(repeatable)."),
    keep_ratio: float = typer.Option(0.1, help="Fraction of vision tokens each --method keeps."),
    layer: int = typer.Option(2, help="Decoder layer K each --method prunes before."),
    preset: Path | None = typer.Option(None, help="Time a preset next to the baseline instead of --method; its "
                                                  "tuned workload is timed first, then --batch."),
    batch: list[int] = typer.Option([1, 8], min=1, help="Requests timed together (repeatable): one interleaved "
                                                        "run per value."),
    new_tokens: int = typer.Option(16, min=2, help="Tokens each request decodes (forced)."),
    repeats: int = typer.Option(5, min=1, help="Timed interleaved rounds per batch size."),
    warmup: int = typer.Option(1, min=0, help="Discarded rounds per batch size."),
    memory_budget_gb: float | None = typer.Option(None, help="GiB of accelerator memory: add each configuration's "
                                                  "max concurrent requests in it (measured on CUDA, analytic "
                                                  "weights + KV cache elsewhere)."),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    attn_implementation: str = typer.Option("auto", "--attn", help="auto, sdpa, eager or flash_attention_2."),
    threads: int | None = typer.Option(None, min=1, help="torch CPU threads (default: torch's own; 1 keeps a "
                                                        "machine shared with other jobs from stalling its threads)."),
    wide: bool = wide_option(),
    as_json: bool = typer.Option(False, "--json", help="Print the table as JSON on stdout."),
) -> None:
    """Prefill (1 request), time to first token, end-to-end latency and throughput at each --batch, decode ms per
    token and memory: the unpruned baseline and each configuration, timed in the same interleaved rounds."""
    import torch
    from rich.markup import escape

    from tuner.bench.serving import serving_runs, serving_sheet
    from tuner.config import PruningConfig
    from tuner.config.preset import load_preset
    from tuner.evaluation.tasks import load_tasks
    from tuner.models import load_model

    if threads is not None:
        torch.set_num_threads(threads)
    console = Console(stderr=as_json)
    quiet_libraries()
    batches = list(dict.fromkeys(batch))
    try:
        if preset is not None:
            loaded_preset = load_preset(preset)
            configs = {"preset": loaded_preset.config}
            tuned = (loaded_preset.provenance.get("workload") or {}).get("batch_size")
            batches = list(dict.fromkeys([tuned, *batches] if tuned else batches))
        else:
            configs = {f"{name} {keep_ratio:g}": PruningConfig(method=name, layer=layer, keep_ratio=keep_ratio)
                       for name in method}
        with console.status(f"Loading {escape(model)} and {escape(task)}..."), hide_library_progress_bars():
            loaded = load_model(model, dtype=dtype, device=device, attn_implementation=attn_implementation)
            tasks = load_tasks([task], subset_size=max(batches), seed=0)
        with console.status(f"Timing {len(configs) + 1} configurations x {warmup + repeats} rounds at batch "
                            f"{', '.join(map(str, batches))}..."):
            runs = serving_runs(loaded, tasks[0], configs, batches, new_tokens=new_tokens, repeats=repeats,
                                warmup=warmup, memory_budget_gb=memory_budget_gb)
    except (DartTunerError, ValueError) as error:  # ValueError: PruningConfig and the workload name the bad value
        raise fail(str(error)) from None
    title = (f"Serving: {loaded.model_id} ({loaded.family}, {loaded.provenance()['dtype']}, "
             f"{loaded.provenance()['device']}, {torch.get_num_threads()} threads), {task}, {new_tokens} new tokens")
    show_sheet(console, serving_sheet(runs, title), wide=wide, as_json=as_json)
