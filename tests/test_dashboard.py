"""The Streamlit dashboard under `streamlit.testing.v1.AppTest`, on small studies stored in SQLite: the deployer's
bounds move the recommendation exactly as `dart-tuner export` would, the downloaded preset is the CLI's file and
loads, the plots show what they promise, and unreadable or empty storages give a message, not a traceback."""

from __future__ import annotations

import ast
import base64
import inspect
import json
import shutil
import sqlite3
from pathlib import Path

import dashboard_study
import numpy as np
import optuna
import pytest
from typer.testing import CliRunner

from tuner import load_preset
from tuner.cli import app, dashboard_app_path
from tuner.config.schema import config_attrs
from tuner.evaluation.runner import EvalResult
from tuner.measure.latency import Timing, speedup_spread
from tuner.measure.trial import TrialMeasurer
from tuner.measure.workload import RECORD_FIELDS
from tuner.results import config_of
from tuner.results.export import Rule, choose_trial
from tuner.results.record import RECORD_SCHEMA_ATTR, TrialRecord
from tuner.results.storage import open_for_reading
from tuner.results.tables import noise_warning

pytest.importorskip("streamlit")
pytest.importorskip("plotly")

from streamlit.testing.v1 import AppTest  # noqa: E402

from tuner import dashboard as dd  # noqa: E402

APP = Path(__file__).resolve().parent.parent / "tuner" / "dashboard" / "app.py"


@pytest.fixture(scope="module")
def stored_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The study 'dash' (see dashboard_study) in a SQLite file, written once."""
    path = tmp_path_factory.mktemp("dashboard") / "dash.db"
    dashboard_study.build_study(f"sqlite:///{path}")
    return path


@pytest.fixture
def storage(stored_study: Path, tmp_path: Path) -> str:
    """A private copy of the stored study, so a test may add trials."""
    shutil.copy(stored_study, tmp_path / "dash.db")
    return f"sqlite:///{tmp_path / 'dash.db'}"


def _app(url: str, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    monkeypatch.setenv(dd.STORAGE_ENV, url)
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _recommended(at: AppTest) -> int | None:
    values = [m.value for m in at.metric if m.label == "Recommended trial"]
    return int(values[0].lstrip("#")) if values else None


def _chart(at: AppTest, key: str) -> dict:
    charts = [el for el in at.get("plotly_chart") if el.proto.id.endswith(f"-{key}")]
    assert len(charts) == 1, f"no single chart {key!r}"
    return json.loads(charts[0].proto.spec)


def _values(array: object) -> list:
    """Plotly's JSON: a plain list, or a typed array {'dtype', 'bdata'} (base64)."""
    if isinstance(array, dict) and "bdata" in array:
        return np.frombuffer(base64.b64decode(array["bdata"]), dtype=array["dtype"]).tolist()
    return list(array or [])


def _traces(spec: dict) -> dict[str, dict]:
    return {trace.get("name"): trace for trace in spec["data"]}


def _study(url: str) -> optuna.Study:
    return optuna.load_study(study_name="dash", storage=url)


# -- the fixture is what the Tuner stores ----------------------------------------------------------------------


def test_hand_built_trials_carry_the_tuners_attributes() -> None:
    """The test study's trial attributes are exactly the fields `TrialMeasurer.measure` sets on a completed, not
    stopped trial's record (checked on its source), and they read back through the record unchanged."""
    def keywords(method: object, callee: str) -> set[str]:
        tree = ast.parse(inspect.cleandoc("\n" + inspect.getsource(method)))
        call = next(node for node in ast.walk(tree)
                    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == callee)
        return {k.arg for k in call.keywords if k.arg is not None}
    stop_fields = {"stopped_early", "stop_reason", "accuracy_partial", "accuracy_upper_bound"}
    keys = keywords(TrialMeasurer.measure, "TrialRecord") - stop_fields - {"config"}
    keys |= keywords(TrialMeasurer._latency_fields, "dict")  # a trial that timed itself (none reused)
    keys |= set(EvalResult(config=None, accuracy=0.0, metrics={}).kept_vision_stats())
    keys |= set(speedup_spread(Timing((1.0,)), Timing((1.0,))).to_attrs())
    keys |= set(config_attrs(None)) | set(RECORD_FIELDS)
    keys |= {"latency_seconds"}  # what `TrialMeasurer._time` adds for fixed rounds (adaptive ones add their stop)
    attrs = dashboard_study.trial_attrs(None, 0.5, 10.0, 20.0)
    assert set(attrs) == keys
    record = TrialRecord.from_attrs(attrs)
    assert record.unknown == {}
    stored = {key: value for key, value in record.to_attrs().items() if key != RECORD_SCHEMA_ATTR}
    assert stored == {key: value for key, value in attrs.items() if value is not None or key == "config"}


# -- choosing a point ------------------------------------------------------------------------------------------


def test_default_bounds_are_the_studys_constraint(storage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The page opens on the study's own constraint (>= 90% of the baseline) and recommends what export picks."""
    at = _app(storage, monkeypatch)
    expected = choose_trial(_study(storage), Rule(min_relative_accuracy=0.9)).number
    assert _recommended(at) == expected == 6
    table = next(d.value for d in at.dataframe if "trial" in d.value.columns)  # after the provenance grids
    assert list(table["trial"]) == [6, 3, 1, 12, 8, 10, 4, 7]  # every feasible pruned trial
    spec = _chart(at, "pareto")
    lines = [s for s in spec["layout"].get("shapes", []) if s.get("y0") == s.get("y1")]
    assert [round(s["y0"], 6) for s in lines] == [0.72]
    assert _values(_traces(spec)["recommended: trial 6"]["x"]) == [28.0]
    assert "--min-relative-accuracy 0.9" in " ".join(c.value for c in at.caption)


@pytest.mark.parametrize(("widgets", "rule"), [
    ({"min_rel_pct": 95.0}, Rule(min_relative_accuracy=0.95)),
    ({"acc_mode": "absolute", "min_abs": 0.59}, Rule(min_accuracy=0.59)),
    ({"acc_mode": "none", "limit_latency": True, "max_ms": 40.0}, Rule(max_prefill_ms=40.0)),
    ({"min_rel_pct": 92.0, "limit_latency": True, "max_ms": 35.0}, Rule(min_relative_accuracy=0.92,
                                                                          max_prefill_ms=35.0)),
])
def test_widgets_move_the_recommendation_like_export(storage: str, monkeypatch: pytest.MonkeyPatch,
                                                      widgets: dict, rule: Rule) -> None:
    """Each bound a deployer sets picks the trial `dart-tuner export` picks with the same options."""
    at = _app(storage, monkeypatch)
    before = _recommended(at)
    for key, value in widgets.items():  # in order: a widget may only appear after the one before it
        getattr(at, {"min_rel_pct": "slider", "max_ms": "slider", "acc_mode": "radio", "min_abs": "number_input",
                     "limit_latency": "checkbox"}[key])(key=key).set_value(value).run()
        assert not at.exception, [e.value for e in at.exception]
    expected = choose_trial(_study(storage), rule).number
    assert _recommended(at) == expected != before
    spec = _chart(at, "pareto")
    shapes = spec["layout"].get("shapes", [])
    if rule.max_prefill_ms is not None:
        assert [s["x0"] for s in shapes if s.get("x0") == s.get("x1")] == [rule.max_prefill_ms]
    assert f"recommended: trial {expected}" in _traces(spec)


def test_no_qualifying_trial_names_the_closest(storage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An impossible bound shows export's explanation with the closest trials, not a recommendation."""
    at = _app(storage, monkeypatch)
    at.radio(key="acc_mode").set_value("absolute").run()
    at.number_input(key="min_abs").set_value(0.99).run()
    assert not at.exception
    assert _recommended(at) is None
    assert "Closest" in at.warning[0].value and "#4 " in at.warning[0].value


# -- export ----------------------------------------------------------------------------------------------------


def test_download_is_the_cli_export_and_loads(storage: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                              downloads: dict[str, bytes]) -> None:
    """The preset the button serves is byte for byte `dart-tuner export`'s file, and `load_preset` reads it."""
    at = _app(storage, monkeypatch)
    at.slider(key="min_rel_pct").set_value(95.0).run()
    assert _recommended(at) == 1
    served = downloads["dash-trial1.yaml"]
    out = tmp_path / "cli.yaml"
    result = CliRunner().invoke(app, ["export", "--storage", storage, "--study", "dash", "--min-relative-accuracy",
                                      "0.95", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert served == out.read_bytes()
    (tmp_path / "served.yaml").write_bytes(served)
    preset = load_preset(tmp_path / "served.yaml")
    study = _study(storage)
    assert preset.config == config_of(study.trials[1]) and preset.provenance["trial"] == 1
    assert at.code[0].value == served.decode().rstrip("\n")  # the preview shows the same file

    at.selectbox(key="export_trial").set_value(8).run()  # any other trial, by number
    preset_8 = downloads["dash-trial8.yaml"]
    (tmp_path / "t8.yaml").write_bytes(preset_8)
    assert load_preset(tmp_path / "t8.yaml").config == config_of(study.trials[8])


# -- plots -----------------------------------------------------------------------------------------------------


def test_pareto_plot_marks_baseline_infeasible_and_dominated(storage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Methods by colour, a baseline star, infeasible trials apart; hiding dominated / infeasible trials works."""
    at = _app(storage, monkeypatch)
    traces = _traces(_chart(at, "pareto"))
    assert {"dart", "random", "pooling", "fastv", "unpruned baseline", "infeasible (violates constraints)",
            "Pareto front (feasible)"} <= set(traces)
    assert traces["unpruned baseline"]["marker"]["symbol"] == "star"
    assert sorted(_values(traces["infeasible (violates constraints)"]["x"])) == [22.0, 38.0, 50.0]
    hover = " ".join(traces["dart"]["hovertext"])
    assert "pivot_order=reference" in hover and "kept vision tokens 16.0 of 64" in hover
    assert len(_values(traces["random"]["x"])) == 1  # trial 7 (feasible, dominated); trial 2 is infeasible

    at.toggle(key="show_dominated").set_value(False).run()
    traces = _traces(_chart(at, "pareto"))
    assert "random" not in traces and sorted(_values(traces["dart"]["customdata"])) == [1, 3, 6, 8]
    at.toggle(key="show_infeasible").set_value(False).run()
    assert "infeasible (violates constraints)" not in _traces(_chart(at, "pareto"))

    at.radio(key="cost_axis").set_value("kept_vision_mean").run()
    assert _chart(at, "cost")["layout"]["xaxis"]["title"]["text"] == dd.X_AXES["kept_vision_mean"]


@pytest.mark.parametrize("legacy", [False, True], ids=["current", "schema-1 study"])
def test_progress_importance_and_parameter_plots(storage: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 legacy: bool) -> None:
    """Hypervolume per trial, importance for both objectives, and objectives against each parameter render; one
    method's trials add its options, named '<method>.<option>' whether the study stored them so (current) or as
    schema 1 did (pivots at the top level of the config, parameters named `n_image_pivots`)."""
    if legacy:
        storage = f"sqlite:///{tmp_path / 'legacy.db'}"
        dashboard_study.build_study(storage, legacy=True)
    at = _app(storage, monkeypatch)
    hypervolume = _chart(at, "hypervolume")
    values = _values(hypervolume["data"][0]["y"])
    assert len(values) == 12 and values == sorted(values) and values[-1] > values[0]  # the failed trial is skipped
    importance = _traces(_chart(at, "importance"))
    assert set(importance) == {"accuracy", "prefill (ms)"}
    assert set(importance["accuracy"]["y"]) == {"method", "layer", "keep_ratio"}
    at.selectbox(key="importance_method").set_value("dart").run()
    importance = _traces(_chart(at, "importance"))
    pivots = {"n_image_pivots", "n_text_pivots"} if legacy else {"dart.n_image_pivots", "dart.n_text_pivots"}
    assert set(importance["accuracy"]["y"]) == {"layer", "keep_ratio"} | pivots  # the study's own parameter names
    parameters = _chart(at, "parameters")
    titles = [a["text"] for a in parameters["layout"]["annotations"]]
    assert titles == ["keep ratio", "K (pruning layer)", "dart: n image pivots", "dart: n text pivots"]
    image_pivots = [t for t in parameters["data"] if t.get("name") == "dart" and t.get("xaxis") == "x3"]
    assert sorted(_values(image_pivots[0]["x"])) == [2, 3, 4, 4, 6]  # from the configurations, old or new


def test_compare_studies_on_one_plot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Studies of the same model on another GPU are compared by default, relative to each one's baseline."""
    url = f"sqlite:///{tmp_path / 'two.db'}"
    dashboard_study.build_study(url)
    faster = {n: (*row[:5], row[5] - 0.02, row[6]) for n, row in dashboard_study.TRIALS.items()}
    dashboard_study.build_study(url, "dash_h100", device="NVIDIA H100 80GB HBM3", scale_ms=0.1, trials=faster)
    at = _app(url, monkeypatch)
    names = [t.get("name") for t in _chart(at, "compare_chart")["data"] if t.get("showlegend", True)]
    assert names == ["dash (dart_shapes, cpu)", "dash_h100 (dart_shapes, NVIDIA H100 80GB HBM3)"]
    at.toggle(key="compare_relative").set_value(False).run()
    assert _chart(at, "compare_chart")["layout"]["xaxis"]["title"]["text"] == dd.X_AXES["prefill_ms"]
    at.selectbox(key="study").set_value("dash_h100").run()  # the other study, with its own bounds
    assert not at.exception and _recommended(at) is not None


def test_refresh_shows_new_trials(storage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A trial finished by a running worker appears on refresh (and can become the recommendation)."""
    at = _app(storage, monkeypatch)
    assert _recommended(at) == 6
    worker = _study(storage)  # another process's view of the study
    worker.add_trial(dashboard_study.pruned_trial("dart", 2, 0.07, 2, 2, accuracy=0.75, ms=20.0))
    at.button(key="refresh").click().run()
    assert _recommended(at) == 13


def test_a_noisy_recommendation_carries_exports_warning(storage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A recommended trial whose speed-up is within its latency spread gets export's warning on the page; the clean
    recommendation before it got none."""
    at = _app(storage, monkeypatch)
    assert dd.recommend(_study(storage), min_relative_accuracy=0.9).latency_warning == ""
    assert not [w for w in at.warning if "latency" in w.value]
    noisy = dashboard_study.pruned_trial("dart", 2, 0.07, 2, 2, accuracy=0.75, ms=20.0)
    noisy.user_attrs = {**noisy.user_attrs, "speedup_low": 0.8, "speedup_high": 7.0, "latency_noisy": True,
                        "latency_warning": "the candidate's prefill IQR (15.0 ms) is 75% of its median (20.0 ms)"}
    _study(storage).add_trial(noisy)
    at.button(key="refresh").click().run()
    recommendation = dd.recommend(_study(storage), min_relative_accuracy=0.9)
    assert _recommended(at) == recommendation.trial.number == 13
    assert recommendation.latency_warning == noise_warning(recommendation.trial, _study(storage))
    assert "not distinguishable from the latency spread: the candidate's prefill IQR" in recommendation.latency_warning
    assert [w.value for w in at.warning] == [recommendation.latency_warning + "."]


# -- storages the dashboard cannot use -------------------------------------------------------------------------


def _not_optuna(tmp_path: Path) -> str:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as connection:
        connection.execute("create table notes (text)")
    return f"sqlite:///{path}"


@pytest.mark.parametrize(("make_url", "message"), [
    (lambda tmp: "not a url", "is not a SQLAlchemy database URL"),
    (lambda tmp: f"sqlite:///{tmp / 'missing.db'}", "no SQLite file"),
    (lambda tmp: "sqlite://", "in-memory"),
    (_not_optuna, "not an Optuna storage"),
    (lambda tmp: "postgresql+psycopg://nobody@127.0.0.1:1/none", "cannot read Optuna storage"),
])
def test_unusable_storage_is_a_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_url, message: str
                                       ) -> None:  # noqa: ANN001
    """A bad URL, a missing file, another database or an unreachable server: one clear error, no traceback."""
    monkeypatch.setenv(dd.STORAGE_ENV, make_url(tmp_path))
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.error) == 1 and message in at.error[0].value
    assert not at.get("plotly_chart")


def test_storage_can_be_changed_in_the_app(storage: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Typing a wrong URL into the sidebar shows the problem; typing the right one brings the study back."""
    at = _app(storage, monkeypatch)
    at.text_input(key="storage").set_value(f"sqlite:///{tmp_path / 'typo.db'}").run()
    assert not at.exception and "no SQLite file" in at.error[0].value
    at.text_input(key="storage").set_value(storage).run()
    assert not at.exception and not at.error and _recommended(at) == 6


def test_empty_storage_and_study_without_trials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An Optuna storage with no study says how to start one; a study with no complete trial says so."""
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    optuna.storages.RDBStorage(url)  # creates the tables, no study
    monkeypatch.setenv(dd.STORAGE_ENV, url)
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not at.exception and "No dart-tuner study" in at.info[0].value and "dart-tuner tune" in at.info[0].value
    dashboard_study.build_study(url, "fresh", trials={}, with_baseline=False)
    at.button(key="refresh_empty").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("No complete trial yet" in i.value for i in at.info)
    assert any("not measured yet" in d.value.to_string() for d in at.dataframe)  # the provenance grid


def test_single_objective_studies_are_not_offered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another tool's study in the same storage is left out of the picker instead of breaking the page."""
    url = f"sqlite:///{tmp_path / 'mixed.db'}"
    optuna.create_study(storage=url, study_name="someone_elses").add_trial(optuna.trial.create_trial(value=1.0))
    monkeypatch.setenv(dd.STORAGE_ENV, url)
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not at.exception and "No dart-tuner study" in at.info[0].value
    with pytest.raises(dd.StorageError, match="not made by dart-tuner"):
        dd.load_study(open_for_reading(url), "someone_elses")


# -- starting it -----------------------------------------------------------------------------------------------


def test_storage_url_from_argv_then_environment() -> None:
    """`-- --storage URL` wins over $DART_TUNER_STORAGE, which wins over the default; other flags are ignored."""
    assert dd.storage_from_argv(["--storage", "sqlite:///a.db"], {dd.STORAGE_ENV: "sqlite:///b.db"}) \
        == "sqlite:///a.db"
    assert dd.storage_from_argv(["-q", "--st", "x"], {dd.STORAGE_ENV: "sqlite:///b.db"}) == "sqlite:///b.db"
    assert dd.storage_from_argv([], {}) == "sqlite:///dart_tuner.db"


def test_dashboard_command(storage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`dart-tuner dashboard` checks the storage first, then serves dashboard/app.py headless on the address."""
    result = CliRunner().invoke(app, ["dashboard", "--storage", "sqlite:///surely/missing.db"])
    assert result.exit_code == 2 and "no SQLite file" in result.output

    started: list[list[str]] = []

    class FakeServer:
        def __init__(self, command: list[str]) -> None:
            started.append(command)

        def wait(self) -> int:
            return 0

    monkeypatch.setattr("subprocess.Popen", FakeServer)
    result = CliRunner().invoke(app, ["dashboard", "--storage", storage, "--port", "8765", "--address", "0.0.0.0"])
    assert result.exit_code == 0, result.output
    command = started[0]
    assert command[1:4] == ["-m", "streamlit", "run"] and command[4] == str(dashboard_app_path()) == str(APP)
    assert command[-3:] == ["--", "--storage", storage]
    flags = dict(zip(command[5:-3:2], command[6:-3:2]))
    assert flags == {"--server.headless": "true", "--server.port": "8765", "--server.address": "0.0.0.0",
                     "--browser.gatherUsageStats": "false", "--client.toolbarMode": "viewer"}
