"""Storage failures are told as they are: one warning per outage (not per storage call that meets it), a deleted
SQLite file is called gone (not read-only with its trials kept), and a full disk leaves no empty database file."""

from __future__ import annotations

import logging
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy.exc

from tuner.cli.common import storage_fail
from tuner.results import storage as storage_module
from tuner.results.storage import StorageError, describe, open_for_tuning


def _error(message: str) -> sqlalchemy.exc.OperationalError:
    return sqlalchemy.exc.OperationalError("INSERT INTO trials ...", {}, sqlite3.OperationalError(message))


def test_one_warning_per_outage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                caplog: pytest.LogCaptureFixture) -> None:
    """Three threads (trial, heartbeat, ...) meet each of two outages: two warnings, not six."""
    storage = open_for_tuning(f"sqlite:///{tmp_path / 'o.db'}", reconnect_s=30)
    real_sleep = time.sleep
    monkeypatch.setattr(storage_module.time, "sleep", lambda _: real_sleep(0.01))
    down = threading.Event()

    def query() -> str:  # what the database answers: an error while it is down
        if down.is_set():
            raise _error("database is locked")
        return "ok"

    with caplog.at_level(logging.WARNING, logger=storage_module.__name__):
        for _ in range(2):
            down.set()
            results: list[str] = []
            threads = [threading.Thread(target=lambda out=results: out.append(storage._retrying(query)))
                       for _ in range(3)]
            for thread in threads:
                thread.start()
            real_sleep(0.3)  # every thread has met the outage and is waiting it out
            down.clear()
            for thread in threads:
                thread.join(10)
            assert results == ["ok"] * 3
    warnings = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(warnings) == 2, warnings


def test_a_deleted_sqlite_file_is_called_gone(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "gone.db"
    url = f"sqlite:///{path}"
    open_for_tuning(url)
    error = _error("attempt to write a readonly database")
    assert "give a writable database" in describe(url, error)  # the file is there: it did turn read-only
    assert storage_fail(url, error).exit_code == 1 and "trials stored so far are kept" in capsys.readouterr().err
    path.unlink()
    line = describe(url, error)
    assert "is gone: deleted or moved while in use" in line and "give a writable database" not in line
    storage_fail(url, error)
    printed = " ".join(capsys.readouterr().err.split())
    assert "the file is gone, and the trials it held with it" in printed and "are kept" not in printed


def _tiny_tmpfs(where: Path) -> bool:
    where.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


def test_a_full_disk_leaves_no_empty_database(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    if not _tiny_tmpfs(disk):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        (disk / "fill").write_bytes(b"\0" * 1024 * 1024)  # the disk is full
        with pytest.raises(StorageError, match="disk is full"):
            open_for_tuning(f"sqlite:///{disk / 'new.db'}")
        assert not (disk / "new.db").exists()
        (disk / "fill").unlink()
        open_for_tuning(f"sqlite:///{disk / 'new.db'}")  # with room, the same URL works
        assert (disk / "new.db").stat().st_size > 0
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], capture_output=True)
