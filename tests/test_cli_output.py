"""What the CLI prints: every table readable at 80 columns (compact by default, every column with --wide, JSON on
stdout with --json), `dart-tuner front`, one-line start-up failures, and user text that is never read as markup."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dashboard_study
import optuna
import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from tuner.bench.search import Curve, hypervolume_sheet, summarise
from tuner.cli import app
from tuner.results import pareto_trials
from tuner.results.tables import PARETO_COLUMNS, STUDIES_COLUMNS

optuna.logging.set_verbosity(optuna.logging.WARNING)
BUNDLED_TASK = Path(__file__).resolve().parents[1] / "tuner" / "evaluation" / "bundled_tasks" / "dart_shapes"
CONFIRMATION = {"repeats": 20, "fresh_subset": [{"name": "dart_shapes", "size": 60}],
                "trials": {"1": {"prefill_ms": 44.1, "speedup": 2.27, "accuracy": 0.783, "accuracy_low": 0.661,
                                 "accuracy_high": 0.871}}}
ODD_NAMES = ("[/]", "[red]x")


def _invoke(args: list[str], columns: int = 80):
    return CliRunner().invoke(app, args, env={"COLUMNS": str(columns)})


def _assert_fits_80(output: str) -> None:
    too_wide = [line for line in output.splitlines() if len(line) > 80]
    assert not too_wide, "\n".join(too_wide)
    assert "…" not in output, output


EVIDENCE = {"accuracy_low": 0.651, "accuracy_high": 0.848, "prefill_ms_low": 27.4, "prefill_ms_high": 31.9,
            "accuracy_diff": -0.041, "accuracy_diff_low": -0.112, "accuracy_diff_high": 0.033, "mcnemar_p": 0.62}


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Study 'dash' plus trial 13 with stored 95% intervals (the widest cells), its front confirmed; and two studies
    whose names look like markup."""
    url = f"sqlite:///{tmp_path_factory.mktemp('stored') / 's.db'}"
    study = dashboard_study.build_study(url)
    trial = dashboard_study.pruned_trial("dart", 2, 0.12, 3, 3, 0.76, 30.0)  # dominates trial 3 (0.74 at 32 ms)
    trial.user_attrs.update(EVIDENCE)
    study.add_trial(trial)
    study.set_user_attr("confirmation", CONFIRMATION)
    for name in ODD_NAMES:
        dashboard_study.build_study(url, name)
    return url


@pytest.mark.parametrize("args", [["studies"], ["front", "--study", "dash"],
                                  ["export", "--study", "dash", "--min-accuracy", "0.99"]])
def test_every_stored_table_fits_80_columns(storage: str, args: list[str]) -> None:
    result = _invoke([*args, "--storage", storage])
    assert result.exit_code == (2 if args[0] == "export" else 0), result.output
    _assert_fits_80(result.output)
    if args[0] == "export":  # the closest trials, each one readable
        assert "Closest" in result.output and "#4 pooling" in " ".join(result.output.split())


def test_front_is_the_feasible_front_with_its_confirmation(storage: str) -> None:
    """`front` prints the same rows as tune's last table: the feasible front, fastest first, confirmed numbers."""
    result = _invoke(["front", "--study", "dash", "--storage", storage])
    assert result.exit_code == 0, result.output
    rows = [line.split("│")[1].strip() for line in result.output.splitlines()
            if line.count("│") > 2 and line.split("│")[1].strip()]
    study = optuna.load_study(study_name="dash", storage=storage)
    assert rows == [str(t.number) for t in pareto_trials(study)] == ["6", "13", "1", "8", "4", "0"]
    assert "44.1 ms" in result.output and "confirmed" in result.output


def test_json_carries_every_column_and_nothing_else_is_on_stdout(storage: str) -> None:
    front = _invoke(["front", "--study", "dash", "--storage", storage, "--json"])
    assert front.exit_code == 0, front.output
    data = json.loads(front.stdout)
    assert list(data["columns"]) == [c.key for c in PARETO_COLUMNS] + ["confirmed"]
    assert [row["number"] for row in data["rows"]] == [6, 13, 1, 8, 4, 0]
    assert all(set(row["text"]) == set(data["columns"]) for row in data["rows"])
    by_number = {row["number"]: row for row in data["rows"]}
    assert by_number[13]["text"]["accuracy"] == "0.760 [0.651-0.848]" and by_number[13]["prefill_ms"] == 30.0
    assert by_number[1]["confirmed"]["speedup"] == 2.27 and by_number[6]["confirmed"] is None
    assert by_number[6]["config"]["method"] == "dart" and by_number[0]["config"] is None
    studies = json.loads(_invoke(["studies", "--storage", storage, "--json"]).stdout)
    assert list(studies["columns"]) == [c.key for c in STUDIES_COLUMNS]
    assert sorted(row["text"]["study"] for row in studies["rows"]) == sorted(["dash", *ODD_NAMES])


def test_wide_has_every_column(storage: str) -> None:
    wide = _invoke(["front", "--study", "dash", "--storage", storage, "--wide"], columns=400)
    compact = _invoke(["front", "--study", "dash", "--storage", storage], columns=400)
    headers = [c.header for c in PARETO_COLUMNS] + ["confirmed (20 rounds, fresh subset)"]
    assert all(header in wide.output for header in headers), wide.output
    assert "not distinguishable from" not in compact.output and "options" not in compact.output
    assert "n_image_pivots=3 n_text_pivots=2" in wide.output  # trial 6's options
    studies = _invoke(["studies", "--storage", storage, "--wide"], columns=400)
    assert all(c.header in studies.output for c in STUDIES_COLUMNS), studies.output


@pytest.mark.parametrize(("args", "culprit"), [(["--study", "nope"], "no study 'nope'"),
                                               (["--storage", "sqlite:////nowhere/at/all.db"], "/nowhere/at/all.db")])
def test_front_of_an_unknown_study_or_storage_is_one_line(storage: str, args: list[str], culprit: str) -> None:
    result = _invoke(["front", "--study", "dash", "--storage", storage, *args])
    assert result.exit_code == 2 and culprit in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_user_text_that_looks_like_markup_prints_as_itself(storage: str, tmp_path: Path) -> None:
    """Study names '[/]' and '[red]x' list, show their front and export; an output path '[red]x.yaml' is named."""
    listed = _invoke(["studies", "--storage", storage], columns=200)
    assert listed.exit_code == 0, listed.output
    assert all(name in listed.output for name in ODD_NAMES)
    for name in ODD_NAMES:
        front = _invoke(["front", "--study", name, "--storage", storage])
        assert front.exit_code == 0 and f"Pareto front of {name} " in front.output, front.output
    out = tmp_path / "[red]x.yaml"
    exported = _invoke(["export", "--study", "[/]", "--storage", storage, "--trial", "3", "-o", str(out)], columns=400)
    assert exported.exit_code == 0, exported.output
    assert out.exists() and f"-> {out}" in exported.output
    missing = _invoke(["export", "--study", "[red]y", "--storage", storage, "--trial", "3"], columns=400)
    assert missing.exit_code == 2 and "no study '[red]y'" in missing.output


def test_bench_search_table_fits_80_columns_and_wide_has_every_column() -> None:
    """The replay table from real summaries of hand-made curves: compact at 80 columns, every column when wide."""
    curves = [Curve(sampler, seed, (1, 2, 3, 4), (10.0, 20.0, 30.0, 40.0), (0.2, 0.5, 0.9, 1.0 - 0.1 * seed))
              for sampler in ("grid", "tpe", "nsga2", "random") for seed in range(3)]
    summaries = [*summarise("plain", curves, 1.0, [1, 2, 4], [10.0, 20.0, 40.0]),
                 *summarise("fast", curves, 1.0, [1, 2, 4], [10.0, 20.0, 40.0])]
    sheet = hypervolume_sheet(summaries, [1, 2, 4], [10.0, 20.0, 40.0], n_points=4, seeds=3, reference=(0.7, 90.0))
    console = Console(width=80, record=True)
    console.print(sheet.table())
    _assert_fits_80(console.export_text())
    wide = Console(width=300, record=True)
    wide.print(sheet.table(wide=True))
    text = wide.export_text()
    assert all(column.header in text for column in sheet.columns), text
    assert len(sheet.as_json()["rows"][0]["text"]) == len(sheet.columns) == 11


def test_bench_pruning_fits_80_columns_and_json_goes_to_stdout() -> None:
    args = ["bench-pruning", "--repeats", "1", "--warmup", "0", "--hidden", "64", "--layers", "2", "--layer", "1",
            "--method", "window_fastv", "--budget", "128"]
    shown = _invoke(args)
    assert shown.exit_code == 0, shown.output
    _assert_fits_80(shown.output)
    assert "window_fastv 128" in " ".join(shown.output.split()) or "window_fastv" in shown.output
    machine = _invoke([*args, "--json", "-"])
    data = json.loads(machine.stdout)
    assert [row["name"] for row in data["rows"]] == ["no hooks", "keep_all", "window_fastv 128"]
    assert len(data["table"]["rows"][2]["text"]) == 9



def test_bench_read_fits_80_columns_times_optunas_load_first_and_json_goes_to_stdout() -> None:
    args = ["bench-read", "--trials", "6", "--repeats", "2", "--readers", "front,export"]
    shown = _invoke(args)
    assert shown.exit_code == 0, shown.output
    _assert_fits_80(shown.output)
    data = json.loads(_invoke([*args, "--json"]).stdout)
    assert [row["text"]["reader"] for row in data["rows"]] == ["optuna load", "front", "export"]
    assert data["rows"][0]["ratio"] == 1.0 and all(len(row["seconds"]) == 2 for row in data["rows"])
    unknown = _invoke(["bench-read", "--readers", "front,nope"])
    assert unknown.exit_code == 2 and "nope" in unknown.output and len(unknown.output.strip().splitlines()) == 1

# -- the commands that load a model: eval's table, tune's JSON, start-up failures ---------------------------------


def _broken_task(tmp_path: Path) -> Path:
    """A copy of the bundled task, named broken_shapes, whose doc_to_visual raises for every document."""
    folder = tmp_path / "tasks" / "broken_shapes"
    shutil.copytree(BUNDLED_TASK, folder)
    task_yaml = folder / "dart_shapes.yaml"
    (folder / "broken_shapes.yaml").write_text(task_yaml.read_text().replace("task: dart_shapes",
                                                                             "task: broken_shapes"))
    task_yaml.unlink()
    utils = folder / "utils.py"
    utils.write_text(utils.read_text().replace("    return [doc_image(doc)]",
                                               "    raise FileNotFoundError('image store /data/shapes is offline')"))
    return folder.parent


def _space(tmp_path: Path, model: Path, name: str = "space.yaml", **changes: object) -> Path:
    data = {"study": "s", "model": str(model), "tasks": ["dart_shapes"], "subset": {"size": 2, "seed": 0},
            "methods": ["random"], "layer": [1], "keep_ratio": [0.5], "dtype": "float32", "device": "cpu",
            "sampler": {"name": "random", "seed": 0}, "trials": 2, "latency": {"new_tokens": 2, "repeats": 1,
                                                                                "warmup": 0}, **changes}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_eval_table_fits_80_columns_and_json_goes_to_stdout(saved_dirs, tmp_path: Path) -> None:
    args = ["eval", "--model", str(saved_dirs["llava"]), "--task", "dart_shapes", "--limit", "2", "--method", "dart",
            "--method", "window_fastv", "--keep-ratio", "0.5", "--repeats", "1", "--warmup", "0",
            "--new-tokens", "2"]
    shown = _invoke(args)
    assert shown.exit_code == 0, shown.output
    _assert_fits_80(shown.output)
    machine = _invoke([*args, "--json", "-"])
    assert machine.exit_code == 0, machine.output
    data = json.loads(machine.stdout)
    assert [row["name"] for row in data["table"]["rows"]] == ["unpruned", "dart 0.5", "window_fastv 0.5"]
    assert len(data["table"]["rows"][0]["text"]) == len(data["table"]["columns"]) == 11
    assert len(data["rows"]) == 3 and data["rows"][1]["accuracy"]["samples"]


def test_tune_prints_a_markup_study_name_and_its_front_as_json(saved_dirs, tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 's.db'}"
    result = _invoke(["tune", "--space", str(_space(tmp_path, saved_dirs["llava"])), "--storage", storage,
                      "--study", "[/]", "--trials", "2", "--no-confirm", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["title"].startswith("Pareto front of [/] ") and data["rows"]
    assert "study '[/]' in" in result.stderr


def _one_line_failure(result, *words: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit | None)
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert all(word in result.output for word in words), result.output


def test_tune_start_up_failures_are_one_line(saved_dirs, tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 's.db'}"
    llava = saved_dirs["llava"]
    broken = _space(tmp_path, llava, "broken.yaml", tasks=["broken_shapes"],
                    include_paths=[str(_broken_task(tmp_path))])
    _one_line_failure(_invoke(["tune", "--space", str(broken), "--storage", storage], columns=400),
                      "task broken_shapes, doc 0", "FileNotFoundError: image store /data/shapes is offline")
    missing = _space(tmp_path, tmp_path / "no-model", "missing.yaml")
    _one_line_failure(_invoke(["tune", "--space", str(missing), "--storage", storage], columns=400), "no-model")
    (tmp_path / "bad.yaml").write_text("study: [unclosed\n")
    _one_line_failure(_invoke(["tune", "--space", str(tmp_path / "bad.yaml"), "--storage", storage], columns=400),
                      "bad.yaml", "not valid YAML")
    unreachable = "postgresql+psycopg://tuner@127.0.0.1:1/studies"  # nothing listens on port 1
    _one_line_failure(_invoke(["tune", "--space", str(_space(tmp_path, llava)), "--storage", unreachable],
                              columns=400), "127.0.0.1:1")
    _one_line_failure(_invoke(["confirm", "--space", str(_space(tmp_path, llava)), "--storage", unreachable],
                              columns=400), "127.0.0.1:1")
    _one_line_failure(_invoke(["confirm", "--space", str(tmp_path / "bad.yaml"), "--storage", storage], columns=400),
                      "bad.yaml", "not valid YAML")


def test_eval_start_up_failures_are_one_line(saved_dirs, tmp_path: Path) -> None:
    common = ["--limit", "2", "--method", "random", "--keep-ratio", "0.5", "--repeats", "1", "--warmup", "0",
              "--new-tokens", "2"]
    missing = _invoke(["eval", "--model", str(tmp_path / "no-model"), "--task", "dart_shapes", *common], columns=400)
    _one_line_failure(missing, "no-model")
    broken = _invoke(["eval", "--model", str(saved_dirs["llava"]), "--task", "broken_shapes", "--include-path",
                      str(_broken_task(tmp_path)), *common], columns=400)
    assert broken.exit_code == 1 and isinstance(broken.exception, SystemExit | None), broken.output
    assert "broken_shapes/0" in broken.output and "image store /data/shapes is offline" in broken.output
    assert len(broken.output.strip().splitlines()) == 1, broken.output
