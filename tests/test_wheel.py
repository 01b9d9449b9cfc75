"""The package installs whole: the search spaces ship (`--space NAME` from any folder, `dart-tuner spaces`), and a
built wheel, installed on its own, lists them, tunes the demo and serves the dashboard from an empty folder."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tuner.cli import app
from tuner.search.params import SpaceError
from tuner.search.space import load_space
from tuner.search.space_files import describe_space, packaged_folder, packaged_spaces

ROOT = Path(__file__).resolve().parent.parent
SOURCE_SPACES = ROOT / "search_spaces"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# what the wheel is built from (setup.py, pyproject.toml and what they name); copied so that no build/ folder is
# left in, or reused from, the checkout
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "tuner", "search_spaces")


def test_packaged_spaces_are_the_source_folder() -> None:
    """A checkout reads its own search_spaces/ (no copy elsewhere); every YAML there is offered by its stem."""
    assert packaged_folder() == SOURCE_SPACES
    assert sorted(packaged_spaces()) == sorted(p.stem for p in SOURCE_SPACES.glob("*.yaml"))
    model, description = describe_space(SOURCE_SPACES / "demo.yaml")
    assert model == "embedded:tiny-llava-shapes" and description.startswith("The embedded default: the tiny LLaVA")


@pytest.mark.parametrize("name", sorted(packaged_spaces()))
def test_packaged_spaces_reference_nothing_that_does_not_ship(name: str) -> None:
    """Only the YAML files ship (package-data `*.yaml`): a packaged space whose include_paths or model is a path
    relative to it would find nothing once installed. Its tasks are lmms-eval's or bundled in tuner.evaluation."""
    space = load_space(name)
    inside = [path for path in (*space.include_paths, space.model) if Path(path).is_relative_to(SOURCE_SPACES)]
    assert not inside, f"{name} needs {inside}: add them to the tuner.spaces package-data in pyproject.toml"


def test_a_space_by_name_from_any_folder_and_a_path_still_wins(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """'demo', 'demo.yaml' and the repository path 'search_spaces/demo.yaml' all mean the packaged demo from a
    folder without them; a file of that name in the folder is read instead."""
    monkeypatch.chdir(tmp_path)
    packaged = str(SOURCE_SPACES / "demo.yaml")
    for spec in ("demo", "demo.yaml", "search_spaces/demo.yaml", Path("demo")):
        assert load_space(spec).source == packaged, spec
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump({"study": "mine", "model": "m", "tasks": ["t"],
                                                        "methods": ["dart"], "layer": [2], "keep_ratio": [0.5]}))
    assert load_space("demo.yaml").study == "mine" and load_space("demo").study == "demo"


def test_an_unknown_space_is_one_line_listing_the_packaged_ones(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpaceError) as error:
        load_space("dmeo")
    message = str(error.value)
    assert "'dmeo': no such file, and no packaged space 'dmeo'" in message and "\n" not in message
    assert all(name in message for name in packaged_spaces())
    with pytest.raises(SpaceError, match="cannot read search space .*elsewhere.demo.yaml'"):
        load_space(tmp_path / "elsewhere" / "demo.yaml")  # a real path is never swapped for a packaged space
    result = CliRunner().invoke(app, ["tune", "--space", "dmeo", "--storage", f"sqlite:///{tmp_path}/x.db"])
    assert result.exit_code == 2 and "no packaged space 'dmeo'" in result.output and "Traceback" not in result.output


def test_spaces_command_lists_name_model_and_description() -> None:
    """Every packaged space with its model and first comment line; the compact table fits 80 columns."""
    result = CliRunner().invoke(app, ["spaces", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.output)["rows"]}
    assert set(rows) == set(packaged_spaces())
    assert rows["demo"]["model"] == "embedded:tiny-llava-shapes"
    assert rows["demo"]["description"].startswith("The embedded default")
    assert rows["gemma3"]["model"] == "google/gemma-3-4b-it" and rows["gemma3"]["path"].endswith("gemma3.yaml")
    table = CliRunner().invoke(app, ["spaces"], env={"COLUMNS": "80"})
    assert table.exit_code == 0 and max(len(line) for line in table.output.splitlines()) <= 80
    assert "bench_search" in table.output and "qwen3_vl_moe" in table.output


def _run(command: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


def _fetch(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.read().decode("utf-8", "replace")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from this checkout, installed (not editable, no dependencies) into a folder of its own."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    env = {**os.environ, **OFFLINE}
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(work / "dist"), str(source)], work, env, 600)
    wheels = list((work / "dist").glob("dart_tuner-*.whl"))
    assert len(wheels) == 1, wheels
    target = work / "target"
    _run([*pip, "install", "--no-deps", "--no-compile", "--target", str(target), str(wheels[0])], work, env, 300)
    return target


@pytest.mark.slow
def test_the_installed_wheel_lists_tunes_and_serves(installed: Path, tmp_path: Path) -> None:
    """From an empty folder, with only the installed wheel on the path (not this checkout): `spaces` lists the
    packaged spaces from the wheel, `tune --space demo` completes 2 trials, and `dashboard` serves that study."""
    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(installed), "COLUMNS": "200"}
    where = _run([sys.executable, "-c", "import tuner, tuner.search.space_files as f; "
                                        "print(tuner.__file__); print(f.packaged_folder())"], tmp_path, env, 120)
    module, folder = where.stdout.split()
    assert Path(module).is_relative_to(installed) and Path(folder) == installed / "tuner" / "spaces"
    assert sorted(p.stem for p in Path(folder).glob("*.yaml")) == sorted(packaged_spaces())  # all of them ship

    cli = [sys.executable, "-m", "tuner.cli"]
    listed = json.loads(_run([*cli, "spaces", "--json"], tmp_path, env, 120).stdout)["rows"]
    assert {row["name"] for row in listed} == set(packaged_spaces())
    assert all(Path(row["path"]).parent == Path(folder) for row in listed)

    storage = "sqlite:///x.db"  # relative: in the empty folder
    tuned = _run([*cli, "tune", "--space", "demo", "--trials", "2", "--limit", "2", "--no-confirm",
                  "--storage", storage], tmp_path, env, 900).stdout
    assert "2 complete trials in sqlite:///x.db, study 'demo'" in " ".join(tuned.split())

    port = _free_port()
    server = subprocess.Popen([*cli, "dashboard", "--storage", storage, "--port", str(port)], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, status = time.monotonic() + 180, None
        while status != 200 and time.monotonic() < deadline:
            assert server.poll() is None, f"the dashboard exited {server.returncode}:\n{server.stdout.read()}"
            try:
                status, page = _fetch(f"http://127.0.0.1:{port}/")
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(1)
        assert status == 200 and "<html" in page.lower()
        assert _fetch(f"http://127.0.0.1:{port}/_stcore/health") == (200, "ok")
    finally:
        server.terminate()  # the command stops its streamlit server on SIGTERM
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    # the installed app renders the study the installed CLI stored (the served page above is only its shell)
    rendered = _run([sys.executable, "-c", (
        "from streamlit.testing.v1 import AppTest; "
        f"at = AppTest.from_file({str(Path(folder).parent / 'dashboard' / 'app.py')!r}, default_timeout=120).run(); "
        "assert not at.exception, [e.value for e in at.exception]; "
        "print([s.value for s in at.subheader])")], tmp_path, {**env, "DART_TUNER_STORAGE": storage}, 300)
    assert "'Study demo'" in rendered.stdout
