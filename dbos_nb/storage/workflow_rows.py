"""Workflow rows: writing a workflow (a direct start or an enqueue), recording its outcome,
reading and listing rows, counting them by status.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    ARRAY,
    BigInteger,
    ColumnElement,
    Executable,
    Integer,
    String,
    any_,
    bindparam,
    case,
    exists,
    func,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from dbos_nb.errors import DBOSQueueDeduplicatedError
from dbos_nb.models import ACTIVE_STATUSES
from dbos_nb.storage import merged
from dbos_nb.storage.database import DONES_CHANNEL, NOTIFY_CHANNEL, Database
from dbos_nb.storage.queue_records import unshared_now
from dbos_nb.storage.rows import (
    ENQUEUED,
    MAX_RECOVERY_ATTEMPTS_EXCEEDED,
    PENDING,
    NewWorkflow,
    StoreBase,
    _row_values,
    in_batch,
)
from dbos_nb.storage.schema import (
    operation_outputs,
    queues,
    status_is,
    workflow_status,
)

ws = workflow_status
oo = operation_outputs


_FINISH = (
    update(ws)
    .where(
        ws.c.workflow_uuid == bindparam("b_wid"),
        status_is(ws.c.status, PENDING),
        ws.c.owner_xid == bindparam("b_owner"),
    )
    .values(
        status=bindparam("b_status"),
        output=bindparam("b_output"),
        error=bindparam("b_error"),
        updated_at=bindparam("b_now"),
        completed_at=bindparam("b_now"),
        deduplication_id=None,
    )
    .returning(ws.c.workflow_uuid, ws.c.queue_name)
)

# PostgreSQL: the outcome and its notifications in one statement (one round trip, atomic). The
# end of a workflow of a queue with a global concurrency limit also wakes the schedulers of
# every process, since it frees a slot that they may wait for; on any other queue nobody waits
# for it (a process's own limit is its own: its scheduler is woken directly), and each process
# was woken for nothing. Its end is announced on the dones channel (see `listener`).
_finished = _FINISH.cte("finished")
_wake = case(
    (
        exists().where(
            queues.c.name == _finished.c.queue_name,
            or_(queues.c.concurrency.is_not(None), queues.c.partition_concurrency.is_not(None)),
        ),
        func.pg_notify(
            bindparam("b_channel"), bindparam("b_origin") + literal("q:") + _finished.c.queue_name
        ),
    )
)
_FINISH_AND_NOTIFY = select(
    _finished.c.workflow_uuid,
    _finished.c.queue_name,
    func.pg_notify(
        bindparam("b_done_channel"),
        bindparam("b_origin") + literal("done:") + _finished.c.workflow_uuid,
    ),
    _wake,
)
# The same without its own `done:`: in a batch, finishes are announced together.
_FINISH_AND_WAKE = select(_finished.c.workflow_uuid, _finished.c.queue_name, _wake)

# What a waiter reads: status, output, error, deadline, completion time.
_STATUS_AND_RESULT = select(
    ws.c.status,
    ws.c.output,
    ws.c.error,
    ws.c.workflow_deadline_epoch_ms,
    ws.c.completed_at,
).where(ws.c.workflow_uuid == bindparam("wid", type_=String))
_STATUS_AND_RESULT_KEYS = tuple(_STATUS_AND_RESULT.selected_columns.keys())

# What `first_ended` and `first_missing` read. PostgreSQL takes the ids as one array (`= ANY`):
# one statement whatever their number, its text the same each time. SQLite has no arrays: an
# `IN` list per chunk of ids (builds before 3.32 take at most 999 parameters in a statement).
_ENDED_AT = func.coalesce(ws.c.completed_at, ws.c.updated_at)


def _among(postgres: bool) -> ColumnElement[bool]:
    if postgres:
        return ws.c.workflow_uuid == any_(bindparam("ids", type_=ARRAY(String)))
    return ws.c.workflow_uuid.in_(bindparam("ids", expanding=True))


_FIRST_ENDED = {
    postgres: select(ws.c.workflow_uuid, _ENDED_AT)
    .where(_among(postgres), ~status_is(ws.c.status, *ACTIVE_STATUSES))
    .order_by(_ENDED_AT)
    .limit(1)
    for postgres in (False, True)
}
_EXISTING = {
    postgres: select(ws.c.workflow_uuid).where(_among(postgres)) for postgres in (False, True)
}
_SQLITE_ID_CHUNK = 500


_WF_COLUMNS = [
    "workflow_uuid",
    "status",
    "name",
    "class_name",
    "config_name",
    "inputs",
    "executor_id",
    "owner_xid",
    "application_version",
    "recovery_attempts",
    "created_at",
    "updated_at",
    "queue_name",
    "priority",
    "deduplication_id",
    "started_at_epoch_ms",
    "workflow_timeout_ms",
    "workflow_deadline_epoch_ms",
    "parent_workflow_id",
    "batch_key",
    "function_hash",
    "token_estimate",
    "queue_partition_key",
]


# A child workflow's record in its parent: the operation that started it (the parent's replay
# finds the child's id there). Parameters: the child's row's, plus `b_parent_fid`.
_CHILD_RECORD_COLUMNS = [
    "workflow_uuid",
    "function_id",
    "function_name",
    "child_workflow_id",
    "started_at_epoch_ms",
    "completed_at_epoch_ms",
]


def _child_record_values() -> list[Any]:
    return [
        bindparam("parent_workflow_id", type_=String),
        bindparam("b_parent_fid", type_=Integer),
        bindparam("name", type_=String),
        bindparam("workflow_uuid", type_=String),
        bindparam("created_at", type_=BigInteger),
        bindparam("created_at", type_=BigInteger),
    ]


def _params_of(wf: NewWorkflow) -> tuple[dict[str, Any], bool]:
    """The row's parameters, and whether it is a child workflow: then they also hold its
    parent's operation number (`b_parent_fid`) for the parent's record of it."""
    params = _row_values(wf)
    is_child = wf.parent_workflow_id is not None and wf.parent_function_id is not None
    if is_child:
        params["b_parent_fid"] = wf.parent_function_id
    return params, is_child


def _recording_child(db: Database, write: Any, notify: bool = False) -> Executable:
    """PostgreSQL: `write` (an insert of a workflow row, returning its id) and, when it wrote
    the row, the parent's record of the child, as one statement: one round trip where a
    transaction of its own took five (a workflow enqueuing its children one by one ran at a
    quarter of the speed of a loop outside any workflow). With `notify`, the enqueue's wake-up
    as well."""
    written = write.cte("written")
    record = (
        db.insert(oo)
        .from_select(_CHILD_RECORD_COLUMNS, select(*_child_record_values()).select_from(written))
        .on_conflict_do_nothing()
    )
    columns: list[Any] = [written.c.id]
    if notify:
        columns.append(func.pg_notify(bindparam("b_channel"), bindparam("b_payload")))
    return select(*columns).add_cte(record.cte("recorded"))


class WorkflowRows(StoreBase):
    """Writing, finishing, reading and listing workflow rows."""

    def _build_workflow_statements(self, db: Database) -> None:
        """Prepare the dialect-specific writes of workflow rows (called once, by __init__)."""
        # In a batch the finish wakes its queue but is announced with the others (`merged.py`).
        one = db.prepared(_FINISH_AND_WAKE if db.notifications else _FINISH)
        self._finish_merged = merged.finish_workflows(one, notify=db.notifications)
        # RETURNING, not rowcount: with an autoincrement key PostgreSQL reports -1.
        self._insert_wf = (
            db.insert(ws)
            .values({c: bindparam(c, type_=ws.c[c].type) for c in _WF_COLUMNS})
            .on_conflict_do_nothing(index_elements=["workflow_uuid"])
            .returning(ws.c.id)
        )
        # No limit shared between processes; a worker_concurrency only if it is the one the
        # enqueuing process counted its own running workflows against.
        unshared = unshared_now(
            bindparam("queue_name", type_=String),
            bindparam("b_wc", type_=Integer),
            bindparam("b_now", type_=BigInteger),
        )
        # FIFO: nothing may start ahead of work already waiting in the queue.
        waiting = ws.alias("waiting")
        nothing_waiting = ~(
            select(waiting.c.id)
            .where(
                waiting.c.queue_name == bindparam("queue_name", type_=String),
                status_is(waiting.c.status, ENQUEUED),
            )
            .exists()
        )
        # SQLite: the conditions as a query of their own, then the plain insert, in the one
        # BEGIN IMMEDIATE transaction (atomic there). In one INSERT ... SELECT that reads
        # workflow_status, SQLite first copies the selected row to a temporary table, which
        # made the enqueue's insert cost about 40 microseconds more.
        self._start_guard = select(literal(1)).where(unshared, nothing_waiting)
        self._insert_started = db.insert(ws).from_select(
            _WF_COLUMNS,
            select(*[bindparam(c, type_=ws.c[c].type) for c in _WF_COLUMNS]).where(
                unshared, nothing_waiting
            ),
        )
        # An existing row is left alone, unless it is this very write, committed by an attempt
        # whose reply the connection lost (`reconnect` runs it again): the row then names the
        # owner token just drawn for it, and the enqueuer must run it, not wait for it.
        self._insert_started = self._insert_started.on_conflict_do_update(
            index_elements=["workflow_uuid"],
            set_={"owner_xid": self._insert_started.excluded.owner_xid},
            where=ws.c.owner_xid == self._insert_started.excluded.owner_xid,
        ).returning(ws.c.id)
        inserted = self._insert_wf.cte("inserted")
        self._insert_wf_and_notify = select(
            inserted.c.id,
            func.pg_notify(bindparam("b_channel"), bindparam("b_payload")),
        )
        # A child workflow: its row and its parent's record of it (see `_recording_child`;
        # SQLite runs the record after the row, in the same transaction).
        self._record_child = (
            db.insert(oo)
            .values(dict(zip(_CHILD_RECORD_COLUMNS, _child_record_values(), strict=True)))
            .on_conflict_do_nothing()
        )
        if db.is_postgres:
            self._insert_child = _recording_child(db, self._insert_wf)
            self._insert_child_and_notify = _recording_child(db, self._insert_wf, notify=True)
            self._insert_started_child = _recording_child(db, self._insert_started)

    def insert_workflow(self, wf: NewWorkflow) -> dict[str, Any] | None:
        """Write a new workflow row; if the id exists, write nothing and return the existing row.

        Atomic with the parent's record of the child (for child workflows) and, for an enqueue, with
        the wake-up notification. Idempotent by workflow id. Raises `DBOSQueueDeduplicatedError`
        when an active workflow of the queue holds the same deduplication id.
        """
        params, is_child = _params_of(wf)
        notify = wf.status == ENQUEUED and wf.queue_name is not None and self.db.notifications
        if notify:
            params["b_channel"] = NOTIFY_CHANNEL
            params["b_payload"] = self.db.payload(f"q:{wf.queue_name}")
        try:
            if self.db.is_postgres:
                # One statement (with its notification): one round trip.
                if is_child:
                    stmt = self._insert_child_and_notify if notify else self._insert_child
                else:
                    stmt = self._insert_wf_and_notify if notify else self._insert_wf
                inserted = self.db.grouped(stmt, params)
            else:
                then = self._record_child if is_child else None
                inserted = self.db.grouped(self._insert_wf, params, then=then)
            return None if inserted is not None else self.get_workflow(wf.workflow_id)
        except IntegrityError as exc:
            _raise_if_deduplicated(wf, exc)
            raise

    def insert_started_if_unshared(
        self, wf: NewWorkflow, now_ms: int, *, worker_concurrency: int | None = None
    ) -> bool:
        """Write a queued workflow already started (PENDING, owned) by its enqueuer, if its
        queue has no limit shared between processes (no concurrency, rate or token limit, and
        exactly this `worker_concurrency`, which the caller counted its own running workflows
        against), no back-off and no waiting work now; returns whether it was written.

        For such a queue, when the enqueuing process serves it and has a slot free,
        enqueue-then-claim comes to the same; this does both in one statement. Writes nothing
        (False) when the stored settings differ or when the id exists; the caller then enqueues
        the ordinary way.
        """
        params, is_child = _params_of(wf)
        params["b_now"] = now_ms
        params["b_wc"] = worker_concurrency
        try:
            if self.db.is_postgres:
                stmt = self._insert_started_child if is_child else self._insert_started
                return self.db.grouped(stmt, params) is not None
            then = self._record_child if is_child else None
            written = self.db.grouped(self._insert_wf, params, guard=self._start_guard, then=then)
            return written is not None
        except IntegrityError as exc:
            _raise_if_deduplicated(wf, exc)
            raise

    def get_workflow(self, workflow_id: str) -> dict[str, Any] | None:
        """The workflow's row as a dict, or None."""
        with self.db.read() as conn:
            return self._get_row(conn, workflow_id)

    def get_status_and_result(self, workflow_id: str) -> dict[str, Any] | None:
        """Just the columns a waiter needs: status, output, error, deadline, completion time."""
        row = self.db.read_row(_STATUS_AND_RESULT, {"wid": workflow_id})
        return dict(zip(_STATUS_AND_RESULT_KEYS, row, strict=True)) if row is not None else None

    def first_ended(self, workflow_ids: Sequence[str]) -> str | None:
        """Of these workflows, the one that ended first (succeeded, failed or was cancelled:
        by its completion time, else its last update), or None while all are active. What
        `DBOS.wait_first` asks at each look."""
        best: tuple[int, str] | None = None
        postgres = self.db.is_postgres
        with self.db.read() as conn:
            for chunk in self._id_chunks(workflow_ids):
                row = conn.execute(_FIRST_ENDED[postgres], {"ids": chunk}).first()
                # Strictly earlier only: of the same millisecond, the earlier chunk's.
                if row is not None and (best is None or row[1] < best[0]):
                    best = (row[1], row[0])
        return best[1] if best is not None else None

    def first_missing(self, workflow_ids: Sequence[str]) -> str | None:
        """The first of these ids that no workflow has (never started, or deleted)."""
        postgres = self.db.is_postgres
        with self.db.read() as conn:
            for chunk in self._id_chunks(workflow_ids):
                found = set(conn.execute(_EXISTING[postgres], {"ids": chunk}).scalars())
                missing = [wid for wid in chunk if wid not in found]
                if missing:
                    return missing[0]
        return None

    def _id_chunks(self, workflow_ids: Sequence[str]) -> list[list[str]]:
        size = max(len(workflow_ids), 1) if self.db.is_postgres else _SQLITE_ID_CHUNK
        return [list(workflow_ids[i : i + size]) for i in range(0, len(workflow_ids), size)]

    def finish_workflow(
        self,
        workflow_id: str,
        owner_xid: str,
        status: str,
        output: bytes | None,
        error: bytes | None,
        now_ms: int,
    ) -> tuple[bool, str | None]:
        """Record a workflow's outcome if this execution still owns it and it is PENDING.

        Returns (recorded, queue name). Writes nothing when the workflow was cancelled, timed
        out, or taken over by another execution meanwhile: a stale execution never overwrites
        the owner's result. One atomic statement, with its notifications.
        """
        params = {
            "b_wid": workflow_id,
            "b_owner": owner_xid,
            "b_status": status,
            "b_output": output,
            "b_error": error,
            "b_now": now_ms,
            "b_channel": NOTIFY_CHANNEL,
            "b_done_channel": DONES_CHANNEL,
            "b_origin": self.db.payload(""),
        }
        stmt = _FINISH_AND_NOTIFY if self.db.notifications else _FINISH
        row = self.db.grouped(stmt, params, self._finish_merged)
        return (row is not None, row[1] if row is not None else None)

    def dead_letter(self, workflow_id: str, now_ms: int, error: bytes) -> None:
        """Give up on a workflow started too often (MAX_RECOVERY_ATTEMPTS_EXCEEDED), with the
        error that says so: listings, batch frames and widgets then show why it failed."""
        with self.db.write() as conn:
            conn.execute(
                update(ws)
                .where(ws.c.workflow_uuid == workflow_id)
                .values(
                    status=MAX_RECOVERY_ATTEMPTS_EXCEEDED,
                    error=error,
                    updated_at=now_ms,
                    deduplication_id=None,
                )
            )
            self.db.notify(conn, f"done:{workflow_id}")

    def list_workflows(
        self,
        *,
        workflow_ids: Sequence[str] | None = None,
        status: Sequence[str] | None = None,
        name: Sequence[str] | None = None,
        queue_name: Sequence[str] | None = None,
        start_time: int | None = None,
        end_time: int | None = None,
        workflow_id_prefix: str | None = None,
        app_version: Sequence[str] | None = None,
        executor_id: Sequence[str] | None = None,
        parent_workflow_id: Sequence[str] | None = None,
        forked_from: Sequence[str] | None = None,
        was_forked_from: bool | None = None,
        queues_only: bool = False,
        limit: int | None = None,
        offset: int | None = None,
        sort_desc: bool = False,
        load_input: bool = True,
        load_output: bool = True,
    ) -> list[dict[str, Any]]:
        """Workflow rows matching every given filter (a list: any of its values), ordered by
        creation (enqueue order); with `queues_only` only those run through a queue; without
        `load_input` no inputs, without `load_output` no outputs or errors."""
        left_out = set() if load_input else {"inputs"}
        if not load_output:
            left_out |= {"output", "error"}
        stmt = select(*[c for c in ws.c if c.name not in left_out])
        for column, values in (
            (ws.c.workflow_uuid, workflow_ids),
            (ws.c.status, status),
            (ws.c.name, name),
            (ws.c.queue_name, queue_name),
            (ws.c.application_version, app_version),
            (ws.c.executor_id, executor_id),
            (ws.c.parent_workflow_id, parent_workflow_id),
            (ws.c.forked_from, forked_from),
        ):
            if values is not None:
                stmt = stmt.where(column.in_(list(values)))
        if was_forked_from is not None:
            stmt = stmt.where(ws.c.was_forked_from == was_forked_from)
        if queues_only:  # in the query: `limit` and `offset` count only these rows
            stmt = stmt.where(ws.c.queue_name.is_not(None))
        if start_time is not None:
            stmt = stmt.where(ws.c.created_at >= start_time)
        if end_time is not None:
            stmt = stmt.where(ws.c.created_at <= end_time)
        if workflow_id_prefix is not None:
            stmt = stmt.where(ws.c.workflow_uuid.startswith(workflow_id_prefix, autoescape=True))
        stmt = stmt.order_by(ws.c.id.desc() if sort_desc else ws.c.id)
        if limit is not None:
            stmt = stmt.limit(limit)
        if offset is not None:
            stmt = stmt.offset(offset)
        with self.db.read() as conn:
            return [dict(r) for r in conn.execute(stmt).mappings()]

    def count_by_executor(self, executor_id: str) -> dict[str, int]:
        """Number of workflows per status last run by one executor."""
        stmt = (
            select(ws.c.status, func.count())
            .where(ws.c.executor_id == executor_id)
            .group_by(ws.c.status)
        )
        with self.db.read() as conn:
            return {str(s): int(n) for s, n in conn.execute(stmt)}

    def count_by_status(self, queue_name: str | None = None) -> dict[str, int]:
        """Number of workflows per status (of one queue, or of all)."""
        stmt = select(ws.c.status, func.count()).group_by(ws.c.status)
        if queue_name is not None:
            stmt = stmt.where(ws.c.queue_name == queue_name)
        with self.db.read() as conn:
            return {str(s): int(n) for s, n in conn.execute(stmt)}

    def waiting_versions(
        self, versions: Sequence[str] | None = None, *, batch_id: str | None = None
    ) -> set[str]:
        """The function versions of work waiting in a queue (ENQUEUED): of these `versions`
        only, or of one batch's items (retried items may wait with another version than the
        first's)."""
        stmt = select(ws.c.function_hash).where(status_is(ws.c.status, ENQUEUED)).distinct()
        if versions is not None:
            if not versions:
                return set()
            stmt = stmt.where(ws.c.function_hash.in_(list(versions)))
        if batch_id is not None:
            stmt = stmt.where(in_batch(batch_id))
        with self.db.read() as conn:
            return {str(v) for v in conn.execute(stmt).scalars() if v is not None}


def _raise_if_deduplicated(wf: NewWorkflow, exc: IntegrityError) -> None:
    """A unique violation on an enqueue with a deduplication id is the dedup index's."""
    if wf.deduplication_id is not None and wf.queue_name is not None:
        raise DBOSQueueDeduplicatedError(
            wf.workflow_id, wf.queue_name, wf.deduplication_id
        ) from exc
