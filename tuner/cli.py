"""The `dart-tuner` command line (typer + rich)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

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
