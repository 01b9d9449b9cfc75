"""The `spaces` command: the search spaces shipped with the package, which `--space NAME` accepts from any folder."""

from __future__ import annotations

from rich.console import Console

from tuner.cli.common import app, fail, json_option, show_sheet, wide_option
from tuner.errors import DartTunerError


@app.command("spaces")
def spaces(wide: bool = wide_option(), as_json: bool = json_option()) -> None:
    """List the packaged search spaces: name (what --space takes), model and what each is for."""
    from tuner.results.tables import Column, Sheet
    from tuner.search.space_files import describe_space, packaged_folder, packaged_spaces

    shipped = packaged_spaces()
    if not shipped:
        raise fail(f"no search spaces are packaged in {packaged_folder()}: reinstall dart-tuner")
    sheet = Sheet("Packaged search spaces", [Column("name", "name", "name", "left"),
                                             Column("model", "model", "model", "left"),
                                             Column("description", "description", "description", "left"),
                                             Column("path", "file", None, "left")],
                  notes=[f"in {packaged_folder()}; run one with: dart-tuner tune --space NAME"])
    for name, path in shipped.items():
        try:
            model, description = describe_space(path)
        except DartTunerError as error:  # listed anyway, so one broken file does not hide the others
            model, description = "?", f"unreadable: {error}"
        sheet.add_row([name, model, description, str(path)],
                      {"name": name, "model": model, "description": description, "path": str(path)})
    show_sheet(Console(), sheet, wide=wide, as_json=as_json)
