"""The process's PostgreSQL notification listener: one LISTEN connection, two channels.

- NOTIFY_CHANNEL: what a serving process must hear at once: work enqueued on a queue, a slot
  freed on a queue with a global concurrency limit (a finish, a cancel), token budget freed by
  a usage report (all `q:<queue>`), recovery (`q:*`), a workflow cancelled or given up
  (`done:<id>`: its execution here stops at once).
- DONES_CHANNEL: workflows that finished (`done:<id>`, or `dones:<JSON list>` for a batch).
  Only a process waiting on a workflow needs them, and every finish of every process sends one
  to every listener: with 1,600 workflows a second, a listener woke about 1.2 times per
  workflow to drop announcements nobody here waited for. So a process listens on this channel
  only while something in it waits (`wants_dones`), and for LINGER_SEC after its last waiter
  left (a loop of `get_result` calls would otherwise LISTEN and UNLISTEN at every handle).

A waiter registers before it reads the workflow's row. Once LISTEN on the dones channel has
taken effect, `on_dones_heard` tells every waiter to read again: a workflow that finished
between a waiter's read and the LISTEN is then seen, and every later finish is notified.
Polling (see `core.waiters`) stays the fallback for anything no notification reaches.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from collections.abc import Callable

import psycopg
from sqlalchemy.engine import make_url

from dbos_nb.storage.database import (
    DONES_CHANNEL,
    NOTIFY_CHANNEL,
    Database,
    pg_connect_args,
)

logger = logging.getLogger(__name__)

# How long a process keeps listening on DONES_CHANNEL after its last waiter left.
LINGER_SEC = 0.5
# The longest the loop sleeps without looking at the waiters (for LINGER_SEC and `stop`).
_TICK_SEC = 0.25
_COMMAND_OK = psycopg.pq.ExecStatus.COMMAND_OK


class Listener:
    """Calls `on_payload` with each notification's message that another process sent (see
    `Database.payload`), on the thread that runs `run`."""

    def __init__(
        self,
        db: Database,
        on_payload: Callable[[str], None],
        *,
        wants_dones: Callable[[], bool] = lambda: True,
        on_dones_heard: Callable[[], None] = lambda: None,
        on_dones_payload: Callable[[str], None] | None = None,
        on_listening: Callable[[], None] = lambda: None,
        linger_sec: float = LINGER_SEC,
    ) -> None:
        self._db = db
        self._on_payload = on_payload
        # Called each time LISTEN is in effect again (the first time, and after a lost
        # connection): what was sent meanwhile was never heard, and must be looked for.
        self._on_listening = on_listening
        # DONES_CHANNEL's announcements (finishes elsewhere), if they are to be told apart from
        # NOTIFY_CHANNEL's (where `done:` is a cancel or a give-up).
        self._on_dones_payload = on_dones_payload or on_payload
        self._wants_dones = wants_dones
        self._on_dones_heard = on_dones_heard
        self._linger_sec = linger_sec
        # Whether LISTEN on DONES_CHANNEL is in effect now (set by the loop; for diagnostics).
        self.hears_dones = False
        # Whether LISTEN on NOTIFY_CHANNEL is in effect now: while not, other processes'
        # notifications are lost, and the caller must look for itself.
        self.listening = False
        # A pipe that ends the loop's wait at once when the waiters change.
        self._lock = threading.Lock()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._closed = False

    def want_dones(self) -> None:
        """Something started waiting: listen on the dones channel soon, if not already. Wakes
        the loop even if it listens now: it may be about to stop (its linger over)."""
        with self._lock:
            if self._closed:
                return
            # A full pipe (BlockingIOError) already holds a wake-up the loop has yet to read.
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake_write, b"w")

    def run(self, stop: threading.Event) -> None:
        """Block, delivering notifications, until `stop` is set; reconnects after connection
        errors. Returns at once on SQLite."""
        try:
            if self._db.is_postgres:
                self._serve(stop)
        finally:
            with self._lock:
                self._closed = True
                os.close(self._wake_read)
                os.close(self._wake_write)

    def _serve(self, stop: threading.Event) -> None:
        db = self._db
        dsn = make_url(db.url).set(drivername="postgresql").render_as_string(hide_password=False)
        while not stop.is_set():
            try:
                with psycopg.connect(dsn, autocommit=True, **pg_connect_args(db.url)) as conn:
                    self._listen_on(conn, stop)
            except psycopg.Error as exc:
                self.hears_dones = False
                self.listening = False
                if stop.is_set():
                    return
                logger.warning("notification listener lost its connection (%s); reconnecting", exc)
                stop.wait(0.5)

    def _listen_on(self, conn: psycopg.Connection[object], stop: threading.Event) -> None:
        pgconn = conn.pgconn
        encoding = conn.info.encoding
        # Most notifications a busy process receives are its own (every listener gets every
        # one): they are read from libpq as bytes and dropped by their prefix, without
        # psycopg's per-notification objects and decoding.
        own = self._db.payload("").encode(encoding)
        dones = DONES_CHANNEL.encode(encoding)
        _command(pgconn, f"LISTEN {NOTIFY_CHANNEL}", encoding)
        self.listening = True
        self._deliver(lambda _: self._on_listening(), "")
        self.hears_dones = False
        last_wanted = time.monotonic()
        while not stop.is_set():
            # Before each wait, so that waiters present at a (re)connection are served at once.
            now = time.monotonic()
            if self._wants_dones():
                last_wanted = now
                if not self.hears_dones:
                    _command(pgconn, f"LISTEN {DONES_CHANNEL}", encoding)
                    self.hears_dones = True
                    self._on_dones_heard()
            elif self.hears_dones and now - last_wanted >= self._linger_sec:
                _command(pgconn, f"UNLISTEN {DONES_CHANNEL}", encoding)
                self.hears_dones = False
            while (note := pgconn.notifies()) is not None:
                if not note.extra.startswith(own):
                    handler = self._on_dones_payload if note.relname == dones else self._on_payload
                    self._deliver(handler, note.extra.decode(encoding).partition("|")[2])
            if self._wait(pgconn.socket):
                pgconn.consume_input()  # raises once the connection is lost

    def _deliver(self, handler: Callable[[str], None], message: str) -> None:
        # A handler's failure (a read it makes while the database is away) must not end the
        # listener: the process would never hear of other processes' work again.
        try:
            handler(message)
        except Exception:
            logger.warning("handling notification %r failed", message, exc_info=True)

    def _wait(self, fileno: int) -> bool:
        """Wait for the connection's socket or a wake-up, at most _TICK_SEC; whether the socket
        has something to read (or was closed)."""
        wake = self._wake_read
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(fileno, select.POLLIN)
            poller.register(wake, select.POLLIN)
            events = poller.poll(_TICK_SEC * 1000)
            ready = {fd for fd, mask in events if mask}
        else:
            ready = set(select.select([fileno, wake], [], [], _TICK_SEC)[0])
        if wake in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(wake, 4096)
        return fileno in ready


def _command(pgconn: psycopg.pq.abc.PGconn, sql: str, encoding: str) -> None:
    """Run LISTEN or UNLISTEN on the listening connection through libpq itself: notifications
    that arrive meanwhile stay queued for the loop (a psycopg cursor would hand them to its own
    handlers)."""
    result = pgconn.exec_(sql.encode())
    if result.status != _COMMAND_OK:
        raise psycopg.errors.error_from_result(result, encoding=encoding)
