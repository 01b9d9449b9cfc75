"""The dashboard's "Runs on" filter under `streamlit.testing.v1.AppTest`: on a Qwen2-VL study with pruning and
processor-only points, choosing vllm hides every point vLLM does not run from the front, recommends what
`export --target vllm` exports (the nearest portable trial, with its refusal line) and serves that same file."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import dashboard_study
import numpy as np
import optuna
import pytest
from optuna.distributions import IntDistribution
from typer.testing import CliRunner

from tuner import PruningConfig
from tuner.cli import app
from tuner.results.ports import TARGET_ATTR

pytest.importorskip("streamlit")
pytest.importorskip("plotly")

from streamlit.testing.v1 import AppTest  # noqa: E402

from tuner import dashboard as dd  # noqa: E402

APP = Path(__file__).resolve().parent.parent / "tuner" / "dashboard" / "app.py"
# Trials 13 and 14: processor-only points (keep_all at a pixel budget), (accuracy, prefill ms).
PROCESSOR_POINTS = {13: (200704, 0.765, 55.0), 14: (100352, 0.73, 40.0)}


@pytest.fixture
def storage(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'dash.db'}"
    study = dashboard_study.build_study(url)
    study.set_user_attr("provenance", {**study.user_attrs["provenance"], "family": "qwen2_vl",
                                       "model_id": "Qwen/Qwen2-VL-2B-Instruct"})
    for pixels, accuracy, ms in PROCESSOR_POINTS.values():
        config = PruningConfig(method="keep_all", processor={"max_pixels": pixels})
        attrs = {**dashboard_study.trial_attrs(None, accuracy, ms, 100.0), "config": config.to_dict()}
        study.add_trial(optuna.trial.create_trial(
            values=[accuracy, ms], params={"processor.max_pixels": pixels},
            distributions={"processor.max_pixels": IntDistribution(50176, 401408)},
            user_attrs=attrs, constraints={"min_relative_accuracy": dashboard_study.FLOOR - accuracy}))
    assert [t.number for t in study.trials][-2:] == list(PROCESSOR_POINTS)
    return url


def _app(url: str, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    monkeypatch.setenv(dd.STORAGE_ENV, url)
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _front_numbers(at: AppTest) -> dict[str, list[int]]:
    """Trial numbers per trace of the Pareto chart."""
    chart = next(el for el in at.get("plotly_chart") if el.proto.id.endswith("-pareto"))
    traces = json.loads(chart.proto.spec)["data"]
    return {t.get("name"): [int(n) for n in _values(t.get("customdata"))] for t in traces}


def _values(array: object) -> list:
    """Plotly's JSON: a plain list, or a typed array {'dtype', 'bdata'} (base64)."""
    if isinstance(array, dict) and "bdata" in array:
        return np.frombuffer(base64.b64decode(array["bdata"]), dtype=array["dtype"]).tolist()
    return [v[0] if isinstance(v, list) else v for v in array or []]


def _recommended(at: AppTest) -> int | None:
    values = [m.value for m in at.metric if m.label == "Recommended trial"]
    return int(values[0].lstrip("#")) if values else None


def test_vllm_hides_the_points_it_does_not_run(storage: str, monkeypatch: pytest.MonkeyPatch,
                                               downloads: dict[str, bytes], tmp_path: Path) -> None:
    at = _app(storage, monkeypatch)
    assert at.selectbox(key="target_dash").value == "all"
    everything = _front_numbers(at)
    assert "dart" in everything and "keep_all" in everything
    assert _recommended(at) == 6  # the fastest at >= 90% of the baseline: DART at 28 ms

    at.selectbox(key="target_dash").set_value("vllm").run()
    assert not at.exception, [e.value for e in at.exception]
    shown = _front_numbers(at)
    pruned = {name for name in shown if name in dashboard_study.METHODS}
    assert not pruned, shown  # no pruning method runs on vLLM
    assert sorted(n for numbers in shown.values() for n in numbers if n in PROCESSOR_POINTS) == [13, 14]
    assert any("trial(s) hidden: they do not run on vllm" in c.value for c in at.caption)
    assert _recommended(at) == 14  # what the same rule picks among the portable trials
    assert any("trial 6 does not run on vllm: in-LM pruning" in c.value for c in at.caption)

    out = tmp_path / "cli.yaml"
    result = CliRunner().invoke(app, ["export", "--storage", storage, "--study", "dash", "--trial", "14",
                                      "--target", "vllm", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert downloads["dash-trial14.yaml"] == out.read_bytes()  # the button serves export --target's file


def test_a_study_tuned_for_a_target_opens_on_it(storage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    optuna.load_study(study_name="dash", storage=storage).set_user_attr(TARGET_ATTR, "sglang")
    at = _app(storage, monkeypatch)
    assert at.selectbox(key="target_dash").value == "sglang"
    assert not {name for name in _front_numbers(at) if name in dashboard_study.METHODS}
