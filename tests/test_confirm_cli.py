"""`dart-tuner confirm` refuses what it cannot confirm with one line, before loading any model, and confirms a study
tuned with `--limit` on the documents it was tuned on."""

from __future__ import annotations

from pathlib import Path

import optuna
import yaml
from typer.testing import CliRunner

from tuner.cli import app
from tuner.results.evidence import CONFIRMATION_ATTR
from tuner.search.confirm import stored_subset

DEMO_SPACE = Path(__file__).resolve().parent.parent / "search_spaces" / "demo.yaml"


def test_confirm_never_creates_a_study(tmp_path: Path) -> None:
    """A study name that is not in the storage is one line listing the ones there, exit 2, and nothing is added."""
    storage = f"sqlite:///{tmp_path / 's.db'}"
    optuna.create_study(storage=storage, study_name="other", directions=["maximize", "minimize"])
    result = CliRunner().invoke(app, ["confirm", "--space", str(DEMO_SPACE), "--storage", storage])
    assert result.exit_code == 2, result.output
    assert "no study 'demo'" in result.output and "other" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == ["other"]


def test_confirm_options_are_checked(tmp_path: Path) -> None:
    """--repeats 0 is refused by the option itself, naming it."""
    result = CliRunner().invoke(app, ["confirm", "--space", str(DEMO_SPACE), "--repeats", "0"])
    assert result.exit_code == 2 and "--repeats" in result.output


def test_a_front_without_pruned_trials_is_still_printed() -> None:
    """tune ends with the front even when confirmation has nothing to re-measure (only the baseline is on it)."""
    from rich.console import Console

    from tuner.cli.confirming import run_confirmation

    study = optuna.create_study(directions=["maximize", "minimize"], study_name="only-baseline")
    study.add_trial(optuna.create_trial(values=[0.8, 100.0], user_attrs={"role": "baseline", "config": None}))
    console = Console(record=True, width=200)
    run_confirmation(console, study, None, repeats=3, fresh_limit=None, fresh_seed=1)
    text = console.export_text()
    assert "Pareto front of only-baseline" in text and "nothing to confirm" in text


def _tiny_space(tmp_path: Path, model: str) -> Path:
    data = {"study": "limited", "model": model, "tasks": ["dart_shapes"], "subset": {"size": 6, "seed": 0},
            "methods": ["random"], "layer": [1], "keep_ratio": [0.25], "attn_implementation": "sdpa",
            "dtype": "float32", "device": "cpu", "batch_size": 3, "sampler": {"name": "random", "seed": 0},
            "latency": {"new_tokens": 2, "repeats": 3, "warmup": 1}}
    path = tmp_path / "limited.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_confirm_uses_the_subset_a_limit_study_was_tuned_on(tmp_path: Path) -> None:
    """A study tuned with `--limit` and `--seed` is confirmed on the same documents without being told (it used to
    be refused as "measured on another setup"); `confirm --limit` picks another size, which is refused unless
    `--allow-mixed`, as on `tune`."""
    runner = CliRunner()
    storage = f"sqlite:///{tmp_path / 'l.db'}"
    # the embedded model: keeping a quarter of its 256 vision tokens is clearly faster, so the pruned trial is on the
    # front to confirm (on a random 2-layer model the latency noise of a loaded machine could leave only the baseline)
    space = str(_tiny_space(tmp_path, "embedded:tiny-llava-shapes"))
    tuned = runner.invoke(app, ["tune", "--space", space, "--storage", storage, "--limit", "4", "--seed", "3",
                                "--trials", "2", "--no-confirm"])
    assert tuned.exit_code == 0, tuned.output
    stored = optuna.load_study(study_name="limited", storage=storage)
    assert stored_subset(stored) == (4, 3)
    confirm = ["confirm", "--space", space, "--storage", storage, "--repeats", "1"]
    result = runner.invoke(app, confirm)
    assert result.exit_code == 0, result.output
    record = optuna.load_study(study_name="limited", storage=storage).user_attrs[CONFIRMATION_ATTR]
    assert record["trials"], result.output  # the pruned trial of the front was re-measured
    # the fresh subset has the study's size (4) and is disjoint from the 4 documents it was tuned on
    assert [s["size"] for s in record["fresh_subset"]] == [4]
    other = runner.invoke(app, [*confirm, "--limit", "5"])
    assert other.exit_code == 2 and "measured on another setup" in other.output, other.output
    mixed = runner.invoke(app, [*confirm, "--limit", "5", "--allow-mixed", "--fresh-limit", "0"])
    assert mixed.exit_code == 0, mixed.output
