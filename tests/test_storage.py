"""Storages: every URL that cannot be used is one line naming it, readers never create a database, and a worker
waits out a database that goes away for a while (injected connection failures here; a real PostgreSQL restart
where CI provides a server)."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import sqlalchemy.exc
import yaml
from optuna.trial import TrialState
from sqlalchemy import event
from typer.testing import CliRunner

from tuner.cli import app
from tuner.results.storage import (
    StorageError,
    describe,
    is_transient,
    open_for_reading,
    open_for_tuning,
    storage_failure,
)

DART_TUNER = str(Path(sys.executable).parent / "dart-tuner")
optuna.logging.set_verbosity(optuna.logging.WARNING)


def _space(tmp_path: Path, model: Path, **changes: object) -> Path:
    data = {"study": "st", "model": str(model), "tasks": ["dart_shapes"], "subset": {"size": 6, "seed": 0},
            "methods": ["random", "pooling"], "layer": [1, 2], "keep_ratio": {"low": 0.2, "high": 0.6},
            "attn_implementation": "sdpa", "dtype": "float32", "device": "cpu", "batch_size": 3,
            "sampler": {"name": "random", "seed": 0}, "latency": {"new_tokens": 2, "repeats": 1, "warmup": 0},
            **changes}
    path = tmp_path / "st.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _read_only_sqlite(tmp_path: Path) -> str:
    """A real Optuna storage that SQLite opens read-only (root ignores file modes, so use SQLite's own mode)."""
    path = tmp_path / "ro.db"
    optuna.create_study(storage=f"sqlite:///{path}", study_name="other")
    return f"sqlite:///file:{path}?mode=ro&uri=true"


BAD_WRITER_URLS = [
    (lambda tmp: "notadb://x", "unknown database scheme 'notadb'"),
    (lambda tmp: "not a url", "is not a SQLAlchemy database URL"),
    (lambda tmp: "mysql://u@127.0.0.1:1/x", "the database driver is not installed"),
    (lambda tmp: f"sqlite:///{tmp / 'no' / 'such' / 'dir' / 'a.db'}", "for the SQLite file; create it first"),
    (lambda tmp: "sqlite://", "in-memory SQLite database"),
    (lambda tmp: "postgresql+psycopg://nobody@127.0.0.1:1/none", "Connection refused"),
    (_read_only_sqlite, "attempt to write a readonly database"),
]


@pytest.mark.parametrize(("make_url", "words"), BAD_WRITER_URLS)
def test_tune_on_an_unusable_storage_is_one_line(saved_dirs, tmp_path, make_url, words) -> None:
    """Unknown scheme, bad URL, missing driver or folder, memory, unreachable server, read-only file: exit 2 with
    one line naming the URL."""
    url = make_url(tmp_path)
    result = CliRunner().invoke(app, ["tune", "--space", str(_space(tmp_path, saved_dirs["llava"])),
                                      "--storage", url, "--trials", "1"])
    assert result.exit_code == 2, result.output
    assert words in result.output and repr(url) in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) <= 3  # one wrapped line


@pytest.mark.parametrize("command", [["studies"], ["export", "--study", "st", "--trial", "0"]])
def test_readers_never_create_a_database(tmp_path, command) -> None:
    """A mistyped SQLite path is an error for `studies` and `export`, not a new empty database."""
    path = tmp_path / "mistyped.db"
    result = CliRunner().invoke(app, [*command, "--storage", f"sqlite:///{path}"])
    assert result.exit_code == 2 and "no SQLite file" in result.output, result.output
    assert not path.exists()
    with pytest.raises(StorageError, match="no SQLite file"):
        open_for_reading(f"sqlite:///{path}")
    assert not path.exists()


def test_transient_and_permanent_errors_are_told_apart() -> None:
    def operational(message: str) -> sqlalchemy.exc.OperationalError:
        return sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception(message))

    assert is_transient(operational("connection failed: Connection refused"))
    assert is_transient(operational("server closed the connection unexpectedly"))
    assert is_transient(operational("database is locked"))
    wrapped = optuna.exceptions.StorageInternalError("commit failed")
    wrapped.__cause__ = operational("terminating connection due to administrator command")
    assert is_transient(wrapped)
    assert not is_transient(operational("attempt to write a readonly database"))
    assert not is_transient(operational('password authentication failed for user "x"'))
    assert not is_transient(sqlalchemy.exc.IntegrityError("INSERT", {}, Exception("UNIQUE constraint failed")))
    assert not is_transient(ValueError("not a storage error"))


def test_the_storage_error_is_found_under_optuna_s_own(tmp_path) -> None:
    """Optuna can raise an UnboundLocalError of its own while a storage error is handled; the CLI must still find
    the storage error and say it in one line."""
    try:
        try:
            raise StorageError("gave up after 60 s on Optuna storage 'x': OperationalError: refused")
        except StorageError:
            raise UnboundLocalError("cannot access local variable 'updated_state'") from None
    except UnboundLocalError as masked:
        found = storage_failure(masked.__context__ or masked)
    assert isinstance(found, StorageError)
    assert storage_failure(RuntimeError("a bug")) is None
    assert describe("sqlite:///x.db", sqlalchemy.exc.OperationalError("", {}, Exception("no such table: studies"))
                    ).endswith("(the file is not an Optuna storage: it has no Optuna tables)")


def _refuse_connections(storage, times: int | None) -> list[float]:
    """Make the next `times` (None: all) new connections of the storage's engine fail as a down server's would."""
    attempts: list[float] = []

    def refuse(dialect, conn_rec, cargs, cparams):  # noqa: ANN001
        attempts.append(time.monotonic())
        if times is None or len(attempts) <= times:
            raise sqlalchemy.exc.OperationalError("connect", {}, Exception("Connection refused (injected)"))

    event.listen(storage.engine, "do_connect", refuse)
    storage.engine.dispose()  # drop pooled connections: the next call must connect
    return attempts


def test_a_worker_waits_out_a_database_that_comes_back(tmp_path) -> None:
    storage = open_for_tuning(f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=1, reconnect_s=30)
    study = optuna.create_study(storage=storage, study_name="s", directions=["maximize", "minimize"])
    attempts = _refuse_connections(storage, times=3)
    trial = study.ask()  # creates a trial: retried through three refused connections
    study.tell(trial, [0.5, 1.0])
    assert len(attempts) == 4 and attempts[-1] - attempts[0] >= 0.5 + 1.0 + 2.0 - 0.1  # exponential back-off
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE]


def test_a_worker_gives_up_with_one_line_when_the_database_stays_away(tmp_path) -> None:
    """It waits the whole reconnect time (the last try at the deadline, not one back-off step before it) and says
    how long it actually waited, never more."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    storage = open_for_tuning(url, heartbeat_interval=1, reconnect_s=2.5)  # back-off 0.5, 1, 2: the last is cut
    optuna.create_study(storage=storage, study_name="s")
    attempts = _refuse_connections(storage, times=None)
    started = time.monotonic()
    with pytest.raises(StorageError, match=r"gave up after [\d.]+ s on Optuna storage .*Connection refused \(injected\)"
                       ) as raised:
        storage.get_all_studies()
    elapsed = time.monotonic() - started
    waited = float(re.search(r"gave up after ([\d.]+) s", str(raised.value)).group(1))
    assert 2.5 <= waited <= elapsed + 0.01 and elapsed < 5
    assert attempts[-1] - attempts[0] >= 2.5 - 0.05  # tried once more at the deadline


def test_a_permanent_error_is_not_retried(tmp_path) -> None:
    storage = open_for_tuning(_read_only_sqlite(tmp_path), reconnect_s=30)
    started = time.monotonic()
    with pytest.raises(optuna.exceptions.StorageInternalError) as raised:
        storage.create_new_study(directions=[optuna.study.StudyDirection.MINIMIZE], study_name="new")
    assert time.monotonic() - started < 2 and "readonly" in str(storage_failure(raised.value).__cause__)


# -- a real PostgreSQL restart (CI) ----------------------------------------------------------------------------


def _postgres_control() -> tuple[str, str, str]:
    """(URL, stop command, start command) of the throwaway server `.ci/run` starts; skip without one."""
    names = ("DART_TUNER_TEST_POSTGRES", "DART_TUNER_TEST_PG_STOP", "DART_TUNER_TEST_PG_START")
    values = [os.environ.get(name) for name in names]
    if not all(values):
        if os.environ.get("DART_TUNER_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"DART_TUNER_REQUIRE_POSTGRES=1 but {', '.join(names)} are not all set")
        pytest.skip("needs the PostgreSQL server that .ci/run starts (and the commands to stop and start it)")
    return values[0], values[1], values[2]


def _running_trial(url: str, study: str, deadline: float, at_least: int = 0) -> int:
    while time.monotonic() < deadline:
        try:
            running = optuna.load_study(study_name=study, storage=url).get_trials(states=(TrialState.RUNNING,))
        except KeyError:  # not created yet
            running = []
        if running and running[0].number >= at_least:
            return running[0].number
        time.sleep(0.1)
    raise AssertionError("no trial started within the deadline")


def test_a_worker_survives_a_postgresql_restart_mid_study(saved_dirs, tmp_path) -> None:
    """The server stops for 6 s during a trial and comes back: the worker waits, finishes every trial, leaves none
    running or failed, and says it waited."""
    url, stop, start = _postgres_control()
    study = f"restart-{uuid.uuid4().hex[:8]}"
    space = _space(tmp_path, saved_dirs["llava"], subset={"size": 12, "seed": 0}, batch_size=1,
                   latency={"new_tokens": 2, "repeats": 5, "warmup": 0})
    command = [DART_TUNER, "tune", "--space", str(space), "--storage", url, "--study", study, "--trials", "4",
               "--heartbeat-interval", "1"]  # heartbeats reach for the database while it is down
    worker = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        _running_trial(url, study, time.monotonic() + 120, at_least=1)
        subprocess.run(shlex.split(stop), check=True, capture_output=True)
        time.sleep(6)
        subprocess.run(shlex.split(start), check=True, capture_output=True)
        output = worker.communicate(timeout=300)[0]
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGKILL)
            worker.wait()
    assert worker.returncode == 0, output
    assert "retrying for up to" in output
    trials = optuna.load_study(study_name=study, storage=url).get_trials()
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 4
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.FAIL)]
