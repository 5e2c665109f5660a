"""Connections to one SQL database: engine set-up, transactions, locking and notifications.

This is the only place that knows how SQLite and PostgreSQL differ. The store above it writes its
statements once with SQLAlchemy Core and asks this module for:

- `write()`: a transaction that takes the database's write lock up front on SQLite
  (`BEGIN IMMEDIATE`, so two writers never deadlock upgrading a read lock) and is an ordinary
  READ COMMITTED transaction on PostgreSQL;
- `read()`: a short read;
- `lock_queue_row()`: on PostgreSQL, `SELECT ... FOR UPDATE` on the queue's row so that claimers of
  one queue take turns and count exactly (SQLite needs nothing: `BEGIN IMMEDIATE` already
  serializes writers);
- `notify()` and `listen()`: PostgreSQL LISTEN/NOTIFY; on SQLite no-ops (other processes poll);
- `grouped()`: the hot single-statement writes (enqueue, step record, outcome), run on the
  driver's connection (`driver_write()`: SQLite's one dedicated connection, under the process's
  write lock; `driver_single()`: PostgreSQL's pooled connections in autocommit), with other
  threads' writes sharing the commit (`committer.py`): compiled once (`prepared.py`), or, for
  PostgreSQL's batches, as the SQL of `merged.py`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sqlite3
import threading
import urllib.parse
import uuid
import weakref
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, cast

import psycopg
from sqlalchemy import (
    Connection,
    Engine,
    Executable,
    Table,
    bindparam,
    create_engine,
    event,
    literal,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import ConnectionPoolEntry

from dbos_nb.errors import DBOSConfigError
from dbos_nb.storage import pgwire
from dbos_nb.storage.checkpointer import Checkpointer
from dbos_nb.storage.committer import GATHER_SEC, BatchKind, GroupCommitter
from dbos_nb.storage.merged import MergedKind, run_merged
from dbos_nb.storage.prepared import Chained, Each, Guarded, Prepared, Statement, translate
from dbos_nb.storage.process import current_pid
from dbos_nb.storage.reconnect import retrying, tagging_losses
from dbos_nb.storage.schema import PG_SCHEMA, queues
from dbos_nb.storage.sessions import (
    SERVER_SETTINGS,
    WRITE_OPTION,
    install_sqlite_hooks,
    session_settings,
    set_config,
)

logger = logging.getLogger(__name__)
# clock_timestamp(), not now(): the time of the reading, not of its transaction's start.
_SERVER_NOW_MS = text("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint")

_PQ_IDLE = psycopg.pq.TransactionStatus.IDLE
# Idle connections a forked child inherited (see `Database._take_single`), kept from the garbage
# collector, which would return them to the child's pool.
_INHERITED: list[list[Any]] = []

# What every serving process hears (see `listener`): work enqueued, slots freed, cancellations.
NOTIFY_CHANNEL = "dbos_nb_events"
# Workflows that finished: heard only by processes waiting on some (see `listener`).
DONES_CHANNEL = "dbos_nb_dones"
_READ_QUEUE_ROW = select(queues).where(queues.c.name == bindparam("q"))
_LOCK_QUEUE_ROW = _READ_QUEUE_ROW.with_for_update()
# Bound parameters per multi-row INSERT of `bulk_insert`: under the 999 of SQLite builds older
# than 3.32, and past the point where larger statements stop paying off.
_BULK_PARAMS = 900


def shown_url(url: str) -> str:
    """The URL with its password hidden, for what is printed (a notebook's saved cell output,
    a terminal)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


def normalize_url(url: str) -> str:
    """Map the URL spellings users write to the drivers dbos_nb uses (psycopg 3, sqlite3)."""
    if not isinstance(url, str) or not url:
        raise DBOSConfigError(f"a database URL must be a non-empty string, got {url!r}")
    for prefix in ("postgres://", "postgresql://", "postgresql+psycopg2://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    if url.startswith("postgresql+psycopg://"):
        return url
    in_memory = url.split("?", 1)[0].endswith("/:memory:") or "mode=memory" in url
    if url.startswith(("sqlite:///", "sqlite+pysqlite:///")) and not in_memory:
        return _expand_home(url)
    if url.startswith(("sqlite://", "sqlite+pysqlite://")):
        raise DBOSConfigError(
            f"{url!r}: in-memory or malformed SQLite URLs are not supported; durable work needs "
            "a file, e.g. 'sqlite:///work.sqlite'"
        )
    raise DBOSConfigError(
        f"unsupported database URL {url!r}: use 'sqlite:///path.sqlite' or "
        "'postgresql://user:password@host:port/dbname'"
    )


def _expand_home(url: str) -> str:
    """A SQLite URL whose path starts with `~` made to name the home folder, as in a shell:
    SQLite itself takes `~` for an ordinary name (and made a folder called `~` in the current
    one)."""
    parsed = make_url(url)
    path = parsed.database
    if not path or not path.startswith("~"):
        return url
    return parsed.set(database=os.path.expanduser(path)).render_as_string(hide_password=False)


def sqlite_file(url: str) -> str | None:
    """The absolute path of a SQLite URL's file (`~` expanded); None for PostgreSQL."""
    parsed = make_url(normalize_url(url))
    if parsed.get_backend_name() != "sqlite":
        return None
    return os.path.abspath(parsed.database or "")


# How PostgreSQL connections give up on a server host that vanished (a machine powered off, a
# network cut): it answers nothing, not even a reset, and a statement waits for its answer in one
# blocking libpq call (see `pgwire`) that an interrupt does not cut short. An idle connection is
# probed after 30 s of silence, then 3 times 10 s apart; a connection whose sent statement stays
# unacknowledged for 60 s is dropped (TCP_USER_TIMEOUT: the kernel sends no keepalive probes
# while data waits for its acknowledgement, and would otherwise retransmit for some 15 minutes).
# Either way the statement then fails as a lost connection, which the reconnecting layer
# handles, instead of waiting for ever. A live server's kernel acknowledges at once however long
# the statement runs; a URL's own settings win. Ignored on a Unix socket.
PG_KEEPALIVES: dict[str, int] = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 60_000,  # ms
}


def pg_connect_args(url: str) -> dict[str, Any]:
    """The driver's connection arguments for `url`: a 10 s connect timeout and PG_KEEPALIVES
    (each only where the URL's query does not give it)."""
    given = make_url(url).query
    defaults: dict[str, Any] = {"connect_timeout": 10, **PG_KEEPALIVES}
    return {key: value for key, value in defaults.items() if key not in given}


# SQLite's answers that mean the file cannot serve as a database at all (as opposed to a busy
# or failing moment): the user has to act on the file, its folder or the URL.
_UNUSABLE_FILE_ERRORS = ("SQLITE_NOTADB", "SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM")


def _unusable_file_hint(name: str) -> str:
    """What a SQLite error of `_UNUSABLE_FILE_ERRORS` means for the user, in their terms."""
    if name == "SQLITE_NOTADB":
        return "the file is not a SQLite database; nothing was written to it"
    if name.startswith("SQLITE_READONLY"):
        return (
            "the file or its folder is read-only for this user, and a process that runs "
            "workflows writes to both (SQLite keeps its -wal and -shm files beside the database)"
        )
    return (
        "it cannot be opened or created: check that its folder exists and that this user may "
        "write there"
    )


class Database:
    """An engine plus the dialect-specific pieces the store needs.

    `read_only`: for processes that only look (`dbos-nb status`): nothing is created, neither
    the file nor its folder (a missing SQLite file is refused), a SQLite file is opened read-only
    (a file the user may not write can still be read), and PostgreSQL sessions refuse writes.
    """

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 8,
        max_overflow: int = 64,
        notifications: bool = True,
        stalled_transaction_timeout_sec: float | None = None,
        system_tables: bool = False,
        read_only: bool = False,
    ) -> None:
        self.url = normalize_url(url)
        self.read_only = read_only
        parsed = make_url(self.url)
        self.is_postgres = parsed.get_backend_name() == "postgresql"
        self.dialect_name = "postgresql" if self.is_postgres else "sqlite"
        # SQLite: the file's absolute path (as `sqlite_file` gives it), for messages.
        self.path = ""
        self.notifications = notifications and self.is_postgres
        self.origin = uuid.uuid4().hex[:12]
        self.engine: Engine
        self._single_engine: Engine
        self._committer: GroupCommitter
        self._engines: list[Engine] = []
        self._write_lock: threading.RLock | None = None
        self._checkpointer: Checkpointer | None = None
        self._in_write = threading.local()
        # Statements run through `grouped`, compiled once (see prepared.py); by id(statement).
        self._prepared: dict[int, tuple[Executable, Prepared]] = {}
        self._translate: dict[str | None, str] | None = None
        # SQLite: the driver connection that grouped writes use, under the write lock.
        self._hot: tuple[int, Any] | None = None
        # PostgreSQL: idle connections of `driver_single` (see `_take_single`).
        self._idle_single: list[Any] = []
        self._idle_single_pid = current_pid()
        self._idle_single_lock = threading.Lock()
        self._idle_single_max = pool_size
        # PostgreSQL ends a session that sits inside a transaction longer than this: a process
        # frozen mid-transaction (SIGSTOP, a paused VM) would otherwise hold its row locks, and
        # every claimer and take-over waiting on them, until it thawed.
        # PostgreSQL keeps the plan of a prepared statement until the table's next ANALYZE. A
        # plan made while workflow_status held a few rows reads it with a sequential scan
        # (cheaper than an index for a page or two), and keeps doing so while the table grows
        # by thousands of rows until autovacuum comes round (a minute or more): a notebook's
        # first small test batch, then a large one, is exactly that. Every statement dbos_nb
        # runs on its own tables has an index made for it, so its sessions ask the planner to
        # use indexes; a query that no index serves still scans (the setting only weighs
        # against scans). Application transactions get the server's settings back
        # (`user_transaction`). Each: (name, value for dbos_nb's sessions).
        self._session: list[tuple[str, str]] = []
        if stalled_transaction_timeout_sec is not None:
            stall_ms = max(round(stalled_transaction_timeout_sec * 1000), 1)
            self._session.append(("idle_in_transaction_session_timeout", str(stall_ms)))
        if system_tables:
            self._session.append(("enable_seqscan", "off"))
            # Short statements only: compiling one (which PostgreSQL starts above a cost
            # threshold, and a scan of a table without a usable index is costed far above it
            # once scans are weighed against) takes 20-90 ms.
            self._session.append(("jit", "off"))
        if read_only and self.is_postgres:
            self._session.append(("default_transaction_read_only", "on"))
        if self.is_postgres:
            translate: dict[str | None, str] = {None: PG_SCHEMA}
            engine = self._make_pg_engine(pool_size, max_overflow)
            self.engine = engine.execution_options(schema_translate_map=translate)
            # Single statements run in autocommit: one round trip instead of three
            # (BEGIN, statement, COMMIT), and a lone statement is atomic anyway.
            auto = self._make_pg_engine(pool_size, max_overflow, isolation_level="AUTOCOMMIT")
            self._single_engine = auto.execution_options(schema_translate_map=translate)
            self._translate = translate
            self._committer = GroupCommitter(
                None, self.driver_single, run_merged, gather_sec=GATHER_SEC
            )
        else:
            path = parsed.database or ""
            self.path = os.path.abspath(path)
            if read_only:
                engine = self._make_read_only_sqlite_engine(pool_size, max_overflow)
            else:
                self._make_folder()
                engine = create_engine(
                    self.url,
                    pool_size=pool_size,
                    max_overflow=max_overflow,
                    pool_timeout=120,
                    connect_args={"check_same_thread": False, "timeout": 60},
                )
                install_sqlite_hooks(engine)
            self._engines.append(engine)
            # Writers of this process take turns on a Python lock before BEGIN IMMEDIATE: SQLite's
            # busy handler waits by sleeping (1, 2, 5 ... 100 ms), so threads that collide on
            # the file lock would idle for milliseconds; the lock hands over at once. Other
            # processes still meet at the file lock and its busy timeout.
            self._write_lock = threading.RLock()
            if path and path != ":memory:" and not read_only:
                self._checkpointer = Checkpointer(path)  # it resolves the path itself
                # A database dropped without `dispose()` (a forgotten client) ends its thread.
                weakref.finalize(self, self._checkpointer.stop, 0)
            self.engine = engine
            self._single_engine = engine
            self._committer = GroupCommitter(self.driver_write, self.driver_write)

    def _make_folder(self) -> None:
        """Create the SQLite file's folder (a new project's first launch), or say in the
        configuration's terms why it cannot be."""
        directory = os.path.dirname(self.path)
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            # makedirs says "File exists" when a file stands where a folder should be.
            blocker = directory
            while blocker and not os.path.exists(blocker):
                blocker = os.path.dirname(blocker)
            reason = (
                f"{blocker} is a file, not a folder"
                if blocker and not os.path.isdir(blocker)
                else exc.strerror or str(exc)
            )
            raise DBOSConfigError(
                f"cannot create the folder of the SQLite database {self.path}: {reason}"
            ) from exc

    def _make_read_only_sqlite_engine(self, pool_size: int, max_overflow: int) -> Engine:
        """An engine that reads the SQLite file without writing anything, to it or beside it."""
        if not os.path.isfile(self.path):
            # Checked before anything is opened: SQLite would create the file (and a typo'd
            # path would look like an empty database).
            raise DBOSConfigError(f"no database at {self.path}")
        engine = create_engine(
            self.url,
            creator=self._connect_read_only,
            pool_size=pool_size,
            max_overflow=max_overflow,
            pool_timeout=120,
        )

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
            # As `install_sqlite_hooks`, SQLAlchemy rather than the sqlite3 module begins
            # transactions; but no WAL switch nor any other pragma that writes.
            dbapi_connection.isolation_level = None
            dbapi_connection.execute("PRAGMA busy_timeout=60000")

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN")

        return engine

    def _connect_read_only(self) -> sqlite3.Connection:
        """A read-only connection (`mode=ro`). Reading a WAL database needs its -shm file,
        which SQLite creates beside the database: in a folder this user cannot write, with no
        -shm there (no process has the database open) that fails. Then, if no write-ahead log
        holds anything either, the file alone is the whole database and is read as immutable
        (a process that starts writing during this short read could make it see a torn page:
        the command then fails, it never writes)."""
        uri = f"file:{urllib.parse.quote(self.path)}"
        conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, check_same_thread=False, timeout=60)
        try:
            conn.execute("PRAGMA schema_version").fetchone()  # reads the header: opens the WAL
            return conn
        except sqlite3.OperationalError as exc:
            conn.close()
            if not str(getattr(exc, "sqlite_errorname", "")).startswith("SQLITE_READONLY"):
                raise
            wal = self.path + "-wal"
            if os.path.exists(self.path + "-shm") or (
                os.path.exists(wal) and os.path.getsize(wal) > 0
            ):
                raise
        return sqlite3.connect(f"{uri}?immutable=1", uri=True, check_same_thread=False)

    @contextlib.contextmanager
    def opening(self) -> Iterator[None]:
        """Around a process's first use of the database (its schema check or migration): a
        SQLite file that cannot serve (not a database, read-only, cannot be created) is refused
        as a DBOSConfigError naming the file and the cause, not as the driver's error."""
        try:
            yield
        except DBAPIError as exc:
            orig = exc.orig
            name = str(getattr(orig, "sqlite_errorname", ""))
            if self.is_postgres or not name.startswith(_UNUSABLE_FILE_ERRORS):
                raise
            raise DBOSConfigError(
                f"cannot use the SQLite database {self.path}: {_unusable_file_hint(name)} "
                f"(SQLite: {orig})"
            ) from exc

    def _make_pg_engine(self, pool_size: int, max_overflow: int, **kwargs: Any) -> Engine:
        engine = create_engine(
            self.url,
            pool_size=pool_size,
            max_overflow=max_overflow,
            pool_timeout=120,
            connect_args=pg_connect_args(self.url),
            **kwargs,
        )
        if self._session:
            event.listen(engine, "connect", session_settings(self._session))

        @event.listens_for(engine, "checkin")
        def _recycle_bloated(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
            # Closed rather than kept once it carried a large value (see `pgwire`): its
            # driver's buffers stay that large for as long as it lives.
            if dbapi_connection is not None and pgwire.needs_recycling(dbapi_connection):
                record.invalidate()

        self._engines.append(engine)
        return engine

    # -- transactions ---------------------------------------------------------------------------

    def write(self, isolation_level: str | None = None) -> AbstractContextManager[Connection]:
        """A read-write transaction of dbos_nb's own, committed when the block exits without an
        exception (a lost connection is tagged as the system database's, see `reconnect`).

        `isolation_level` applies on PostgreSQL; SQLite's BEGIN IMMEDIATE is serializable anyway.
        """
        return self._transaction(isolation_level, system=True)

    @contextlib.contextmanager
    def _transaction(self, isolation_level: str | None, *, system: bool) -> Iterator[Connection]:
        if self._write_lock is None:
            losses = tagging_losses() if system else contextlib.nullcontext()
            with losses, self.engine.connect() as conn:
                if isolation_level is not None:
                    conn = conn.execution_options(isolation_level=isolation_level)
                with conn.begin():
                    yield conn
            return
        if self._checkpointer is not None:
            self._checkpointer.ensure_running()
        with self._write_lock:
            outer: Connection | None = getattr(self._in_write, "conn", None)
            if outer is not None:
                # This thread writes inside its own open transaction (an application
                # transaction on the system database that enqueues, say): a second
                # connection's BEGIN IMMEDIATE would wait for this one until its busy timeout.
                # The write joins it, in a savepoint: it commits with it, or not at all.
                with outer.begin_nested():
                    yield outer
                return
            with self.engine.connect() as conn:
                conn = conn.execution_options(**{WRITE_OPTION: True})
                self._in_write.conn = conn
                try:
                    with conn.begin():
                        yield conn
                finally:
                    self._in_write.conn = None

    def in_write(self) -> bool:
        """Whether this thread is inside a write transaction of this database (SQLite): what
        it writes now commits only with that transaction."""
        return getattr(self._in_write, "conn", None) is not None

    @contextlib.contextmanager
    def user_transaction(self, isolation_level: str | None = None) -> Iterator[Connection]:
        """A `write()` for application code (`@DBOS.transaction`), which may compute for as long
        as it likes between its statements: the stalled-transaction limit does not apply, and
        its errors are the application's (never tagged as the system database's)."""
        with self._transaction(isolation_level, system=False) as conn:
            if self.is_postgres and self._session:
                server = conn.connection.info.get(SERVER_SETTINGS)
                if server:
                    conn.execute(set_config(server, True))
            yield conn

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only transaction (on PostgreSQL: autocommit, for single-statement reads)."""
        if self.is_postgres:
            with tagging_losses(), self._single_engine.connect() as conn:
                yield conn
            return
        with self.engine.connect() as conn, conn.begin():
            yield conn

    @contextlib.contextmanager
    def single(self) -> Iterator[Connection]:
        """A connection for exactly one writing statement, atomic on its own (PostgreSQL:
        autocommit, one round trip; SQLite: a BEGIN IMMEDIATE transaction)."""
        if self.is_postgres:
            with self._single_engine.connect() as conn:
                yield conn
            return
        with self.write() as conn:
            yield conn

    def grouped(
        self,
        stmt: Executable,
        params: dict[str, Any],
        merged: BatchKind | None = None,
        *,
        guard: Executable | None = None,
        then: Executable | None = None,
    ) -> tuple[Any, ...] | None:
        """Run one self-contained writing statement durably, committed together with other
        threads' statements (see `committer`); returns its first row.

        SQLite shares one transaction among them. PostgreSQL sends those that have a `merged`
        kind together, as one transaction (`merged.py`); any other runs at once on the caller's
        thread, in autocommit (its own round trip is all it costs there). A statement that runs
        alone runs on the driver's connection, compiled once (`prepared.py`).

        `guard` (SQLite only: a transaction holds the two together): a query that must return a
        row for `stmt` to run; otherwise nothing is written and None is returned. `then` (SQLite
        only, likewise): a statement run with the same parameters, in the same transaction, when
        `stmt` returned a row.
        """
        if (guard is not None or then is not None) and self.is_postgres:
            raise ValueError(
                "a guard or a follow-up needs a transaction: write one statement on PostgreSQL"
            )
        if self.in_write():
            # SQLite: this thread holds the write lock in a transaction of its own; a batch it
            # led, or the hot connection's BEGIN IMMEDIATE, would wait for it.
            with self.single() as conn:
                if guard is not None and conn.execute(guard, params).first() is None:
                    return None
                row = conn.execute(stmt, params).first()
                if row is not None and then is not None:
                    conn.execute(then, params)
                return None if row is None else tuple(row)
        main = self.prepared(stmt)
        prepared: Statement = main if guard is None else Guarded(self.prepared(guard), main)
        if then is not None:
            prepared = Chained(prepared, self.prepared(then))
        if not self.is_postgres:
            return self._committer.execute(prepared, params, merged)
        # Every grouped statement is safe to run again (see `reconnect`): a session the server
        # ended is ridden out on a new connection.
        if merged is None:
            return retrying(lambda: self._first_single(prepared, params))
        return retrying(lambda: self._committer.execute(prepared, params, merged))

    def grouped_many(
        self, stmt: Executable, merged: MergedKind, batch: list[dict[str, Any]]
    ) -> list[tuple[Any, ...] | None]:
        """Run `stmt` once for each parameter dict of `batch`, durably and all or nothing: on
        PostgreSQL as `merged` (one round trip, one transaction, see `merged.py`), on SQLite in
        one transaction shared with other threads' statements (see `grouped`); each one's
        first row. Every statement must be safe to run again, like `grouped`'s."""
        if not batch:
            return []
        if self.in_write():  # SQLite, inside this thread's own transaction
            with self.single() as conn:
                found = [conn.execute(stmt, params).first() for params in batch]
                return [None if row is None else tuple(row) for row in found]
        if not self.is_postgres:
            each = Each(self.prepared(stmt))
            rows = self._committer.execute(each, {"batch": batch})
            assert rows is not None
            return list(rows)
        return retrying(lambda: self._merged_single(merged, batch))

    def _merged_single(
        self, merged: MergedKind, batch: list[dict[str, Any]]
    ) -> list[tuple[Any, ...] | None]:
        with self.driver_single() as raw:
            return run_merged(raw, [(merged, batch)])[0]

    def _first_single(self, prepared: Statement, params: dict[str, Any]) -> tuple[Any, ...] | None:
        with self.driver_single() as raw:
            return prepared.first(raw, params)

    def prepared(self, stmt: Executable) -> Prepared:
        """`stmt` compiled once for this database (statements are long-lived constants)."""
        entry = self._prepared.get(id(stmt))
        if entry is None or entry[0] is not stmt:
            entry = (stmt, Prepared(stmt, self.engine.dialect, self._translate))
            self._prepared[id(stmt)] = entry
        return entry[1]

    def read_row(self, stmt: Executable, params: dict[str, Any]) -> tuple[Any, ...] | None:
        """The first row of a single-statement read, through the driver (compiled once, see
        `prepared.py`): a handle's wait reads its workflow's outcome this way, for a fifth of
        the Python that the same query costs through a SQLAlchemy connection."""
        rows = self.read_rows(stmt, params)
        return rows[0] if rows else None

    def read_rows(self, stmt: Executable, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        """Every row of a single-statement read, through the driver (see `read_row`)."""
        prepared = self.prepared(stmt)
        if self.is_postgres:
            return retrying(lambda: self._all_single(prepared, params))
        # SQLite: a lone SELECT is a consistent snapshot by itself (the driver begins no
        # transaction for it).
        fairy = self.engine.raw_connection()
        try:
            return prepared.all(fairy.driver_connection, params)
        finally:
            fairy.close()

    def _all_single(self, prepared: Prepared, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        with self.driver_single() as raw:
            return prepared.all(raw, params)

    @contextlib.contextmanager
    def driver_write(self) -> Iterator[Any]:
        """SQLite: a BEGIN IMMEDIATE transaction on the hot driver connection (committed when
        the block exits without an exception), under the process's write lock."""
        assert self._write_lock is not None
        if self._checkpointer is not None:
            self._checkpointer.ensure_running()
        with self._write_lock:
            conn = self._hot_connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise translate(exc, self.engine.dialect) from exc
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise translate(exc, self.engine.dialect) from exc
                raise

    def _hot_connection(self) -> Any:
        # Checked out of the pool for good (the pool's connect hook has set it up); a forked
        # child opens its own rather than share the parent's file handle.
        if self._hot is None or self._hot[0] != current_pid():
            fairy = self.engine.raw_connection()
            self._hot = (current_pid(), fairy)
        return self._hot[1].driver_connection

    def driver_single(self) -> AbstractContextManager[Any]:
        """PostgreSQL: a driver connection in autocommit, for statements that are atomic on
        their own. A connection found broken, or closed by its user (`pgwire` closes one it was
        interrupted on), is dropped from the pool."""
        return _SingleUse(self)

    def _drop_single(self, fairy: Any, exc: BaseException) -> None:
        """`driver_single`'s block failed: return the connection to the pool, or invalidate it
        if it broke; a driver's error is raised again as SQLAlchemy's."""
        broken = bool(cast(Any, fairy.driver_connection).closed)
        if not broken and isinstance(exc, psycopg.Error | DBAPIError):
            # Prepared statements raise SQLAlchemy's errors already; merged runners, the
            # driver's own.
            orig = exc.orig if isinstance(exc, DBAPIError) else exc
            broken = orig is not None and self.engine.dialect.is_disconnect(
                cast(Any, orig), fairy.dbapi_connection, None
            )
        if broken:
            fairy.invalidate(exc if isinstance(exc, Exception) else None)
            if isinstance(exc, DBAPIError):
                exc.connection_invalidated = True  # what `reconnect` asks of it
        fairy.close()
        if isinstance(exc, psycopg.Error):
            raise translate(exc, self.engine.dialect, connection_invalidated=broken) from exc

    # Between uses, `driver_single`'s connections stay checked out of SQLAlchemy's pool, in a
    # list of this process: a check-out and return through the pool (events, reset, its queue)
    # cost about 40 microseconds of Python, paid one to three times per workflow. At most
    # `pool_size` wait there, besides those idle in the pool itself.

    def _take_single(self) -> Any:
        if self._idle_single_pid != current_pid():
            # A forked child: the parent's connections are not ours to use, nor to close, nor
            # to let the garbage collector hand back to the pool; its lock may have been held.
            _INHERITED.append(self._idle_single)
            self._idle_single_pid = current_pid()
            self._idle_single = []
            self._idle_single_lock = threading.Lock()
        with self._idle_single_lock:
            if self._idle_single:
                return self._idle_single.pop()
        return self._single_engine.raw_connection()

    def _give_back_single(self, fairy: Any, conn: Any) -> None:
        if (
            not conn.closed
            and conn.pgconn.transaction_status == _PQ_IDLE
            and not pgwire.needs_recycling(conn)
        ):
            with self._idle_single_lock:
                if len(self._idle_single) < self._idle_single_max:
                    self._idle_single.append(fairy)
                    return
        # Back to the pool, whose check-in closes one that carried a large value (see
        # `_make_pg_engine`).
        fairy.close()

    @property
    def checkpointer(self) -> Checkpointer | None:
        """SQLite: the thread that checkpoints the write-ahead log (None on PostgreSQL)."""
        return self._checkpointer

    @property
    def committer(self) -> GroupCommitter:
        return self._committer

    def insert(self, table: Table) -> Any:
        """An INSERT construct that supports `on_conflict_do_nothing` on both dialects."""
        if self.is_postgres:
            return postgresql.insert(table)
        return sqlite.insert(table)

    def bulk_insert(
        self,
        conn: Connection,
        table: Table,
        columns: list[str],
        rows: list[tuple[Any, ...]],
        *,
        constants: dict[str, Any] | None = None,
        skip_conflicts_on: str | None = None,
    ) -> int:
        """Insert many rows, in order, through the driver, skipping SQLAlchemy's per-row
        parameter processing (several times faster for large batches). Rows that conflict on
        the unique column `skip_conflicts_on` are skipped. Returns how many were inserted
        (both drivers sum an executemany's row counts).

        `constants`: values shared by every row, written into the statement as literals
        (rendered and quoted by SQLAlchemy) rather than bound again for each row, which saves
        about a fifth of SQLite's time over 100,000 rows.

        Each statement carries up to `_BULK_PARAMS` parameters' worth of rows (`VALUES (...),
        (...), ...`): the driver's per-execution cost is paid once per few hundred rows, not
        once per row, which halves SQLite's time to insert 100,000 rows.
        """
        if not rows:
            return 0
        name = f"{PG_SCHEMA}.{table.name}" if self.is_postgres else table.name
        marker = "%s" if self.is_postgres else "?"
        values = [marker] * len(columns)
        names = list(columns)
        for column, value in (constants or {}).items():
            names.append(column)
            values.append(self._literal(table, column, value))
        one_row = f"({', '.join(values)})"
        suffix = f" ON CONFLICT ({skip_conflicts_on}) DO NOTHING" if skip_conflicts_on else ""

        def statement(n_rows: int) -> str:
            tuples = ", ".join([one_row] * n_rows)
            return f"INSERT INTO {name} ({', '.join(names)}) VALUES {tuples}{suffix}"

        per_statement = max(1, _BULK_PARAMS // len(columns))
        full = len(rows) - len(rows) % per_statement
        inserted = 0
        if full:
            flat = [value for row in rows[:full] for value in row]
            width = per_statement * len(columns)
            groups = [tuple(flat[i : i + width]) for i in range(0, len(flat), width)]
            inserted += conn.exec_driver_sql(statement(per_statement), groups).rowcount
        if full < len(rows):
            rest = tuple(value for row in rows[full:] for value in row)
            inserted += conn.exec_driver_sql(statement(len(rows) - full), rest).rowcount
        return inserted

    def _literal(self, table: Table, column: str, value: Any) -> str:
        bound = literal(value, type_=table.c[column].type)
        compiled = bound.compile(
            dialect=self.engine.dialect, compile_kwargs={"literal_binds": True}
        )
        return str(compiled)

    def lock_queue_row(self, conn: Connection, queue_name: str) -> dict[str, Any] | None:
        """Read a queue's row, holding its row lock until commit on PostgreSQL."""
        stmt = _LOCK_QUEUE_ROW if self.is_postgres else _READ_QUEUE_ROW
        row = conn.execute(stmt, {"q": queue_name}).mappings().first()
        return dict(row) if row is not None else None

    def advisory_lock(self, conn: Connection, key: int) -> None:
        """Serialize schema set-up between processes (SQLite: BEGIN IMMEDIATE already does)."""
        if self.is_postgres:
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})

    # -- notifications --------------------------------------------------------------------------

    def payload(self, message: str) -> str:
        """A notification payload tagged with this Database's origin, so that `listen` can skip
        what this process sent itself (it wakes its own threads directly)."""
        return f"{self.origin}|{message}"

    def notify(self, conn: Connection, message: str) -> None:
        """Send a notification that is delivered when the transaction commits (PostgreSQL only)."""
        if self.notifications:
            conn.execute(
                text("SELECT pg_notify(:c, :p)"), {"c": NOTIFY_CHANNEL, "p": self.payload(message)}
            )

    def notify_many(self, conn: Connection, messages: Sequence[str]) -> None:
        """`notify` for many messages, in one statement (a cancel of a big batch sent one
        round trip per workflow)."""
        if self.notifications and messages:
            conn.execute(
                text("SELECT pg_notify(:c, p) FROM unnest(CAST(:ps AS text[])) AS p"),
                {"c": NOTIFY_CHANNEL, "ps": [self.payload(m) for m in messages]},
            )

    def server_time_ms(self) -> int | None:
        """The database server's clock in epoch milliseconds (PostgreSQL), to compare this
        machine's with (see `core/clock_skew.py`); None on SQLite, whose processes all share
        this machine's clock."""
        if not self.is_postgres:
            return None
        with self.read() as conn:
            return int(conn.execute(_SERVER_NOW_MS).scalar_one())

    def dispose(self) -> None:
        """Close every pooled connection (and stop SQLite's checkpointing thread)."""
        if self._checkpointer is not None:
            self._checkpointer.stop()
        with self._idle_single_lock:
            idle, self._idle_single = self._idle_single, []
        if self._idle_single_pid == current_pid():
            for fairy in idle:
                fairy.close()
        if self._hot is not None:
            pid, fairy = self._hot
            self._hot = None
            if pid == current_pid():
                fairy.close()
        for engine in self._engines:
            engine.dispose()


class _SingleUse:
    """`Database.driver_single`'s block (a class: a generator's context manager costs several
    times more, and this one runs one to three times per workflow)."""

    __slots__ = ("_conn", "_db", "_fairy")

    def __init__(self, db: Database) -> None:
        self._db = db
        self._fairy: Any = None
        self._conn: Any = None

    def __enter__(self) -> Any:
        self._fairy = fairy = self._db._take_single()
        try:
            self._conn = fairy.driver_connection
        except BaseException:  # Ctrl-C on the way: the connection goes back to the pool
            fairy.close()
            raise
        return self._conn

    def __exit__(self, _type: object, exc: BaseException | None, _tb: object) -> None:
        if exc is None:
            self._db._give_back_single(self._fairy, self._conn)
        else:
            self._db._drop_single(self._fairy, exc)  # raises a driver's error as SQLAlchemy's
