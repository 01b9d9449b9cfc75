"""The read side stands alone: `studies`, `export`, the dashboard's data and the dashboard app itself work in a
process where lmms-eval (and so `tuner.evaluation`) cannot be imported, as after `pip install dart-tuner[dashboard]`
without the `eval` extra."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import dashboard_study

REPO = Path(__file__).resolve().parent.parent
APP = REPO / "dashboard" / "app.py"

# Run first in the child: any import of lmms_eval or tuner.evaluation fails as a missing module would.
_BLOCK = """
import importlib.abc, sys

class _NoEvaluationStack(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "lmms_eval" or name.startswith("tuner.evaluation"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: the read side must not need it)")
        return None

sys.meta_path.insert(0, _NoEvaluationStack())
"""


def _run_without_evaluation(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    script = tmp_path / "child.py"
    script.write_text(_BLOCK + textwrap.dedent(code))
    # The child runs in tmp_path, so put this checkout's `tuner` first, not whichever one is installed.
    path = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": path})


def test_studies_export_and_dashboard_need_no_evaluation_stack(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'dash.db'}"
    dashboard_study.build_study(storage)
    result = _run_without_evaluation(f"""
        import os
        from typer.testing import CliRunner
        from streamlit.testing.v1 import AppTest
        from tuner.cli import app
        from tuner import dashboard as dd
        from tuner.results.storage import open_for_reading

        runner = CliRunner()
        listed = runner.invoke(app, ["studies", "--storage", {storage!r}])
        assert listed.exit_code == 0 and "dash" in listed.output, listed.output
        exported = runner.invoke(app, ["export", "--study", "dash", "--storage", {storage!r},
                                       "--min-relative-accuracy", "0.9", "-o", "preset.yaml"])
        assert exported.exit_code == 0 and os.path.getsize("preset.yaml") > 0, exported.output

        study = dd.load_study(open_for_reading({storage!r}), "dash")
        assert dd.recommend(study, min_relative_accuracy=0.9).trial is not None
        assert [c.name for c in dd.list_studies(open_for_reading({storage!r}))] == ["dash"]

        os.environ[dd.STORAGE_ENV] = {storage!r}
        at = AppTest.from_file({str(APP)!r}, default_timeout=60).run()
        assert not at.exception, [e.value for e in at.exception]
        assert at.get("plotly_chart"), "no figure drawn"

        assert not any(name == "lmms_eval" or name.startswith(("lmms_eval.", "tuner.evaluation"))
                       for name in sys.modules)
        print("read side OK")
    """, tmp_path)
    assert result.returncode == 0 and "read side OK" in result.stdout, result.stdout + result.stderr


def test_the_blocker_really_blocks(tmp_path: Path) -> None:
    """Without this, the test above could pass in a process that imports the evaluation stack after all."""
    result = _run_without_evaluation("""
        import tuner.search.study
    """, tmp_path)
    assert result.returncode != 0 and "blocked: the read side must not need it" in result.stderr


def test_the_read_side_and_config_import_no_torch(tmp_path: Path) -> None:
    """Importing config, results, export and the dashboard's data loads neither torch nor the pruning package
    (a config imports its method only when one is built)."""
    result = _run_without_evaluation("""
        import tuner.config.pruning_config
        heavy = [n for n in sys.modules if n == "torch" or n.startswith(("torch.", "tuner.pruning"))]
        assert not heavy, ("tuner.config.pruning_config", heavy)
        import tuner.dashboard, tuner.results.export, tuner.results.trials
        heavy = [n for n in sys.modules if n == "torch" or n.startswith(("torch.", "tuner.pruning"))]
        assert not heavy, ("read side", heavy)
        print("light OK")
    """, tmp_path)
    assert result.returncode == 0 and "light OK" in result.stdout, result.stdout + result.stderr
