"""The `dart-tuner` command line (typer + rich): one module per group of commands, assembled on one app."""

# Importing a module registers its commands on `app`; this order is the order of `dart-tuner --help`.
from tuner.cli import evaluate, tuning, confirming, read, search_bench, spaces, bench_read, serving  # noqa: F401, I001
from tuner.cli.common import app
from tuner.cli.read import dashboard_app_path, dashboard_command

__all__ = ["app", "dashboard_app_path", "dashboard_command"]
