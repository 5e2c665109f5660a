"""SQLite: WAL checkpoints on a background thread, not inside whichever commit crosses the limit.

In WAL mode SQLite copies the log back into the database file (a checkpoint, with an fsync) in
the connection whose commit takes the log past `wal_autocheckpoint` pages: one caller in a few
hundred pays tens of milliseconds for everyone's writes, and an `enqueue_many` of 100,000 items
paid 80-120 ms of its 400 for it. Here a thread of the process checkpoints instead, shortly after
the log changes, with the GIL released (on the other core); the connections' own limit is raised
to FALLBACK_PAGES, reached only if this thread falls behind or is not running (a process that
never writes starts none).

A checkpoint is PASSIVE: it copies what no reader still needs and never waits for, nor blocks,
readers or writers. Several processes may each run one: SQLite lets one checkpoint at a time and
the others find nothing to do.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import urllib.parse

from dbos_nb.storage.process import current_pid

logger = logging.getLogger(__name__)

# How often the thread looks at the log (a stat of the -wal file).
CHECK_INTERVAL_SEC = 0.1
# A look at the log even when its file seems unchanged (timestamps can be coarse).
FORCE_SEC = 5.0
# The wait after a failed checkpoint (the file locked or gone for a moment).
RETRY_SEC = 1.0
# Every connection's `wal_autocheckpoint` (SQLite's default is 1,000 pages): 40 MB of 4 KiB
# pages, twice what an `enqueue_many` of 100,000 items writes.
FALLBACK_PAGES = 10_000


class Checkpointer:
    """The checkpointing thread of one SQLite database file in this process."""

    def __init__(self, path: str, interval_sec: float = CHECK_INTERVAL_SEC) -> None:
        # SQLite keeps the log beside the file a symbolic link points to.
        path = os.path.realpath(path)
        self._path = path
        self._wal = path + "-wal"
        self._interval = interval_sec
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Checkpoints that copied something (diagnostics, and how tests see the thread work).
        self.checkpoints = 0

    def ensure_running(self) -> None:
        """Start the thread in this process if it does not run here yet (called by writers:
        a forked child gets its own)."""
        if self._pid == current_pid():
            return
        with self._lock:
            if self._pid == current_pid() or self._stop.is_set():
                return
            self._pid = current_pid()
            self._thread = threading.Thread(
                target=self._run, name="dbos_nb-checkpointer", daemon=True
            )
            self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether the thread runs (in this process)."""
        thread = self._thread
        return thread is not None and thread.is_alive() and self._pid == current_pid()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread (for good: a stopped checkpointer does not start again); waits up to
        `timeout` for it to end."""
        with self._lock:
            self._stop.set()
            thread, self._thread = self._thread, None
        if thread is not None and timeout > 0 and self._pid == current_pid():
            thread.join(timeout)

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        seen: tuple[int, int] | None = None
        last = time.monotonic()
        failures = 0
        try:
            while not self._stop.wait(self._interval if not failures else RETRY_SEC):
                try:
                    stat = os.stat(self._wal)
                except FileNotFoundError:
                    continue
                # A write that lands in the same timestamp tick as the last look, without growing
                # the file, is seen by the next write or at the next forced look: only the copy
                # is late, the log itself is durable and read by everyone.
                state = (stat.st_mtime_ns, stat.st_size)
                if state == seen and time.monotonic() - last < FORCE_SEC:
                    continue  # nothing written since the last checkpoint
                last = time.monotonic()
                try:
                    if conn is None:
                        # Read-write but never create: a file removed meanwhile stays removed.
                        uri = f"file:{urllib.parse.quote(self._path)}?mode=rw"
                        conn = sqlite3.connect(uri, uri=True, isolation_level=None)
                    row = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error as exc:
                    # Commits still checkpoint past FALLBACK_PAGES; try again in a while.
                    if not failures:
                        logger.warning("background WAL checkpoint failed (%s); retrying", exc)
                    failures += 1
                    if conn is not None:
                        conn.close()
                        conn = None
                    continue
                failures = 0
                busy, frames, copied = row
                if not busy and copied > 0:
                    self.checkpoints += 1
                seen = state if not busy and frames == copied else None
        finally:
            if conn is not None:
                conn.close()
