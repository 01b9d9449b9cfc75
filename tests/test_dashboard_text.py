"""Stored text (provenance values, study names) is shown as text on the dashboard: markdown in it is never
rendered, so a study cannot make the viewer's browser load a remote image or follow a link."""

from __future__ import annotations

import re
from pathlib import Path

import dashboard_study
import optuna
import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from tuner import dashboard as dd  # noqa: E402

APP = Path(__file__).resolve().parent.parent / "tuner" / "dashboard" / "app.py"
IMAGE = "![x](http://example.com/a.png)"


def _rendered_markdown(at: AppTest) -> list[str]:
    """The markdown source of every element that renders markdown (markdown, captions, alerts, headings)."""
    kinds = ("markdown", "caption", "warning", "info", "error", "success", "subheader", "header", "title")
    return [str(element.value) for kind in kinds for element in at.get(kind)]


def test_markdown_in_provenance_and_names_is_shown_as_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'md.db'}"
    study = dashboard_study.build_study(url, "dash [link](http://example.com)")
    provenance = study.user_attrs["provenance"] | {"device": IMAGE, "model_id": f"m {IMAGE}"}
    optuna.load_study(study_name=study.study_name, storage=url).set_user_attr("provenance", provenance)
    monkeypatch.setenv(dd.STORAGE_ENV, url)
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not at.exception, [e.value for e in at.exception]
    shown = [str(v) for frame in at.dataframe for v in frame.value.to_numpy().ravel()]
    assert IMAGE in shown and f"m {IMAGE}" in shown  # the value itself, as text, in the provenance grid
    for source in _rendered_markdown(at):
        prose = re.sub(r"`[^`]*`", "", source)  # code spans (the CLI commands shown) render literally
        assert "](http" not in prose, source  # no markdown image or link left to render
    assert any(dd.markdown_text("dash [link](http://example.com)") in s for s in _rendered_markdown(at))
