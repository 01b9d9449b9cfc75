"""The `dart-tuner` command line (typer + rich)."""

from __future__ import annotations

import typer

app = typer.Typer(help="Find and apply the best visual-token pruning configuration for a multimodal LLM.",
                  no_args_is_help=True, add_completion=False)


@app.callback()
def main() -> None:
    """dart-tuner: DART visual-token pruning, tuned per model, task and hardware."""
