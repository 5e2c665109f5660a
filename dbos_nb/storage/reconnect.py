"""Riding out a lost connection to PostgreSQL: which errors mean "the connection went away",
and retrying an idempotent statement on a new connection meanwhile.

A server restart, a failover or an administrator's `pg_terminate_backend` ends the sessions of
every process at once. The checkpoint writes and the outcome reads that workflows depend on are
single statements written to be run again safely (an insert that keeps the first record, an
update guarded by the owner, a read), so they are retried for a while, as DBOS does with its
system database, rather than failing a workflow whose work went fine. What still fails after
the window is an outage, not a blip: it is raised to the caller.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import psycopg
from sqlalchemy.exc import DBAPIError

logger = logging.getLogger(__name__)

T = TypeVar("T")

# How long a statement is retried while the server cannot be reached.
RECONNECT_WINDOW_SEC = 30.0
_FIRST_PAUSE_SEC = 0.01
_LONGEST_PAUSE_SEC = 1.0


# Server errors that end a session rather than a statement: the administrator ended it, the
# server crashed or is starting or stopping (SQLSTATE class 08 is the connection exceptions).
_SESSION_ENDED = ("57P01", "57P02", "57P03")
_LOST = "_dbos_nb_system_database_lost"


def is_connection_error(exc: BaseException) -> bool:
    """Whether `exc` says the connection to the database failed or was lost (the server
    closed it, could not be reached, ended the session), not that a statement failed (a
    timeout, a deadlock, a full disk are the statement's own errors)."""
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        orig: BaseException | None = exc.orig
    else:
        orig = exc
    if not isinstance(orig, psycopg.OperationalError):
        return False
    sqlstate = orig.sqlstate
    # No SQLSTATE: the client's own report (could not connect, the server closed the socket).
    return sqlstate is None or sqlstate.startswith("08") or sqlstate in _SESSION_ENDED


def mark_lost(exc: BaseException) -> BaseException:
    """Tag a connection error of dbos_nb's own system-database work: a workflow that meets it
    did not fail, its checkpoint did (an application's own database errors are never tagged)."""
    with contextlib.suppress(AttributeError, TypeError):
        setattr(exc, _LOST, True)
    return exc


@contextlib.contextmanager
def tagging_losses() -> Iterator[None]:
    """Around dbos_nb's own system-database work: a connection error raised in the block is
    tagged (`mark_lost`) on its way out."""
    try:
        yield
    except Exception as exc:
        if is_connection_error(exc):
            mark_lost(exc)
        raise


def is_lost(exc: BaseException) -> bool:
    """Whether `exc` is a tagged loss of the system database (see `mark_lost`)."""
    return bool(getattr(exc, _LOST, False))


def retrying(
    run: Callable[[], T],
    window_sec: float | None = None,
    stop: threading.Event | None = None,
) -> T:
    """`run()`, run again on connection errors (with growing pauses) for up to `window_sec`
    seconds (default RECONNECT_WINDOW_SEC; `math.inf`: until it works), or until `stop` is
    set; `run` must be safe to repeat, since a lost connection may have lost the reply to a
    statement that did commit. The error that ends the retries is tagged (`mark_lost`)."""
    window = RECONNECT_WINDOW_SEC if window_sec is None else window_sec
    deadline: float | None = None
    pause = _FIRST_PAUSE_SEC
    while True:
        try:
            return run()
        except Exception as exc:
            if not is_connection_error(exc):
                raise
            now = time.monotonic()
            if deadline is None:
                deadline = now + window
                logger.warning(
                    "lost the database connection (%s); retrying", exc.__class__.__name__
                )
            if now >= deadline or (stop is not None and stop.is_set()):
                mark_lost(exc)
                raise
        if stop is not None:
            stop.wait(pause)
        else:
            time.sleep(pause)
        pause = min(pause * 2, _LONGEST_PAUSE_SEC)
