"""A Ctrl-C that lands inside a storage statement: held until the statement's call ends, so no SQLite lock is left
behind for the worker's next write (it used to wait out the 60 s lock timeout, fail, and lose the Ctrl-C)."""

from __future__ import annotations

import signal
import time
import warnings

import optuna
import pytest
from sqlalchemy import event

from tuner.results.interrupts import sigint_deferred
from tuner.results.storage import open_for_tuning

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_a_held_ctrl_c_is_raised_when_the_block_ends() -> None:
    reached = []
    with pytest.raises(KeyboardInterrupt), sigint_deferred():
        signal.raise_signal(signal.SIGINT)
        reached.append("after the signal")
    assert reached == ["after the signal"]


def test_a_held_ctrl_c_wins_over_the_blocks_own_error() -> None:
    with pytest.raises(KeyboardInterrupt) as raised, sigint_deferred():
        signal.raise_signal(signal.SIGINT)
        raise ValueError("the call failed too")
    assert isinstance(raised.value.__context__, ValueError)


def test_a_second_ctrl_c_interrupts_at_once() -> None:
    reached = []
    with pytest.raises(KeyboardInterrupt), sigint_deferred():
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
        reached.append("after both")
    assert reached == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("statement", ["SELECT", "INSERT"])
def test_ctrl_c_mid_statement_leaves_the_database_writable(tmp_path, statement) -> None:
    storage = open_for_tuning(f"sqlite:///{tmp_path / 'i.db'}", reconnect_s=2)
    study = optuna.create_study(study_name="s", storage=storage, directions=["maximize", "minimize"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # heartbeat outside optimize
        trial = study.ask()
    armed = [True]

    @event.listens_for(storage.engine, "after_cursor_execute")
    def interrupt(conn, cursor, sql, *args) -> None:  # noqa: ANN001
        if armed and sql.lstrip().upper().startswith(statement):
            armed.clear()
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        trial.suggest_float("x", 0.0, 1.0)
    assert not armed, "the statement never ran"
    started = time.monotonic()
    trial.set_user_attr("failure", "interrupted")  # what the tuner writes next
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    assert time.monotonic() - started < 1.5
    assert study.trials[0].user_attrs["failure"] == "interrupted"
