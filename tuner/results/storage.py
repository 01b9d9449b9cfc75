"""Where studies live: the one recipe for opening an Optuna RDB storage, for tuning workers and for readers.

- `open_for_tuning` (workers): heartbeats, a stale trial failed with its reason and queued again, and a database
  that goes away for a while (a PostgreSQL restart, a locked SQLite file) waited out with back-off instead of
  killing the worker.
- `open_for_reading` (`studies`, `export`, the dashboard): never creates a database file or tables.
- Whatever cannot be opened or reached is a `StorageError` whose one-line message names the URL and the cause.

Torch-free and evaluation-free: reading a study needs none of that.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import optuna
import sqlalchemy
import sqlalchemy.exc
from optuna.distributions import BaseDistribution, json_to_distribution
from optuna.exceptions import StorageInternalError, UpdateFinishedTrialError
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._rdb.models import TrialModel, TrialParamModel
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url

from tuner.errors import DartTunerError
from tuner.results.interrupts import sigint_deferred
from tuner.results.record import FAILURE_ATTR, FAILURE_TYPE_ATTR

logger = logging.getLogger(__name__)

DEFAULT_STORAGE = "sqlite:///dart_tuner.db"
SQLITE_LOCK_TIMEOUT_S = 60  # how long a SQLite writer waits for another worker's lock
RECONNECT_S = 60.0  # how long a worker waits out an unreachable database before giving up
RECONNECT_ENV = "DART_TUNER_RECONNECT_S"  # overrides RECONNECT_S for every worker (seconds)
HEARTBEAT_FAILURE = "worker stopped sending heartbeats (killed, or lost its machine); queued again"
_EXAMPLE = "e.g. sqlite:///dart_tuner.db or postgresql+psycopg://user@host/db"
# Messages of OperationalError that waiting will not cure.
_PERMANENT = ("readonly", "read-only", "unable to open database file", "no such table", "authentication failed",
              "does not exist", "permission denied", "disk i/o error", "database disk image is malformed")
_T = TypeVar("_T")


class StorageError(DartTunerError, ValueError):
    """A storage that cannot be opened, read or written; the one-line message names the URL and the cause."""


class StorageGaveUp(StorageError):
    """A worker waited out an unreachable database for its whole reconnect time, and it did not come back."""


def gave_up(error: BaseException) -> StorageGaveUp | None:
    """The StorageGaveUp somewhere in `error`'s chain (explicit or implicit), if any."""
    return _in_chain(error, StorageGaveUp)


def _in_chain(error: BaseException, kinds: type | tuple[type, ...]) -> Any:
    """The first exception of type `kinds` in `error`'s chain, following causes and then contexts; None if none."""
    seen = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, kinds):
            return current
        current = current.__cause__ or current.__context__
    return None


def reconnect_seconds() -> float:
    """How long a worker waits out an unreachable database: $DART_TUNER_RECONNECT_S, else 60 s."""
    text = os.environ.get(RECONNECT_ENV, "").strip()
    if not text:
        return RECONNECT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise StorageError(f"${RECONNECT_ENV} must be a positive number of seconds, got {text!r}")
    return seconds


# -- URLs and messages ----------------------------------------------------------------------------------------


def check_url(url: str, *, writing: bool) -> None:
    """Parse and check a storage URL before touching it: scheme, driver, and for SQLite the file or its folder.

    Readers need an existing file (a mistyped path must not become a new empty database); writers need a folder
    that exists and a file they may write.
    """
    url = (url or "").strip()
    if not url:
        raise StorageError(f"give a storage URL ({_EXAMPLE})")
    try:
        parsed = make_url(url)
        dialect = parsed.get_dialect()
    except sqlalchemy.exc.NoSuchModuleError:  # a subclass of ArgumentError
        raise StorageError(f"storage {url!r}: unknown database scheme {parsed.drivername!r} ({_EXAMPLE})") from None
    except sqlalchemy.exc.ArgumentError:
        raise StorageError(f"{url!r} is not a SQLAlchemy database URL ({_EXAMPLE})") from None
    try:
        dialect.import_dbapi()
    except ImportError as error:
        raise StorageError(f"storage {url!r}: the database driver is not installed ({error}); for PostgreSQL use "
                           "postgresql+psycopg://... with pip install 'dart-tuner[postgres]'") from None
    if parsed.get_backend_name() == "sqlite":
        _check_sqlite_file(url, _sqlite_database(parsed), writing=writing)


def _sqlite_database(parsed: sqlalchemy.engine.URL) -> str | None:
    """The file name of a parsed SQLite URL, also of a URI one (sqlite:///file:x.db?mode=ro&uri=true)."""
    database = parsed.database
    if database and parsed.query.get("uri") == "true" and database.startswith("file:"):
        database = database.removeprefix("file:").partition("?")[0]
    return database


def _check_sqlite_file(url: str, database: str | None, *, writing: bool) -> None:
    if not database or database == ":memory:":
        raise StorageError(f"{url!r} is an in-memory SQLite database, which keeps no study; give a file "
                           "(sqlite:///path/to/dart_tuner.db)")
    path = Path(database)
    if not writing:
        if not path.is_file():
            raise StorageError(f"no SQLite file {database!r} (looked in {path.resolve().parent}); run "
                               f"`dart-tuner tune --storage {url}` first, or give the file that holds your study")
        return
    if not path.parent.resolve().is_dir():
        raise StorageError(f"storage {url!r}: no folder {str(path.parent.resolve())!r} for the SQLite file; "
                           "create it first")
    target = path if path.exists() else path.parent.resolve()
    if not os.access(target, os.W_OK):
        raise StorageError(f"storage {url!r}: {str(target)!r} is read-only; tuning writes every trial there")


def sqlite_path(url: str) -> Path | None:
    """The file a SQLite URL names (None for other databases and for a URL that does not parse)."""
    try:
        parsed = make_url(url.strip())
    except sqlalchemy.exc.ArgumentError:
        return None
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(_sqlite_database(parsed))


def sqlite_file_gone(url: str) -> bool:
    """Whether the URL is a SQLite file that no longer exists (deleted or moved while a worker used it)."""
    path = sqlite_path(url)
    return path is not None and not path.exists()


def engine_kwargs(url: str) -> dict[str, Any]:
    """SQLAlchemy engine options: SQLite waits on other workers' locks; server databases test pooled connections
    before use, so a restarted server costs a reconnect, not an error."""
    if make_url(url).get_backend_name() == "sqlite":
        return {"connect_args": {"timeout": SQLITE_LOCK_TIMEOUT_S}}
    return {"pool_pre_ping": True}


def root_cause(error: BaseException) -> BaseException:
    """The driver's error under SQLAlchemy's and Optuna's wrappers: the end of the explicit `raise ... from` chain
    (not of the implicit one, which wanders into whatever the driver was cleaning up)."""
    seen = set()
    while error.__cause__ is not None and id(error) not in seen:
        seen.add(id(error))
        error = error.__cause__
    return error


def describe(url: str, error: BaseException, doing: str = "cannot use") -> str:
    """One line for a storage failure: URL, the root cause's type and first line, and a hint where one helps."""
    cause = root_cause(error)
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    if isinstance(cause, ModuleNotFoundError):
        hint = " (install the database driver, e.g. pip install 'dart-tuner[postgres]')"
    elif sqlite_file_gone(url) and any(word in text for word in ("readonly", "read-only", "unable to open", "i/o")):
        hint = f" (the SQLite file {str(sqlite_path(url))!r} is gone: deleted or moved while in use)"
    elif "no such table" in text:
        hint = " (the file is not an Optuna storage: it has no Optuna tables)"
    elif "readonly" in text or "read-only" in text:
        hint = " (tuning writes every trial there: give a writable database)"
    else:
        hint = ""
    return f"{doing} Optuna storage {url!r}: {type(cause).__name__}: {text}{hint}"


def storage_failure(error: BaseException) -> BaseException | None:
    """The storage error somewhere in `error`'s chain (SQLAlchemy's, Optuna's storage error, or ours), if any.

    Optuna can mask a storage error raised while it records a trial with an error of its own, so the whole chain
    is searched.
    """
    return _in_chain(error, (StorageError, StorageInternalError, sqlalchemy.exc.SQLAlchemyError))


def is_transient(error: BaseException) -> bool:
    """Whether waiting may cure a storage error: a lost or refused connection, a server starting or stopping, a
    locked SQLite file. A read-only file, a missing table or a wrong password are not."""
    cause = error.__cause__ if isinstance(error, StorageInternalError) and error.__cause__ else error
    if isinstance(cause, sqlalchemy.exc.DBAPIError) and cause.connection_invalidated:
        return True
    if not isinstance(cause, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
        return False
    text = str(cause).lower()
    return not any(word in text for word in _PERMANENT)


# -- workers --------------------------------------------------------------------------------------------------


class RequeueStaleTrial(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a trial whose worker stopped sending heartbeats, without carrying the stale trial's
    failure reason over to the fresh copy."""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        trial.user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in (FAILURE_ATTR, FAILURE_TYPE_ATTR)}
        super().__call__(study, trial)


class ResilientRDBStorage(RDBStorage):
    """RDBStorage that waits out a database that is briefly unreachable, and stores why a stale trial failed.

    Every storage call that fails with a transient error (`is_transient`) is tried again with exponential back-off
    for up to `reconnect_s` seconds, then raised as a StorageError. A trial whose heartbeats stopped gets the
    user attribute `failure` before Optuna fails it, so the stored study says what happened to it.

    A write whose commit reached the server just before the connection broke is ambiguous: a state change found
    already made is taken as done; a new trial created twice would show up as an extra waiting trial.
    """

    def __init__(self, url: str, *, reconnect_s: float = RECONNECT_S, **kwargs: Any) -> None:
        self.reconnect_s = reconnect_s
        self._outage = False  # an outage is under way: warned about once, whichever thread (heartbeat, trial) met it
        self._outage_lock = threading.Lock()
        super().__init__(url, **kwargs)

    def _retrying(self, call: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """`call`, tried again with back-off while its errors are transient; the last try comes at the deadline, so
        the wait is `reconnect_s`, and StorageGaveUp says how long it actually waited."""
        started = time.monotonic()
        deadline, delay = started + self.reconnect_s, 0.5
        while True:
            try:
                with sigint_deferred():  # a Ctrl-C mid-statement could leave a lock held: raised after it
                    result = call(*args, **kwargs)
            except (StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as error:
                if not is_transient(error):
                    raise
                left = deadline - time.monotonic()
                if left <= 0:
                    waited = time.monotonic() - started
                    raise StorageGaveUp(describe(self.url, error, f"gave up after {waited:.3g} s on")) from error
                with self._outage_lock:
                    first, self._outage = not self._outage, True
                if first:
                    logger.warning("%s; retrying for up to %.3g s", describe(self.url, error, "lost"),
                                   self.reconnect_s)
                time.sleep(min(delay, left))
                delay = min(2 * delay, 8.0)
            else:
                self._outage = False  # the database answers again: the next outage is warned about anew
                return result

    def set_trial_state_values(self, trial_id: int, state: TrialState,
                               values: Any = None) -> bool:
        attempts = [0]

        def attempt() -> bool:
            attempts[0] += 1
            try:
                return RDBStorage.set_trial_state_values(self, trial_id, state, values)
            except UpdateFinishedTrialError:
                # A retry after an ambiguous commit: the first attempt's change is already there.
                if attempts[0] > 1 and RDBStorage.get_trial(self, trial_id).state == state:
                    return True
                raise

        return self._retrying(attempt)

    def record_heartbeat(self, trial_id: int) -> None:
        """A heartbeat that cannot reach the database for the whole reconnect time is skipped, not raised: the
        heartbeat thread must go on beating for the trial once the database is back."""
        try:
            self._retrying(RDBStorage.record_heartbeat, self, trial_id)
        except StorageGaveUp as error:
            logger.warning("%s; the heartbeat tries again in %s s", error, self.heartbeat_interval)

    def param_distributions(self, study_id: int) -> dict[str, BaseDistribution]:
        """One stored distribution of each parameter of the study (every record of a parameter fits the first, which
        Optuna checks a new draw against), in one query instead of a load of every trial."""
        query = (sqlalchemy.select(TrialParamModel.param_name, sqlalchemy.func.min(TrialParamModel.distribution_json))
                 .join(TrialModel, TrialParamModel.trial_id == TrialModel.trial_id)
                 .where(TrialModel.study_id == study_id).group_by(TrialParamModel.param_name))

        def read() -> dict[str, BaseDistribution]:
            with self.engine.connect() as connection:
                return {name: json_to_distribution(text) for name, text in connection.execute(query).all()}

        return self._retrying(read)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        stale = self._retrying(RDBStorage._get_stale_trial_ids, self, study_id)
        for trial_id in stale:
            try:
                self.set_trial_user_attr(trial_id, FAILURE_ATTR, HEARTBEAT_FAILURE)
            except UpdateFinishedTrialError:  # another worker failed it first
                pass
        return stale


def _retried(name: str) -> Callable[..., Any]:
    method = getattr(RDBStorage, name)

    def call(self: ResilientRDBStorage, *args: Any, **kwargs: Any) -> Any:
        return self._retrying(method, self, *args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = method.__doc__
    return call


# Every storage call Optuna makes while a study runs (reads, writes, heartbeats) waits out a transient outage; the
# private ones are those Optuna's own cache in front of an RDBStorage calls instead of the public ones.
for _name in ("_create_new_trial", "_set_trial_param", "_get_best_trial_id", "_get_trials",
              "create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
              "get_study_id_from_name", "get_study_name_from_id", "get_study_directions", "get_study_user_attrs",
              "get_study_system_attrs", "get_trial_user_attrs", "get_trial_system_attrs", "get_all_studies",
              "create_new_trial", "set_trial_param", "get_trial_param", "set_trial_intermediate_value",
              "set_trial_user_attr", "set_trial_system_attr", "get_trial_id_from_study_id_trial_number",
              "get_trial", "get_all_trials", "get_best_trial"):
    setattr(ResilientRDBStorage, _name, _retried(_name))


def open_for_tuning(url: str, *, heartbeat_interval: int = 30, grace_period: int | None = None,
                    max_retry: int = 2, reconnect_s: float | None = None) -> ResilientRDBStorage:
    """The storage a tuning worker writes to: heartbeats, stale trials failed with a reason and queued again (at
    most `max_retry` times), transient outages waited out for `reconnect_s` seconds (None: `reconnect_seconds()`).
    StorageError when it cannot be opened.

    Workers started together on a new database race to create its schema; the loser retries and finds it made.
    """
    check_url(url, writing=True)
    reconnect_s = reconnect_seconds() if reconnect_s is None else reconnect_s
    new_file = sqlite_path(url) if sqlite_file_gone(url) else None
    try:
        return _open_for_tuning(url, heartbeat_interval, grace_period, max_retry, reconnect_s)
    except StorageError:
        # SQLite creates the file before it can write a page: a full disk would leave an empty database behind
        if new_file is not None and new_file.is_file() and new_file.stat().st_size == 0:
            new_file.unlink(missing_ok=True)
        raise


def _open_for_tuning(url: str, heartbeat_interval: int, grace_period: int | None, max_retry: int,
                     reconnect_s: float) -> ResilientRDBStorage:
    deadline, delay = time.monotonic() + min(reconnect_s, 10.0), 0.5
    while True:
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5; they are the point here
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return ResilientRDBStorage(url, reconnect_s=reconnect_s, engine_kwargs=engine_kwargs(url),
                                           heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                                           heartbeat_stale_trial_callback=RequeueStaleTrial(max_retry=max_retry))
        except (sqlalchemy.exc.SQLAlchemyError, StorageInternalError) as error:
            schema_race = isinstance(error, (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError))
            if not (schema_race or is_transient(error)) or time.monotonic() + delay > deadline:
                raise StorageError(describe(url, error, "cannot open")) from None
            time.sleep(delay)
            delay *= 2
        except Exception as error:  # Optuna's schema-version check, a driver's own error type
            raise StorageError(describe(url, error, "cannot open")) from None


# -- readers --------------------------------------------------------------------------------------------------


def open_for_reading(url: str) -> RDBStorage:
    """A storage to read studies from, checked by listing them; never creates a database or tables.

    StorageError (one line) when the URL is bad, the file or server is missing, or it is not an Optuna storage.
    """
    check_url(url, writing=False)
    url = url.strip()
    try:
        storage = RDBStorage(url, engine_kwargs=engine_kwargs(url), skip_table_creation=True)
        storage.get_all_studies()
    except Exception as error:  # sqlalchemy, the DB driver, Optuna's schema check: all end up as one message
        raise StorageError(describe(url, error, "cannot read")) from None
    return storage
