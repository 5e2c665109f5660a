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

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import psycopg
from sqlalchemy.exc import DBAPIError

logger = logging.getLogger(__name__)

T = TypeVar("T")

# How long a statement is retried while the server cannot be reached.
RECONNECT_WINDOW_SEC = 30.0
_FIRST_PAUSE_SEC = 0.01
_LONGEST_PAUSE_SEC = 1.0


def is_connection_error(exc: BaseException) -> bool:
    """Whether `exc` says the connection to the database failed or was lost (the server
    closed it, could not be reached, ended the session), not that the statement was wrong."""
    if isinstance(exc, DBAPIError):
        return bool(exc.connection_invalidated) or isinstance(exc.orig, psycopg.OperationalError)
    return isinstance(exc, psycopg.OperationalError)


def retrying(run: Callable[[], T], window_sec: float | None = None) -> T:
    """`run()`, run again on connection errors (with growing pauses) for up to `window_sec`
    seconds (default RECONNECT_WINDOW_SEC); `run` must be safe to repeat, since a lost
    connection may have lost the reply to a statement that did commit."""
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
            if now >= deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, _LONGEST_PAUSE_SEC)
