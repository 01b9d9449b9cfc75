"""The `spaces` command: the search spaces shipped with the package, which `--space NAME` accepts from any folder."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from tuner.cli.common import app, fail
from tuner.errors import DartTunerError


@app.command("spaces")
def spaces() -> None:
    """List the packaged search spaces: name (what --space takes), model and what each is for."""
    from tuner.search.space_files import describe_space, packaged_folder, packaged_spaces

    shipped = packaged_spaces()
    if not shipped:
        raise fail(f"no search spaces are packaged in {packaged_folder()}: reinstall dart-tuner")
    table = Table(title="Packaged search spaces",
                  caption=f"in {packaged_folder()}; run one with: dart-tuner tune --space NAME")
    table.add_column("name", no_wrap=True)
    table.add_column("model", no_wrap=True)
    table.add_column("description")
    for name, path in shipped.items():
        try:
            model, description = describe_space(path)
        except DartTunerError as error:
            model, description = "?", f"[red]unreadable[/]: {error}"
        table.add_row(name, model, description)
    Console().print(table)
