"""`python -m tuner.cli ...`: the `dart-tuner` command without its console script (e.g. a `--target` install)."""

from tuner.cli import app

app(prog_name="dart-tuner")
