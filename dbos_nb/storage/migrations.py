"""Creating and upgrading the schema, safely when several processes start at once.

Each process calls `migrate()` at launch. The whole check-and-create runs in one write transaction
that first takes a lock (a PostgreSQL advisory lock; SQLite's BEGIN IMMEDIATE), so a second process
starting at the same moment waits, then finds the schema in place. DDL is transactional on both
databases, so a crash half-way leaves nothing behind.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy import Connection, func, inspect, select, text

from dbos_nb.clock import SystemClock
from dbos_nb.errors import DBOSConfigError
from dbos_nb.processes import may_still_run
from dbos_nb.storage.database import Database, shown_url
from dbos_nb.storage.schema import (
    APP_SCHEMA_VERSION,
    PG_SCHEMA,
    SCHEMA_VERSION,
    app_metadata,
    app_schema_migrations,
    batch_key,
    batches,
    executors,
    schema_migrations,
    system_metadata,
    transaction_outputs,
    workflow_status,
)

logger = logging.getLogger(__name__)

# Arbitrary constants that name our advisory locks.
_SYSTEM_LOCK_KEY = 7_112_025_001
_APP_LOCK_KEY = 7_112_025_002

# version -> step that upgrades a database from version - 1. A fresh database gets the newest
# tables from `create_all` and is stamped with SCHEMA_VERSION, so steps only serve old databases.
UPGRADES: dict[int, Callable[[Connection], None]] = {}


def _add_fifo_index(conn: Connection) -> None:
    """Version 2: the partial index that gives a queue's waiting rows in FIFO order."""
    for index in workflow_status.indexes:
        if index.name == "ix_ws_queue_fifo":
            index.create(conn, checkfirst=True)


UPGRADES[2] = _add_fifo_index


def _prefix(conn: Connection) -> str:
    """What qualifies a table or index name in SQL: dbos_nb's schema on PostgreSQL."""
    return f"{PG_SCHEMA}." if conn.dialect.name == "postgresql" else ""


def _active_deadline_index(conn: Connection) -> None:
    """Version 3: the deadline index holds active workflows only (it held every workflow that
    ever had a deadline, which the scheduler's sweep read again ten times a second)."""
    conn.execute(text(f"DROP INDEX IF EXISTS {_prefix(conn)}ix_ws_deadline"))
    for index in workflow_status.indexes:
        if index.name == "ix_ws_active_deadline":
            index.create(conn, checkfirst=True)


UPGRADES[3] = _active_deadline_index


def _columns(conn: Connection, table: str) -> set[str]:
    schema = PG_SCHEMA if conn.dialect.name == "postgresql" else None
    return {c["name"] for c in inspect(conn).get_columns(table, schema=schema)}


def _add_column(conn: Connection, table: str, column: str, sql_type: str) -> None:
    """Add a column to a table of an old database, unless a crashed upgrade's retry finds it."""
    if column not in _columns(conn, table):
        conn.execute(text(f"ALTER TABLE {_prefix(conn)}{table} ADD COLUMN {column} {sql_type}"))


def _batch_items_digest(conn: Connection) -> None:
    """Version 4: batches keep a digest of their items (NULL for batches made before)."""
    _add_column(conn, "batches", "items_digest", "VARCHAR(64)")


UPGRADES[4] = _batch_items_digest


def _fork_lineage_and_executor_leases(conn: Connection) -> None:
    """Version 5: a workflow records the workflow it was forked from, and whether it was forked
    (unknown for forks made before: NULL and false); an executor records its own lease (NULL
    for executors registered before: judged by the judge's lease)."""
    _add_column(conn, "workflow_status", "forked_from", "VARCHAR(255)")
    _add_column(conn, "workflow_status", "was_forked_from", "BOOLEAN NOT NULL DEFAULT false")
    _add_column(conn, "executors", "lease_ms", "BIGINT")


UPGRADES[5] = _fork_lineage_and_executor_leases


def _load_failures(conn: Connection) -> None:
    """Version 6: the load_failures table, which `create_all` (run before the upgrades) has
    just created; nothing else changes."""


UPGRADES[6] = _load_failures


def _batch_keys(conn: Connection) -> None:
    """Version 7: a batch's rows carry the batch's 64-bit key, `batch_key(batch_id)`, in place
    of the batch id itself (which made each item of a large batch write about seventy bytes
    more, in the row and in its index); `batches` records each batch's key."""
    prefix = _prefix(conn)
    ws_table, batches_table = f"{prefix}workflow_status", f"{prefix}batches"
    _add_column(conn, "batches", "batch_key", "BIGINT")
    _add_column(conn, "workflow_status", "batch_key", "BIGINT")

    def set_keys(table: str, select_ids: str) -> None:
        for batch_id in list(conn.execute(text(select_ids)).scalars()):
            conn.execute(
                text(f"UPDATE {table} SET batch_key = :k WHERE batch_id = :b"),
                {"k": batch_key(batch_id), "b": batch_id},
            )

    set_keys(batches_table, f"SELECT batch_id FROM {batches_table}")
    if "batch_id" in _columns(conn, "workflow_status"):
        # Every batch id the rows name (each was recorded with its batch, but the rows are
        # what the key must reach), through the old index on it, which then goes.
        set_keys(ws_table, f"SELECT DISTINCT batch_id FROM {ws_table} WHERE batch_id IS NOT NULL")
        conn.execute(text(f"DROP INDEX IF EXISTS {prefix}ix_ws_batch"))
        conn.execute(text(f"ALTER TABLE {ws_table} DROP COLUMN batch_id"))
    for table in (workflow_status, batches):
        for index in table.indexes:
            if index.name in ("ix_ws_batch", "ux_batches_key"):
                index.create(conn, checkfirst=True)


UPGRADES[7] = _batch_keys


def _renumber_operations(conn: Connection, table: str) -> None:
    """Add 1 to every recorded operation number of `table` (operations were numbered from 0;
    DBOS numbers them from 1). In two passes through negative numbers: both databases check the
    primary key row by row, so a single `+ 1` collides with the next row not yet moved."""
    table = _prefix(conn) + table
    conn.execute(text(f"UPDATE {table} SET function_id = -(function_id + 1)"))
    conn.execute(text(f"UPDATE {table} SET function_id = -function_id"))


# The lease of an executor registered without one (before schema version 5): the default.
_LEGACY_LEASE_MS = 30_000


def _refuse_while_executors_run(conn: Connection, change: str) -> None:
    """Refuse an upgrade while processes of the older dbos_nb may still run on the database:
    they would go on writing as before (here: numbering operations from 0, so that a record
    they write lands on another operation's number, and a replay returns the wrong step's
    value). Live: a heartbeat within the executor's lease, unless its process is known dead
    (this host, its pid gone), or is this one (an earlier launch in this process)."""
    now = SystemClock().now_ms()
    live = [
        f"{row.executor_id!r} (process {row.pid} on {row.hostname}, heartbeat "
        f"{(now - row.heartbeat_at) / 1000:.1f} s ago)"
        for row in conn.execute(
            select(
                executors.c.executor_id,
                executors.c.hostname,
                executors.c.pid,
                executors.c.heartbeat_at,
                func.coalesce(executors.c.lease_ms, _LEGACY_LEASE_MS).label("lease_ms"),
            )
        )
        if may_still_run(row.hostname, row.pid, now - row.heartbeat_at, row.lease_ms)
    ]
    if live:
        raise DBOSConfigError(
            f"this dbos_nb upgrades the database ({change}), but executors of the older "
            f"dbos_nb still run on it: {', '.join(live)}. Stop them, then launch again (a "
            "process that died on another machine counts as stopped once its lease has passed)"
        )


def _operations_from_one(conn: Connection) -> None:
    """Version 8: operations are numbered from 1, as in DBOS. A workflow that was running when
    its database was upgraded replays against its records, renumbered here; the children it
    already started keep their ids (recorded with the operation that started them)."""
    _refuse_while_executors_run(conn, "operations are now numbered from 1")
    _renumber_operations(conn, "operation_outputs")


UPGRADES[8] = _operations_from_one


def _partitions(conn: Connection) -> None:
    """Version 9: partitioned queues. A workflow records its partition key, a queue its
    per-partition limits, a rate limiter's start its partition (NULL for all before: no queue
    was partitioned)."""
    _add_column(conn, "workflow_status", "queue_partition_key", "VARCHAR(255)")
    _add_column(conn, "queues", "partition_concurrency", "INTEGER")
    _add_column(conn, "queues", "partition_worker_concurrency", "INTEGER")
    _add_column(conn, "queues", "partition_rate_limit", "INTEGER")
    _add_column(conn, "queues", "partition_rate_period_ms", "BIGINT")
    _add_column(conn, "queue_starts", "partition_key", "VARCHAR(255)")
    for index in workflow_status.indexes:
        if index.name == "ix_ws_partition_fifo":
            index.create(conn, checkfirst=True)


UPGRADES[9] = _partitions

# The same for the application database's tables (version 1: unversioned, before version 2).
APP_UPGRADES: dict[int, Callable[[Connection], None]] = {
    2: lambda conn: _renumber_operations(conn, transaction_outputs.name),
}


def migrate(db: Database) -> None:
    """Bring the system database's schema to SCHEMA_VERSION (idempotent, concurrency-safe)."""
    with db.opening(), db.write() as conn:
        db.advisory_lock(conn, _SYSTEM_LOCK_KEY)
        _ensure_pg_schema(db, conn)
        system_metadata.create_all(conn, checkfirst=True)
        current = conn.execute(select(func.max(schema_migrations.c.version))).scalar()
        if current is None:
            _stamp(conn, SCHEMA_VERSION)
            logger.info("created dbos_nb schema version %d", SCHEMA_VERSION)
            return
        if current > SCHEMA_VERSION:
            raise _newer(current)
        for version in range(current + 1, SCHEMA_VERSION + 1):
            UPGRADES[version](conn)
            _stamp(conn, version)
            logger.info("upgraded dbos_nb schema to version %d", version)


def check_schema(db: Database) -> None:
    """For a process that only reads (`dbos-nb status`, `workflows`): check that the database
    holds this installation's schema, writing nothing.

    An older schema is refused rather than upgraded or read: upgrading is a write a reader has
    no business making (and installations of the older version refuse the database after it),
    and the reader's queries name columns the older schema lacks. A process that runs work
    (the application, a `dbos-nb worker`) upgrades it at launch.
    """
    shown = db.path or shown_url(db.url)
    schema = PG_SCHEMA if db.is_postgres else None
    with db.opening(), db.read() as conn:
        if not inspect(conn).has_table(schema_migrations.name, schema=schema):
            raise DBOSConfigError(
                f"{shown} holds no dbos_nb database (no application or worker has launched "
                "on it): check the URL"
            )
        current = conn.execute(select(func.max(schema_migrations.c.version))).scalar()
    if current is None:
        raise DBOSConfigError(f"{shown} holds a dbos_nb database that was never set up")
    if current > SCHEMA_VERSION:
        raise _newer(current)
    if current < SCHEMA_VERSION:
        raise DBOSConfigError(
            f"the database {shown} has dbos_nb schema version {current}, older than this "
            f"installation's {SCHEMA_VERSION}: it needs an upgrade, which the application's "
            "launch or a `dbos-nb worker` on it makes (after which older installations of "
            "dbos_nb refuse it); inspection commands only read, so they do not upgrade it"
        )


def _newer(
    current: int, which: str = "database", installed: int = SCHEMA_VERSION
) -> DBOSConfigError:
    return DBOSConfigError(
        f"the {which} has dbos_nb schema version {current}, newer than this "
        f"installation's {installed}; upgrade dbos_nb"
    )


def migrate_app(db: Database) -> None:
    """Create the application database's checkpoint table for transactions, or bring it to
    APP_SCHEMA_VERSION (idempotent, concurrency-safe). It is versioned apart from the system
    database, which may be another database."""
    with db.opening(), db.write() as conn:
        db.advisory_lock(conn, _APP_LOCK_KEY)
        _ensure_pg_schema(db, conn)
        schema = PG_SCHEMA if db.is_postgres else None
        had_checkpoints = inspect(conn).has_table(transaction_outputs.name, schema=schema)
        app_metadata.create_all(conn, checkfirst=True)
        current = conn.execute(select(func.max(app_schema_migrations.c.version))).scalar()
        if current is None:
            # A fresh table, or checkpoints written before the table was versioned (version 1).
            current = 1 if had_checkpoints else APP_SCHEMA_VERSION
            if current == APP_SCHEMA_VERSION:
                _stamp_app(conn, current)
        if current > APP_SCHEMA_VERSION:
            raise _newer(current, "application database", APP_SCHEMA_VERSION)
        for version in range(current + 1, APP_SCHEMA_VERSION + 1):
            APP_UPGRADES[version](conn)
            _stamp_app(conn, version)
            logger.info("upgraded the application database's dbos_nb tables to version %d", version)


def _ensure_pg_schema(db: Database, conn: Connection) -> None:
    if db.is_postgres:
        conn.execute(text(f"CREATE SCHEMA IF NOT EXISTS {PG_SCHEMA}"))


def _stamp_app(conn: Connection, version: int) -> None:
    conn.execute(
        app_schema_migrations.insert().values(version=version, applied_at=SystemClock().now_ms())
    )


def _stamp(conn: Connection, version: int) -> None:
    conn.execute(
        schema_migrations.insert().values(version=version, applied_at=SystemClock().now_ms())
    )
