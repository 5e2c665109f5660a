"""How dbos_nb's connections are set up when they open.

SQLite: dbos_nb takes transaction control from the sqlite3 module (writers begin with BEGIN
IMMEDIATE), and sets WAL mode and its pragmas. PostgreSQL: dbos_nb's own sessions get settings of
their own (see `Database`), and keep the values they replaced so that application transactions
run with the server's.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, Engine, TextClause, event, text
from sqlalchemy.pool import ConnectionPoolEntry

from dbos_nb.storage.checkpointer import FALLBACK_PAGES

# The execution option that marks a connection's transaction as a writer's (SQLite: BEGIN
# IMMEDIATE).
WRITE_OPTION = "dbos_nb_write"


def install_sqlite_hooks(engine: Engine) -> None:
    """Take over transaction control from the sqlite3 module and set WAL mode.

    sqlite3's own implicit BEGIN is deferred; two deferred writers that both read first deadlock
    on the upgrade to a write lock and one fails with "database is locked" at once, ignoring the
    busy timeout. Writers here start with BEGIN IMMEDIATE instead and wait their turn.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout=60000")
        # WAL lets readers run beside the writer and other processes share the file.
        enable_wal(cursor)
        # synchronous=NORMAL: a commit survives a crash of the process (the case dbos_nb guards
        # against) but not of the operating system, in exchange for no fsync per commit.
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        # 64 MiB of page cache: bulk enqueues touch many index pages in one transaction.
        cursor.execute("PRAGMA cache_size=-65536")
        # The process's checkpointing thread copies the log back (`checkpointer.py`); a commit
        # does it itself only past this many pages.
        cursor.execute(f"PRAGMA wal_autocheckpoint={FALLBACK_PAGES}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        if conn.get_execution_options().get(WRITE_OPTION):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")


def enable_wal(cursor: Any) -> None:
    # Switching a new file to WAL takes an exclusive lock, and SQLite can answer BUSY there
    # without waiting on the busy timeout when several processes open the file at once.
    for attempt in range(200):
        try:
            mode = cursor.execute("PRAGMA journal_mode=WAL").fetchone()
            if mode and str(mode[0]).lower() == "wal":
                return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
        time.sleep(0.01 * min(attempt + 1, 10))
    raise sqlite3.OperationalError("could not switch the SQLite database to WAL mode")


def set_config(settings: list[tuple[str, str]], local: bool) -> TextClause:
    """One statement setting each (name, value), for the session or the transaction (`local`);
    names are dbos_nb's own, values its own or read from the server (quoted)."""
    flag = "true" if local else "false"
    calls = ", ".join(
        f"set_config('{name}', '{value.replace(chr(39), chr(39) * 2)}', {flag})"
        for name, value in settings
    )
    return text(f"SELECT {calls}")


# Where a connection keeps the server's values of the settings dbos_nb changed in its session.
SERVER_SETTINGS = "dbos_nb_server_settings"


def session_settings(
    settings: list[tuple[str, str]],
) -> Callable[[Any, ConnectionPoolEntry], None]:
    """A connect hook that sets each new session's settings (in a statement rather than as
    startup options, which connection poolers such as PgBouncer refuse), keeping the values
    they replace (the server's, the database's or the role's) for application transactions."""
    names = ", ".join(f"current_setting('{name}')" for name, _ in settings)
    sql = str(set_config(settings, False))

    def on_connect(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        with dbapi_connection.cursor() as cur:
            cur.execute(f"SELECT {names}")
            row = cur.fetchone()
            cur.execute(sql)
        dbapi_connection.commit()
        record.info[SERVER_SETTINGS] = [
            (name, str(value)) for (name, _), value in zip(settings, row, strict=True)
        ]

    return on_connect
