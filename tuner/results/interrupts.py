"""Ctrl-C around storage writes: held until a storage call ends, or ignored while an interrupted trial is queued
again. An interrupt that lands mid-statement can leave a SQLite connection holding the database's lock with
nobody to close it, and every later write of the worker then waits that lock out and fails."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold a Ctrl-C that arrives inside the block and raise it as the block ends (a second Ctrl-C raises at once).
    Python delivers signals to the main thread only, so elsewhere this does nothing."""
    previous = signal.getsignal(signal.SIGINT) if _in_main_thread() else None
    if not callable(previous):  # another thread, or SIGINT ignored / left to the OS: nothing to hold
        yield
        return
    held: list[tuple[int, FrameType | None]] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        if held:
            previous(signum, frame)
        held.append((signum, frame))

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held:
            previous(*held[0])


@contextlib.contextmanager
def sigint_ignored() -> Iterator[None]:
    """Let a second Ctrl-C not cut short the re-queueing of an interrupted trial (main thread only)."""
    if not _in_main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
