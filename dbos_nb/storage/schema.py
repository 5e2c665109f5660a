"""The tables of the system database and of the application database (SQLAlchemy Core).

Times are integer epoch milliseconds. Tables carry no schema name; on PostgreSQL the `Database`
maps them into the `dbos_nb` schema with `schema_translate_map`, on SQLite they live in the file.

`workflow_status.id` is an autoincrementing surrogate key whose only job is to record enqueue order:
FIFO claims sort on it, which timestamps cannot do (two enqueues in one millisecond tie).
"""

from __future__ import annotations

import hashlib

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    literal_column,
    text,
)
from sqlalchemy.sql.elements import ColumnElement

from dbos_nb.models import ACTIVE_STATUSES

SCHEMA_VERSION = 9
# The application database's own tables (transactions' checkpoints), versioned apart.
APP_SCHEMA_VERSION = 2
PG_SCHEMA = "dbos_nb"
# The active statuses as the SQL list that `status_is(column, *ACTIVE_STATUSES)` writes.
_ACTIVE = ", ".join(f"'{status}'" for status in ACTIVE_STATUSES)

# SQLite only autoincrements an INTEGER PRIMARY KEY (an alias of rowid).
_AutoId = BigInteger().with_variant(Integer(), "sqlite")

system_metadata = MetaData()


def _partial(name: str, columns: list[str], where: str, unique: bool = False) -> list[Index]:
    """An index over the rows matching `where` only, on both SQLite and PostgreSQL."""
    return [
        Index(name, *columns, unique=unique, sqlite_where=text(where), postgresql_where=text(where))
    ]


def status_is(column: Column[str], *statuses: str) -> ColumnElement[bool]:
    """`column = 'X'` (or `IN (...)`) with the statuses spelled as SQL literals, not parameters.

    Statuses are constants of the code, and the planners need to see them: PostgreSQL's generic
    plan of a prepared statement (psycopg prepares one after five runs) cannot tell a rare status
    from a common one behind a parameter, and scanned the whole table for the few waiting rows
    of a queue; and a partial index `WHERE status = 'X'` serves only a query that spells the
    same literal (on SQLite too).
    """
    for status in statuses:
        if not status.isidentifier():
            raise ValueError(f"not a workflow status: {status!r}")
    if len(statuses) == 1:
        return column == literal_column(f"'{statuses[0]}'", String)
    return column.in_([literal_column(f"'{s}'", String) for s in statuses])


workflow_status = Table(
    "workflow_status",
    system_metadata,
    Column("id", _AutoId, primary_key=True, autoincrement=True),
    Column("workflow_uuid", String(255), nullable=False, unique=True),
    Column("status", String(40), nullable=False),
    Column("name", String(512), nullable=False),
    Column("class_name", String(512)),
    Column("config_name", String(512)),
    Column("inputs", LargeBinary),
    Column("output", LargeBinary),
    Column("error", LargeBinary),
    Column("executor_id", String(255)),
    Column("application_version", String(255)),
    Column("recovery_attempts", Integer, nullable=False, server_default=text("0")),
    Column("created_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
    Column("completed_at", BigInteger),
    Column("queue_name", String(255)),
    Column("priority", Integer, nullable=False, server_default=text("0")),
    Column("deduplication_id", String(512)),
    Column("started_at_epoch_ms", BigInteger),
    Column("workflow_timeout_ms", BigInteger),
    Column("workflow_deadline_epoch_ms", BigInteger),
    Column("parent_workflow_id", String(255)),
    Column("owner_xid", String(64)),
    Column("authenticated_user", String(255)),
    Column("assumed_role", String(255)),
    Column("authenticated_roles", Text),
    # The batch the row was enqueued in, as `batch_key(batch_id)` (version 7): eight bytes in
    # the row and in `ix_ws_batch`, where the batch id itself (37 characters for a uuid-based
    # one) made every item of an `enqueue_many` write about seventy bytes more. The id stays
    # readable from the item's own id (`<batch_id>/<index>`) and from `batches`.
    Column("batch_key", BigInteger),
    # The version (content hash) of the function this workflow was started or enqueued with.
    Column("function_hash", String(64)),
    # Token budget: the estimate a claim counts, and the usage the workflow's steps reported.
    Column("token_estimate", Integer),
    Column("usage_tokens", BigInteger),
    Column("usage_cost", Float),
    # Fork lineage, as DBOS keeps it: the workflow this one is a fork of, and whether any
    # fork has been made of this one (version 5).
    Column("forked_from", String(255)),
    Column("was_forked_from", Boolean, nullable=False, server_default=text("false")),
    # The partition of a partitioned queue the workflow was enqueued in (version 9), as DBOS's
    # `SetEnqueueOptions(queue_partition_key=...)` gives it: the queue's partition_* limits
    # apply to each partition apart.
    Column("queue_partition_key", String(255)),
    Index("ix_ws_queue_claim", "queue_name", "status", "priority", "id"),
    # A claim on a queue without priority takes the oldest waiting rows: this index gives them
    # in order, where the one above would make the database sort every waiting row of the
    # queue at each claim. Only waiting rows are in it, so a direct start or a finish never
    # touches it. (PostgreSQL's generic plans of prepared statements use it only when the
    # query spells `status = 'ENQUEUED'` as a literal.)
    *_partial("ix_ws_queue_fifo", ["queue_name", "id"], "status = 'ENQUEUED'"),
    # Partial indexes: a plain enqueued row (no deadline, parent or dedup id) updates none of
    # them, which keeps bulk enqueues fast.
    *_partial("ix_ws_pending_executor", ["executor_id"], "status = 'PENDING'"),
    *_partial("ix_ws_parent", ["parent_workflow_id"], "parent_workflow_id IS NOT NULL"),
    *_partial(
        "ix_ws_dedup",
        ["queue_name", "deduplication_id"],
        "deduplication_id IS NOT NULL",
        unique=True,
    ),
    # The scheduler's sweep for workflows past their deadline (ten times a second while work
    # runs): only active rows, so that it does not read again every finished workflow that
    # ever had a timeout (version 2's index held them all: 50,000 finished rows made each
    # sweep cost 10 ms, see benchmarks/bench_sweep.py). The query must spell the same status
    # literals, in the same order (SQLite matches the terms as written).
    *_partial(
        "ix_ws_active_deadline",
        ["workflow_deadline_epoch_ms"],
        f"workflow_deadline_epoch_ms IS NOT NULL AND status IN ({_ACTIVE})",
    ),
    *_partial("ix_ws_batch", ["batch_key", "status"], "batch_key IS NOT NULL"),
    # A partitioned queue's claim (version 9): the partitions that hold waiting work, and
    # each one's oldest waiting rows, without reading the rest of a deep backlog.
    *_partial(
        "ix_ws_partition_fifo", ["queue_name", "queue_partition_key", "id"], "status = 'ENQUEUED'"
    ),
)

# A batch enqueued with `enqueue_many(..., batch_id=...)` / `queue.map(..., batch=...)`, so that it
# can be found again by name after a restart.
batches = Table(
    "batches",
    system_metadata,
    Column("batch_id", String(255), primary_key=True),
    Column("queue_name", String(255), nullable=False),
    Column("function_name", String(512), nullable=False),
    Column("size", Integer, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    # sha256 (hex) of the batch's serialized calls, kept by the notebook's map(): the same
    # name with other items is refused rather than attached to the old batch.
    Column("items_digest", String(64)),
    # `batch_key(batch_id)` (version 7), what the batch's rows carry. Unique: a batch id whose
    # key another batch holds already (one chance in 2**63) is refused, so a key names one
    # batch. Nullable as SQLite adds a NOT NULL column to an old table only with a default;
    # the upgrade fills it in.
    Column("batch_key", BigInteger),
    Index("ux_batches_key", "batch_key", unique=True),
)


def batch_key(batch_id: str) -> int:
    """The 64-bit key that a batch's rows carry: derived from the id, so the same batch id has
    the same key in every process and database, and no counter is shared between writers."""
    digest = hashlib.blake2b(batch_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


operation_outputs = Table(
    "operation_outputs",
    system_metadata,
    Column("workflow_uuid", String(255), nullable=False),
    Column("function_id", Integer, nullable=False),
    Column("function_name", String(512), nullable=False),
    Column("output", LargeBinary),
    Column("error", LargeBinary),
    Column("child_workflow_id", String(255)),
    Column("started_at_epoch_ms", BigInteger),
    Column("completed_at_epoch_ms", BigInteger),
    PrimaryKeyConstraint("workflow_uuid", "function_id"),
)

queues = Table(
    "queues",
    system_metadata,
    Column("name", String(255), primary_key=True),
    Column("concurrency", Integer),
    Column("worker_concurrency", Integer),
    Column("rate_limit", Integer),
    Column("rate_period_ms", BigInteger),
    Column("priority_enabled", Boolean, nullable=False, server_default=text("false")),
    Column("polling_interval_ms", Integer, nullable=False, server_default=text("1000")),
    Column("token_limit", BigInteger),
    Column("token_period_ms", BigInteger),
    # Limits that apply to each partition of the queue apart (version 9); any of them set
    # makes the queue partitioned.
    Column("partition_concurrency", Integer),
    Column("partition_worker_concurrency", Integer),
    Column("partition_rate_limit", Integer),
    Column("partition_rate_period_ms", BigInteger),
    # Shared back-off: no process starts work from this queue before this time (after a 429).
    Column("paused_until_ms", BigInteger),
    Column("updated_at", BigInteger, nullable=False),
)

# The rate limiter's ledger: one row per start, kept apart from workflow rows so that a workflow
# that is recovered and started again still counts its first start against the window.
queue_starts = Table(
    "queue_starts",
    system_metadata,
    Column("id", _AutoId, primary_key=True, autoincrement=True),
    Column("queue_name", String(255), nullable=False),
    Column("started_at_ms", BigInteger, nullable=False),
    Column("workflow_uuid", String(255), nullable=False),
    # Tokens counted against the queue's token budget: the estimate, then the reported usage.
    Column("tokens", BigInteger, nullable=False, server_default=text("0")),
    # The start's partition, on a partitioned queue (version 9): a partition_limiter counts
    # the starts of each partition apart.
    Column("partition_key", String(255)),
    Index("ix_qs_queue_time", "queue_name", "started_at_ms"),
)

executors = Table(
    "executors",
    system_metadata,
    Column("executor_id", String(255), primary_key=True),
    Column("hostname", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("token", String(64), nullable=False),
    Column("started_at", BigInteger, nullable=False),
    Column("heartbeat_at", BigInteger, nullable=False),
    # The executor's own lease (version 5): others judge its heartbeat against this, not
    # against theirs, so that a process started with a shorter lease never takes the work of
    # a live one that renews less often. NULL for rows registered before (judged by the
    # judge's lease, as then).
    Column("lease_ms", BigInteger),
)

# The function versions an executor cannot load (a module missing where it runs, say), with why
# (version 6): its own log says so, and a notebook waiting on that work reads it here. Rows
# go with their executor's row.
load_failures = Table(
    "load_failures",
    system_metadata,
    Column("executor_id", String(255), nullable=False),
    Column("name", String(512), nullable=False),
    Column("version", String(64), nullable=False),
    Column("reason", Text, nullable=False),
    Column("recorded_at", BigInteger, nullable=False),
    PrimaryKeyConstraint("executor_id", "version"),
)

# The functions some process has registered, so that a client can refuse unknown workflow names.
functions = Table(
    "functions",
    system_metadata,
    Column("name", String(512), primary_key=True),
    Column("kind", String(20), nullable=False),
    Column("module", String(512)),
    Column("source_hash", String(64)),
    Column("updated_at", BigInteger, nullable=False),
)

# Every version of every registered function, cloudpickled, so that a worker process that never
# saw the notebook can run exactly the version a workflow was enqueued with.
function_versions = Table(
    "function_versions",
    system_metadata,
    Column("name", String(512), nullable=False),
    Column("hash", String(64), nullable=False),
    Column("kind", String(20), nullable=False),
    Column("module", String(512)),
    Column("payload", LargeBinary, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    PrimaryKeyConstraint("name", "hash"),
)

schema_migrations = Table(
    "schema_migrations",
    system_metadata,
    Column("version", Integer, primary_key=True),
    Column("applied_at", BigInteger, nullable=False),
)

app_metadata = MetaData()

# Lives in the application database so that a transaction's checkpoint commits with its writes.
transaction_outputs = Table(
    "transaction_outputs",
    app_metadata,
    Column("workflow_uuid", String(255), nullable=False),
    Column("function_id", Integer, nullable=False),
    Column("function_name", String(512), nullable=False),
    Column("output", LargeBinary),
    Column("error", LargeBinary),
    Column("created_at", BigInteger, nullable=False),
    PrimaryKeyConstraint("workflow_uuid", "function_id"),
)

app_schema_migrations = Table(
    "app_schema_migrations",
    app_metadata,
    Column("version", Integer, primary_key=True),
    Column("applied_at", BigInteger, nullable=False),
)
