"""SystemStore: every query the engine makes against the system database.

Methods are named for what they do, take and return plain values, and each runs as one
transaction. Their docstrings say what is atomic and what is idempotent. The store knows nothing of
Python functions, queues objects or threads; queue claiming lives in `claims.py`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Connection,
    String,
    and_,
    bindparam,
    case,
    delete,
    func,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from dbos_nb.errors import BatchConflictError, DBOSQueueDeduplicatedError, WorkflowPreempted
from dbos_nb.models import (
    ACTIVE_STATUSES,
    INTERNAL_QUEUE,
    QueueSettings,
    WorkflowStatusString,
)
from dbos_nb.storage import merged
from dbos_nb.storage.database import NOTIFY_CHANNEL, Database
from dbos_nb.storage.schema import (
    batches,
    executors,
    function_versions,
    functions,
    operation_outputs,
    queue_starts,
    queues,
    workflow_status,
)

logger = logging.getLogger(__name__)

ws = workflow_status
oo = operation_outputs

PENDING = WorkflowStatusString.PENDING.value
ENQUEUED = WorkflowStatusString.ENQUEUED.value
CANCELLED = WorkflowStatusString.CANCELLED.value


@dataclass
class NewWorkflow:
    """A workflow row about to be written (by a direct start or an enqueue)."""

    workflow_id: str
    name: str
    inputs: bytes
    status: str
    created_at: int
    class_name: str | None = None
    config_name: str | None = None
    executor_id: str | None = None
    owner_xid: str | None = None
    application_version: str | None = None
    queue_name: str | None = None
    priority: int = 0
    deduplication_id: str | None = None
    workflow_timeout_ms: int | None = None
    workflow_deadline_epoch_ms: int | None = None
    parent_workflow_id: str | None = None
    # For a child workflow: the parent's operation number that records the child's id.
    parent_function_id: int | None = None
    started_at_epoch_ms: int | None = None
    recovery_attempts: int = 0
    batch_id: str | None = None
    function_hash: str | None = None
    token_estimate: int | None = None


@dataclass
class StepPreflight:
    """What a step needs to know before it runs: is the workflow still live, is it recorded."""

    status: str | None
    deadline_ms: int | None
    recorded: bool
    function_name: str | None
    output: bytes | None
    error: bytes | None
    child_workflow_id: str | None
    owner_xid: str | None = None


_STEP_PREFLIGHT = (
    select(
        ws.c.status,
        ws.c.workflow_deadline_epoch_ms,
        ws.c.owner_xid,
        oo.c.function_id,
        oo.c.function_name,
        oo.c.output,
        oo.c.error,
        oo.c.child_workflow_id,
    )
    .select_from(
        ws.outerjoin(
            oo,
            and_(
                oo.c.workflow_uuid == ws.c.workflow_uuid,
                oo.c.function_id == bindparam("fid"),
            ),
        )
    )
    .where(ws.c.workflow_uuid == bindparam("wid"))
)

_FINISH = (
    update(ws)
    .where(
        ws.c.workflow_uuid == bindparam("b_wid"),
        ws.c.status == PENDING,
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

# PostgreSQL: the outcome and its notifications in one statement (one round trip, atomic). A
# queued workflow's end also wakes the schedulers, since it frees a slot of its queue.
_finished = _FINISH.cte("finished")
_FINISH_AND_NOTIFY = select(
    _finished.c.workflow_uuid,
    _finished.c.queue_name,
    func.pg_notify(
        bindparam("b_channel"), bindparam("b_origin") + literal("done:") + _finished.c.workflow_uuid
    ),
    case(
        (
            _finished.c.queue_name.is_not(None),
            func.pg_notify(
                bindparam("b_channel"),
                bindparam("b_origin") + literal("q:") + _finished.c.queue_name,
            ),
        )
    ),
)


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
    "batch_id",
    "function_hash",
    "token_estimate",
]

_STEP_COLUMNS = [
    "workflow_uuid",
    "function_id",
    "function_name",
    "output",
    "error",
    "child_workflow_id",
    "started_at_epoch_ms",
    "completed_at_epoch_ms",
]


class SystemStore:
    """The system database's queries."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._finish_merged = functools.partial(merged.finish_workflows, notify=db.notifications)
        self._insert_step = db.insert(oo).on_conflict_do_nothing().returning(oo.c.function_id)
        # RETURNING, not rowcount: with an autoincrement key PostgreSQL reports -1.
        self._insert_wf = (
            db.insert(ws)
            .values({c: bindparam(c, type_=ws.c[c].type) for c in _WF_COLUMNS})
            .on_conflict_do_nothing(index_elements=["workflow_uuid"])
            .returning(ws.c.id)
        )
        unlimited = (
            select(queues.c.name)
            .where(
                queues.c.name == bindparam("queue_name", type_=String),
                queues.c.concurrency.is_(None),
                queues.c.worker_concurrency.is_(None),
                queues.c.rate_limit.is_(None),
                queues.c.token_limit.is_(None),
                or_(
                    queues.c.paused_until_ms.is_(None),
                    queues.c.paused_until_ms <= bindparam("b_now", type_=BigInteger),
                ),
            )
            .exists()
        )
        # FIFO: nothing may start ahead of work already waiting in the queue.
        waiting = ws.alias("waiting")
        nothing_waiting = ~(
            select(waiting.c.id)
            .where(
                waiting.c.queue_name == bindparam("queue_name", type_=String),
                waiting.c.status == ENQUEUED,
            )
            .exists()
        )
        self._insert_started = (
            db.insert(ws)
            .from_select(
                _WF_COLUMNS,
                select(*[bindparam(c, type_=ws.c[c].type) for c in _WF_COLUMNS]).where(
                    unlimited, nothing_waiting
                ),
            )
            .on_conflict_do_nothing(index_elements=["workflow_uuid"])
            .returning(ws.c.id)
        )
        inserted = self._insert_wf.cte("inserted")
        self._insert_wf_and_notify = select(
            inserted.c.id,
            func.pg_notify(bindparam("b_channel"), bindparam("b_payload")),
        )
        owned = select(*[bindparam(c, type_=oo.c[c].type) for c in _STEP_COLUMNS]).where(
            select(ws.c.id)
            .where(
                ws.c.workflow_uuid == bindparam("b_wid", type_=String),
                ws.c.owner_xid == bindparam("b_owner", type_=String),
            )
            .exists()
        )
        self._record_owned_step = (
            db.insert(oo)
            .from_select(_STEP_COLUMNS, owned)
            .on_conflict_do_nothing()
            .returning(oo.c.function_id)
        )

    # -- workflows ------------------------------------------------------------------------------

    def insert_workflow(self, wf: NewWorkflow) -> dict[str, Any] | None:
        """Write a new workflow row; if the id exists, write nothing and return the existing row.

        Atomic with the parent's record of the child (for child workflows) and, for an enqueue, with
        the wake-up notification. Idempotent by workflow id. Raises `DBOSQueueDeduplicatedError`
        when an active workflow of the queue holds the same deduplication id.
        """
        params = _row_values(wf)
        is_child = wf.parent_workflow_id is not None and wf.parent_function_id is not None
        notify = wf.status == ENQUEUED and wf.queue_name is not None and self.db.notifications
        try:
            if not is_child:
                # One statement (with its notification): one round trip on PostgreSQL.
                stmt = self._insert_wf
                if notify:
                    stmt = self._insert_wf_and_notify
                    params["b_channel"] = NOTIFY_CHANNEL
                    params["b_payload"] = self.db.payload(f"q:{wf.queue_name}")
                inserted = self.db.grouped(stmt, params)
                return None if inserted is not None else self.get_workflow(wf.workflow_id)
            with self.db.write() as conn:
                if conn.execute(self._insert_wf, params).first() is None:
                    return self._get_row(conn, wf.workflow_id)
                conn.execute(
                    self._insert_step,
                    {
                        "workflow_uuid": wf.parent_workflow_id,
                        "function_id": wf.parent_function_id,
                        "function_name": wf.name,
                        "child_workflow_id": wf.workflow_id,
                        "started_at_epoch_ms": wf.created_at,
                        "completed_at_epoch_ms": wf.created_at,
                    },
                )
                if wf.status == ENQUEUED and wf.queue_name is not None:
                    self.db.notify(conn, f"q:{wf.queue_name}")
                return None
        except IntegrityError as exc:
            if wf.deduplication_id is not None and wf.queue_name is not None:
                raise DBOSQueueDeduplicatedError(
                    wf.workflow_id, wf.queue_name, wf.deduplication_id
                ) from exc
            raise

    def insert_started_if_unlimited(self, wf: NewWorkflow, now_ms: int) -> bool:
        """Write a queued workflow already started (PENDING, owned) by its enqueuer, if its
        queue has no limit of any kind, no back-off and no waiting work now; returns whether it
        was written.

        For a queue without limits that the enqueuing process serves, enqueue-then-claim comes
        to the same; this does both in one statement. Writes nothing (False) when the queue has
        limits or when the id exists; the caller then enqueues the ordinary way.
        """
        params = _row_values(wf)
        params["b_now"] = now_ms
        try:
            return self.db.grouped(self._insert_started, params) is not None
        except IntegrityError as exc:
            if wf.deduplication_id is not None and wf.queue_name is not None:
                raise DBOSQueueDeduplicatedError(
                    wf.workflow_id, wf.queue_name, wf.deduplication_id
                ) from exc
            raise

    def insert_enqueued_batch(
        self, template: NewWorkflow, items: Sequence[tuple[str, bytes, int | None]]
    ) -> None:
        """Enqueue many workflows that share everything but id and inputs, in one transaction.

        `items` are (workflow id, serialized inputs, token estimate), written in order (so they
        start in that order). Ids that already exist are skipped: enqueueing the same batch
        again writes nothing twice. With `template.batch_id` set, the batch is recorded too; a
        batch id already used for another function, queue or size raises BatchConflictError.
        All or nothing.
        """
        if not items:
            return
        base = _row_values(template)
        # Only the columns this batch sets: NULLs are the columns' defaults anyway, and every
        # bound parameter costs time over 100,000 rows.
        per_item = ("workflow_uuid", "inputs", "token_estimate")
        columns = [c for c in base if c not in per_item and base[c] is not None]
        shared = tuple(base[c] for c in columns)
        estimates = any(e is not None for _, _, e in items)
        with self.db.write() as conn:
            if template.batch_id is not None:
                self._record_batch(conn, template, len(items))
            if estimates:
                self.db.bulk_insert(
                    conn,
                    ws,
                    ["workflow_uuid", "inputs", "token_estimate", *columns],
                    [(wid, data, est, *shared) for wid, data, est in items],
                    skip_conflicts_on="workflow_uuid",
                )
            else:
                self.db.bulk_insert(
                    conn,
                    ws,
                    ["workflow_uuid", "inputs", *columns],
                    [(wid, data, *shared) for wid, data, _ in items],
                    skip_conflicts_on="workflow_uuid",
                )
            if template.queue_name:
                self.db.notify(conn, f"q:{template.queue_name}")

    def _record_batch(self, conn: Connection, template: NewWorkflow, size: int) -> None:
        values = {
            "batch_id": template.batch_id,
            "queue_name": template.queue_name,
            "function_name": template.name,
            "size": size,
            "created_at": template.created_at,
        }
        conn.execute(self.db.insert(batches).values(**values).on_conflict_do_nothing())
        row = (
            conn.execute(select(batches).where(batches.c.batch_id == template.batch_id))
            .mappings()
            .one()
        )
        mismatched = [k for k in ("queue_name", "function_name", "size") if row[k] != values[k]]
        if mismatched:
            raise BatchConflictError(
                f"batch {template.batch_id!r} already exists with {row['size']} items of "
                f"{row['function_name']!r} on queue {row['queue_name']!r}; this call has "
                f"{size} items of {template.name!r} on {template.queue_name!r}. Use another "
                "batch name (or the same items and function to attach to it)"
            )

    # -- batches --------------------------------------------------------------------------------

    def retry_failed_in_batch(self, batch_id: str, now_ms: int) -> list[str]:
        """Put the batch's failed workflows back in their queue, in one transaction.

        Their failed operations' records are removed so those run again; their completed
        operations stay recorded and are not run again (no call is paid for twice).
        """
        with self.db.write() as conn:
            ids = list(
                conn.execute(
                    select(ws.c.workflow_uuid).where(
                        ws.c.batch_id == batch_id, ws.c.status == "ERROR"
                    )
                ).scalars()
            )
            for chunk in _chunks(ids, 500):
                conn.execute(
                    delete(oo).where(oo.c.workflow_uuid.in_(chunk), oo.c.error.is_not(None))
                )
                conn.execute(
                    update(ws)
                    .where(ws.c.workflow_uuid.in_(chunk), ws.c.status == "ERROR")
                    .values(
                        status=ENQUEUED,
                        error=None,
                        output=None,
                        owner_xid=None,
                        executor_id=None,
                        started_at_epoch_ms=None,
                        completed_at=None,
                        recovery_attempts=0,
                        workflow_deadline_epoch_ms=None,
                        updated_at=now_ms,
                    )
                )
            queue = conn.execute(
                select(batches.c.queue_name).where(batches.c.batch_id == batch_id)
            ).scalar()
            if ids and queue:
                self.db.notify(conn, f"q:{queue}")
            return ids

    def get_batch(self, batch_id: str) -> dict[str, Any] | None:
        """A batch's record: queue, function, size, creation time."""
        with self.db.read() as conn:
            row = (
                conn.execute(select(batches).where(batches.c.batch_id == batch_id))
                .mappings()
                .first()
            )
            return dict(row) if row is not None else None

    def list_batches(self) -> list[dict[str, Any]]:
        """Every recorded batch, newest first."""
        with self.db.read() as conn:
            rows = conn.execute(select(batches).order_by(batches.c.created_at.desc())).mappings()
            return [dict(r) for r in rows]

    def batch_counts(self, batch_id: str) -> dict[str, int]:
        """Number of the batch's workflows per status (one indexed GROUP BY)."""
        with self.db.read() as conn:
            rows = conn.execute(
                select(ws.c.status, func.count())
                .where(ws.c.batch_id == batch_id)
                .group_by(ws.c.status)
            )
            return {str(status): int(n) for status, n in rows}

    def batch_finished_since(self, batch_id: str, since_ms: int) -> int:
        """How many of the batch's workflows finished at or after `since_ms`."""
        with self.db.read() as conn:
            return int(
                conn.execute(
                    select(func.count()).where(
                        ws.c.batch_id == batch_id, ws.c.completed_at >= since_ms
                    )
                ).scalar_one()
            )

    def batch_rows(self, batch_id: str, *, load_payloads: bool = True) -> list[dict[str, Any]]:
        """The batch's workflow rows in input (enqueue) order."""
        columns = (
            list(ws.c)
            if load_payloads
            else [c for c in ws.c if c.name not in ("inputs", "output", "error")]
        )
        with self.db.read() as conn:
            rows = conn.execute(
                select(*columns).where(ws.c.batch_id == batch_id).order_by(ws.c.id)
            ).mappings()
            return [dict(r) for r in rows]

    def batch_recent_errors(self, batch_id: str, limit: int) -> list[tuple[str, bytes | None]]:
        """(workflow id, serialized error) of the batch's latest failures."""
        with self.db.read() as conn:
            rows = conn.execute(
                select(ws.c.workflow_uuid, ws.c.error)
                .where(ws.c.batch_id == batch_id, ws.c.status == "ERROR")
                .order_by(ws.c.completed_at.desc())
                .limit(limit)
            ).all()
            return [(str(r[0]), r[1]) for r in rows]

    def get_workflow(self, workflow_id: str) -> dict[str, Any] | None:
        """The workflow's row as a dict, or None."""
        with self.db.read() as conn:
            return self._get_row(conn, workflow_id)

    def get_status_and_result(self, workflow_id: str) -> dict[str, Any] | None:
        """Just the columns a waiter needs: status, output, error, deadline, completion time."""
        with self.db.read() as conn:
            row = (
                conn.execute(
                    select(
                        ws.c.status,
                        ws.c.output,
                        ws.c.error,
                        ws.c.workflow_deadline_epoch_ms,
                        ws.c.completed_at,
                    ).where(ws.c.workflow_uuid == workflow_id)
                )
                .mappings()
                .first()
            )
            return dict(row) if row is not None else None

    def _get_row(self, conn: Connection, workflow_id: str) -> dict[str, Any] | None:
        row = conn.execute(select(ws).where(ws.c.workflow_uuid == workflow_id)).mappings().first()
        return dict(row) if row is not None else None

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
            "b_origin": self.db.payload(""),
        }
        stmt = _FINISH_AND_NOTIFY if self.db.notifications else _FINISH
        row = self.db.grouped(stmt, params, self._finish_merged)
        return (row is not None, row[1] if row is not None else None)

    def set_status(self, workflow_id: str, status: str, now_ms: int) -> None:
        """Set a status unconditionally (used to dead-letter a workflow)."""
        with self.db.write() as conn:
            conn.execute(
                update(ws)
                .where(ws.c.workflow_uuid == workflow_id)
                .values(status=status, updated_at=now_ms, deduplication_id=None)
            )
            self.db.notify(conn, f"done:{workflow_id}")

    # -- steps ----------------------------------------------------------------------------------

    def step_preflight(self, workflow_id: str, function_id: int) -> StepPreflight:
        """The workflow's status and deadline, and the step's recorded outcome if it has one."""
        with self.db.read() as conn:
            row = conn.execute(_STEP_PREFLIGHT, {"wid": workflow_id, "fid": function_id}).first()
        if row is None:
            return StepPreflight(None, None, False, None, None, None, None)
        return StepPreflight(
            status=row[0],
            deadline_ms=row[1],
            owner_xid=row[2],
            recorded=row[3] is not None,
            function_name=row[4],
            output=row[5],
            error=row[6],
            child_workflow_id=row[7],
        )

    def record_step(
        self,
        workflow_id: str,
        owner_xid: str,
        function_id: int,
        function_name: str,
        output: bytes | None,
        error: bytes | None,
        started_ms: int,
        completed_ms: int,
        child_workflow_id: str | None = None,
    ) -> StepPreflight | None:
        """Record an operation's outcome, if this execution still owns the workflow.

        Idempotent: if the operation is already recorded, the first record wins, nothing is
        written, and that record is returned (else None). Raises WorkflowPreempted, writing
        nothing, when another execution owns the workflow now. One atomic statement.
        """
        inserted = self.db.grouped(
            self._record_owned_step,
            {
                "workflow_uuid": workflow_id,
                "function_id": function_id,
                "function_name": function_name,
                "output": output,
                "error": error,
                "child_workflow_id": child_workflow_id,
                "started_at_epoch_ms": started_ms,
                "completed_at_epoch_ms": completed_ms,
                "b_wid": workflow_id,
                "b_owner": owner_xid,
            },
            merged.record_steps,
        )
        if inserted is not None:
            return None
        existing = self.step_preflight(workflow_id, function_id)
        if existing.recorded:
            return existing
        raise WorkflowPreempted(workflow_id, "taken over by another execution")

    def last_recorded_function_id(self, workflow_id: str) -> int:
        """The highest operation number recorded for a workflow (-1 if none)."""
        with self.db.read() as conn:
            value = conn.execute(
                select(func.max(oo.c.function_id)).where(oo.c.workflow_uuid == workflow_id)
            ).scalar()
        return int(value) if value is not None else -1

    def list_steps(self, workflow_id: str) -> list[dict[str, Any]]:
        """Every recorded operation of a workflow, in order."""
        with self.db.read() as conn:
            rows = conn.execute(
                select(oo).where(oo.c.workflow_uuid == workflow_id).order_by(oo.c.function_id)
            ).mappings()
            return [dict(r) for r in rows]

    # -- listing --------------------------------------------------------------------------------

    def list_workflows(
        self,
        *,
        workflow_ids: Sequence[str] | None = None,
        status: Sequence[str] | None = None,
        name: str | None = None,
        queue_name: str | None = None,
        start_time: int | None = None,
        end_time: int | None = None,
        workflow_id_prefix: str | None = None,
        app_version: str | None = None,
        executor_id: str | None = None,
        parent_workflow_id: str | None = None,
        limit: int | None = None,
        offset: int | None = None,
        sort_desc: bool = False,
        load_payloads: bool = True,
    ) -> list[dict[str, Any]]:
        """Workflow rows matching every given filter, ordered by creation (enqueue order)."""
        columns = (
            list(ws.c)
            if load_payloads
            else [c for c in ws.c if c.name not in ("inputs", "output", "error")]
        )
        stmt = select(*columns)
        if workflow_ids is not None:
            stmt = stmt.where(ws.c.workflow_uuid.in_(list(workflow_ids)))
        if status is not None:
            stmt = stmt.where(ws.c.status.in_(list(status)))
        if name is not None:
            stmt = stmt.where(ws.c.name == name)
        if queue_name is not None:
            stmt = stmt.where(ws.c.queue_name == queue_name)
        if start_time is not None:
            stmt = stmt.where(ws.c.created_at >= start_time)
        if end_time is not None:
            stmt = stmt.where(ws.c.created_at <= end_time)
        if workflow_id_prefix is not None:
            stmt = stmt.where(ws.c.workflow_uuid.startswith(workflow_id_prefix, autoescape=True))
        if app_version is not None:
            stmt = stmt.where(ws.c.application_version == app_version)
        if executor_id is not None:
            stmt = stmt.where(ws.c.executor_id == executor_id)
        if parent_workflow_id is not None:
            stmt = stmt.where(ws.c.parent_workflow_id == parent_workflow_id)
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

    # -- cancel, resume, fork -------------------------------------------------------------------

    def cancel_workflows(
        self, workflow_ids: Sequence[str], now_ms: int, *, cancel_children: bool
    ) -> list[str]:
        """Mark active workflows CANCELLED (with their descendants if asked); returns the ids
        changed. Finished workflows are left as they are. Idempotent."""
        changed: list[str] = []
        with self.db.write() as conn:
            frontier = list(workflow_ids)
            seen: set[str] = set()
            while frontier:
                batch = [w for w in frontier if w not in seen]
                seen.update(batch)
                if not batch:
                    break
                for chunk in _chunks(batch, 500):
                    ids = conn.execute(
                        update(ws)
                        .where(ws.c.workflow_uuid.in_(chunk), ws.c.status.in_(ACTIVE_STATUSES))
                        .values(
                            status=CANCELLED,
                            updated_at=now_ms,
                            completed_at=now_ms,
                            deduplication_id=None,
                        )
                        .returning(ws.c.workflow_uuid)
                    ).scalars()
                    changed.extend(ids)
                if not cancel_children:
                    break
                frontier = list(
                    conn.execute(
                        select(ws.c.workflow_uuid).where(ws.c.parent_workflow_id.in_(batch))
                    ).scalars()
                )
            for wid in changed:
                self.db.notify(conn, f"done:{wid}")
        return changed

    def resume_workflow(self, workflow_id: str, now_ms: int, queue_name: str | None) -> bool:
        """Put a cancelled, dead-lettered or stuck workflow back in a queue, from its last
        completed step. Finished (SUCCESS/ERROR) workflows are left alone; returns whether the
        row changed."""
        target = queue_name or INTERNAL_QUEUE
        with self.db.write() as conn:
            done = conn.execute(
                update(ws)
                .where(
                    ws.c.workflow_uuid == workflow_id,
                    ws.c.status.not_in(
                        (WorkflowStatusString.SUCCESS.value, WorkflowStatusString.ERROR.value)
                    ),
                )
                .values(
                    status=ENQUEUED,
                    queue_name=target,
                    owner_xid=None,
                    executor_id=None,
                    recovery_attempts=0,
                    started_at_epoch_ms=None,
                    workflow_deadline_epoch_ms=None,
                    deduplication_id=None,
                    updated_at=now_ms,
                )
            ).rowcount
            if done:
                self.db.notify(conn, f"q:{target}")
            return bool(done)

    def fork_workflow(
        self,
        source_id: str,
        new_id: str,
        start_step: int,
        now_ms: int,
        application_version: str | None,
        queue_name: str | None,
    ) -> bool:
        """Create `new_id` as a copy of `source_id` that replays the source's steps before
        `start_step` and runs the rest. Atomic; returns False if the source does not exist."""
        target = queue_name or INTERNAL_QUEUE
        with self.db.write() as conn:
            src = self._get_row(conn, source_id)
            if src is None:
                return False
            conn.execute(
                ws.insert().values(
                    workflow_uuid=new_id,
                    status=ENQUEUED,
                    name=src["name"],
                    class_name=src["class_name"],
                    config_name=src["config_name"],
                    inputs=src["inputs"],
                    application_version=application_version or src["application_version"],
                    created_at=now_ms,
                    updated_at=now_ms,
                    queue_name=target,
                    priority=0,
                    workflow_timeout_ms=src["workflow_timeout_ms"],
                    authenticated_user=src["authenticated_user"],
                    assumed_role=src["assumed_role"],
                    authenticated_roles=src["authenticated_roles"],
                )
            )
            steps = conn.execute(
                select(oo).where(oo.c.workflow_uuid == source_id, oo.c.function_id < start_step)
            ).mappings()
            copied = [dict(s, workflow_uuid=new_id) for s in steps]
            if copied:
                conn.execute(oo.insert(), copied)
            self.db.notify(conn, f"q:{target}")
            return True

    def delete_workflow(self, workflow_id: str) -> list[str]:
        """Delete a workflow, its descendants and all their records; returns the ids deleted."""
        with self.db.write() as conn:
            doomed: list[str] = []
            frontier = [workflow_id]
            while frontier:
                doomed.extend(frontier)
                frontier = list(
                    conn.execute(
                        select(ws.c.workflow_uuid).where(ws.c.parent_workflow_id.in_(frontier))
                    ).scalars()
                )
            for chunk in _chunks(doomed, 500):
                conn.execute(delete(oo).where(oo.c.workflow_uuid.in_(chunk)))
                conn.execute(delete(ws).where(ws.c.workflow_uuid.in_(chunk)))
            return doomed

    def claim_workflow(
        self, workflow_id: str, executor_id: str, owner_xid: str, now_ms: int
    ) -> dict[str, Any] | None:
        """Take one ENQUEUED workflow for this executor to run now (in the foreground).

        Returns its row, or None if it is not ENQUEUED (someone else has it, or it finished).
        """
        with self.db.write() as conn:
            done = conn.execute(
                update(ws)
                .where(ws.c.workflow_uuid == workflow_id, ws.c.status == ENQUEUED)
                .values(
                    status=PENDING,
                    executor_id=executor_id,
                    owner_xid=owner_xid,
                    started_at_epoch_ms=now_ms,
                    updated_at=now_ms,
                    recovery_attempts=ws.c.recovery_attempts + 1,
                    workflow_deadline_epoch_ms=func.coalesce(
                        ws.c.workflow_deadline_epoch_ms, now_ms + ws.c.workflow_timeout_ms
                    ),
                )
            ).rowcount
            return self._get_row(conn, workflow_id) if done else None

    def requeue_workflow(self, workflow_id: str, now_ms: int) -> bool:
        """Put a PENDING workflow that nothing runs any more back in its queue."""
        with self.db.write() as conn:
            conn.execute(
                update(ws)
                .where(ws.c.workflow_uuid == workflow_id, ws.c.queue_name.is_(None))
                .values(queue_name=INTERNAL_QUEUE)
            )
            return bool(
                conn.execute(
                    update(ws)
                    .where(ws.c.workflow_uuid == workflow_id, ws.c.status == PENDING)
                    .values(status=ENQUEUED, owner_xid=None, executor_id=None, updated_at=now_ms)
                ).rowcount
            )

    # -- recovery -------------------------------------------------------------------------------

    def requeue_pending(self, executor_id: str, now_ms: int) -> list[str]:
        """Put this executor's PENDING workflows back in their queues (direct ones in the internal
        queue) so that the ordinary claim resumes them. Atomic and idempotent.

        Queued rows keep their place: claims order by enqueue order, so they come first.
        """
        with self.db.write() as conn:
            return self._requeue_pending(conn, executor_id, now_ms)

    def _requeue_pending(self, conn: Connection, executor_id: str, now_ms: int) -> list[str]:
        ids = list(
            conn.execute(
                select(ws.c.workflow_uuid).where(
                    ws.c.status == PENDING, ws.c.executor_id == executor_id
                )
            ).scalars()
        )
        for chunk in _chunks(ids, 500):
            conn.execute(
                update(ws)
                .where(ws.c.workflow_uuid.in_(chunk), ws.c.queue_name.is_(None))
                .values(queue_name=INTERNAL_QUEUE)
            )
            conn.execute(
                update(ws)
                .where(ws.c.workflow_uuid.in_(chunk), ws.c.status == PENDING)
                .values(status=ENQUEUED, owner_xid=None, executor_id=None, updated_at=now_ms)
            )
        if ids:
            self.db.notify(conn, "q:*")
        return ids

    def cancel_overdue(self, now_ms: int) -> list[str]:
        """Cancel every active workflow whose deadline has passed; returns their ids."""
        with self.db.read() as conn:
            ids = list(
                conn.execute(
                    select(ws.c.workflow_uuid).where(
                        ws.c.workflow_deadline_epoch_ms <= now_ms,
                        ws.c.status.in_(ACTIVE_STATUSES),
                    )
                ).scalars()
            )
        if not ids:
            return []
        return self.cancel_workflows(ids, now_ms, cancel_children=True)

    def lost_executions(self, owners: dict[str, str]) -> dict[str, str]:
        """Of these executions (workflow id -> owner), the ones that must stop, with why: their
        workflow is no longer PENDING (cancelled, say) or another execution owns it now."""
        lost: dict[str, str] = {}
        ids = list(owners)
        for chunk in _chunks(ids, 500):
            with self.db.read() as conn:
                rows = conn.execute(
                    select(ws.c.workflow_uuid, ws.c.status, ws.c.owner_xid).where(
                        ws.c.workflow_uuid.in_(chunk)
                    )
                ).all()
            for wid, status, owner in rows:
                if status != PENDING:
                    lost[wid] = "cancelled" if status == CANCELLED else f"now {status}"
                elif owner != owners[wid]:
                    lost[wid] = "taken over by another execution"
        return lost

    # -- queues ---------------------------------------------------------------------------------

    def upsert_queue(self, settings: QueueSettings, now_ms: int) -> QueueSettings | None:
        """Store a queue's settings; returns the settings it replaced (None if it is new)."""
        values = {
            "concurrency": settings.concurrency,
            "worker_concurrency": settings.worker_concurrency,
            "rate_limit": settings.limit,
            "rate_period_ms": settings.period_ms,
            "priority_enabled": settings.priority_enabled,
            "polling_interval_ms": settings.polling_interval_ms,
            "token_limit": settings.token_limit,
            "token_period_ms": settings.token_period_ms,
            "updated_at": now_ms,
        }
        with self.db.write() as conn:
            old = conn.execute(select(queues).where(queues.c.name == settings.name)).mappings()
            previous = next(iter(old), None)
            if previous is None:
                conn.execute(queues.insert().values(name=settings.name, **values))
                return None
            old_settings = queue_settings_from_row(dict(previous))
            if old_settings != settings:
                conn.execute(update(queues).where(queues.c.name == settings.name).values(**values))
            return old_settings

    def get_queue(self, name: str) -> QueueSettings | None:
        """A queue's stored settings, or None when no process declared it."""
        with self.db.read() as conn:
            row = conn.execute(select(queues).where(queues.c.name == name)).mappings().first()
        return queue_settings_from_row(dict(row)) if row is not None else None

    def list_queues(self) -> list[QueueSettings]:
        """Every declared queue."""
        with self.db.read() as conn:
            rows = conn.execute(select(queues).order_by(queues.c.name)).mappings()
            return [queue_settings_from_row(dict(r)) for r in rows]

    # -- function catalogue ---------------------------------------------------------------------

    def record_functions(self, entries: Sequence[tuple[str, str, str, str]], now_ms: int) -> None:
        """Upsert (name, kind, module, source_hash) rows of registered functions."""
        if not entries:
            return
        rows = [
            {"name": n, "kind": k, "module": m, "source_hash": h, "updated_at": now_ms}
            for n, k, m, h in entries
        ]
        stmt = self.db.insert(functions)
        stmt = stmt.on_conflict_do_update(
            index_elements=["name"],
            set_={
                "kind": stmt.excluded.kind,
                "module": stmt.excluded.module,
                "source_hash": stmt.excluded.source_hash,
                "updated_at": stmt.excluded.updated_at,
            },
        )
        with self.db.write() as conn:
            conn.execute(stmt, rows)

    def function_kind(self, name: str) -> str | None:
        """The kind ("workflow", "step", "transaction") some process registered `name` as."""
        with self.db.read() as conn:
            kind = conn.execute(select(functions.c.kind).where(functions.c.name == name)).scalar()
            return str(kind) if kind is not None else None

    def record_function_versions(
        self, entries: Sequence[tuple[str, str, str, str, bytes]], now_ms: int
    ) -> None:
        """Store (name, hash, kind, module, payload) versions; known versions are left as they
        are (a version is immutable)."""
        if not entries:
            return
        rows = [
            {"name": n, "hash": h, "kind": k, "module": m, "payload": p, "created_at": now_ms}
            for n, h, k, m, p in entries
        ]
        with self.db.write() as conn:
            conn.execute(self.db.insert(function_versions).on_conflict_do_nothing(), rows)

    def load_function_version(self, name: str, version: str) -> bytes | None:
        """The stored payload of one version of a function."""
        fv = function_versions
        with self.db.read() as conn:
            payload = conn.execute(
                select(fv.c.payload).where(fv.c.name == name, fv.c.hash == version)
            ).scalar()
        return bytes(payload) if payload is not None else None

    def list_function_versions(self) -> list[tuple[str, str, str]]:
        """(name, hash, kind) of every stored version."""
        fv = function_versions
        with self.db.read() as conn:
            rows = conn.execute(select(fv.c.name, fv.c.hash, fv.c.kind)).all()
        return [(str(n), str(h), str(k)) for n, h, k in rows]

    def function_latest_hash(self, name: str) -> str | None:
        """The version last registered under a name (what a client's enqueue pins)."""
        with self.db.read() as conn:
            value = conn.execute(
                select(functions.c.source_hash).where(functions.c.name == name)
            ).scalar()
        return str(value) if value is not None else None

    def release_claim(self, workflow_id: str, owner_xid: str, now_ms: int) -> bool:
        """Give back a claimed workflow this process cannot run: ENQUEUED again, its attempt and
        its rate-limiter start uncounted."""
        with self.db.write() as conn:
            released = conn.execute(
                update(ws)
                .where(
                    ws.c.workflow_uuid == workflow_id,
                    ws.c.owner_xid == owner_xid,
                    ws.c.status == PENDING,
                )
                .values(
                    status=ENQUEUED,
                    owner_xid=None,
                    executor_id=None,
                    started_at_epoch_ms=None,
                    recovery_attempts=ws.c.recovery_attempts - 1,
                    updated_at=now_ms,
                )
            ).rowcount
            if released:
                latest = (
                    select(func.max(queue_starts.c.id))
                    .where(queue_starts.c.workflow_uuid == workflow_id)
                    .scalar_subquery()
                )
                conn.execute(delete(queue_starts).where(queue_starts.c.id == latest))
            return bool(released)

    def take_over_expired(self, now_ms: int, lease_ms: int, keep: str) -> dict[str, list[str]]:
        """Declare dead every executor (but `keep`) whose heartbeat is older than the lease, and
        put its PENDING workflows back in their queues, in one transaction. Returns the
        executors taken over and their requeued workflow ids.

        A dead executor that comes back finds its row gone and its workflows owned by others:
        its writes fail the owner checks, so it never overwrites the new owner's work.
        """
        taken: dict[str, list[str]] = {}
        with self.db.write() as conn:
            expired = list(
                conn.execute(
                    select(executors.c.executor_id).where(
                        executors.c.heartbeat_at < now_ms - lease_ms,
                        executors.c.executor_id != keep,
                    )
                ).scalars()
            )
            for executor_id in expired:
                conn.execute(delete(executors).where(executors.c.executor_id == executor_id))
                taken[executor_id] = self._requeue_pending(conn, executor_id, now_ms)
        return taken

    # -- rate limits: shared back-off and usage ---------------------------------------------------

    def pause_queue(self, queue_name: str, until_ms: int) -> None:
        """No process starts work from the queue before `until_ms` (extends, never shortens)."""
        with self.db.single() as conn:
            conn.execute(
                update(queues)
                .where(
                    queues.c.name == queue_name,
                    or_(queues.c.paused_until_ms.is_(None), queues.c.paused_until_ms < until_ms),
                )
                .values(paused_until_ms=until_ms)
            )

    def report_usage(
        self,
        workflow_id: str,
        tokens: int | None,
        cost: float | None,
        *,
        replace_estimate: bool,
    ) -> None:
        """Add a step's real usage to its workflow, and count its tokens in the queue's token
        window in place of the estimate (the first report replaces it, later ones add)."""
        with self.db.write() as conn:
            conn.execute(
                update(ws)
                .where(ws.c.workflow_uuid == workflow_id)
                .values(
                    usage_tokens=func.coalesce(ws.c.usage_tokens, 0) + (tokens or 0),
                    usage_cost=func.coalesce(ws.c.usage_cost, 0.0) + (cost or 0.0),
                )
            )
            if tokens is None:
                return
            latest = (
                select(func.max(queue_starts.c.id))
                .where(queue_starts.c.workflow_uuid == workflow_id)
                .scalar_subquery()
            )
            value = tokens if replace_estimate else queue_starts.c.tokens + tokens
            conn.execute(
                update(queue_starts).where(queue_starts.c.id == latest).values(tokens=value)
            )

    def batch_usage(self, batch_id: str) -> tuple[int, float]:
        """Total tokens and cost the batch's workflows reported."""
        with self.db.read() as conn:
            row = conn.execute(
                select(
                    func.coalesce(func.sum(ws.c.usage_tokens), 0),
                    func.coalesce(func.sum(ws.c.usage_cost), 0.0),
                ).where(ws.c.batch_id == batch_id)
            ).one()
        return int(row[0]), float(row[1])

    # -- executors ------------------------------------------------------------------------------

    def get_executor(self, executor_id: str) -> dict[str, Any] | None:
        """The executor's registration row."""
        with self.db.read() as conn:
            row = (
                conn.execute(select(executors).where(executors.c.executor_id == executor_id))
                .mappings()
                .first()
            )
            return dict(row) if row is not None else None

    def register_executor(
        self, executor_id: str, hostname: str, pid: int, token: str, now_ms: int
    ) -> None:
        """Claim an executor id for this process (replacing a dead holder's row)."""
        with self.db.write() as conn:
            conn.execute(delete(executors).where(executors.c.executor_id == executor_id))
            conn.execute(
                executors.insert().values(
                    executor_id=executor_id,
                    hostname=hostname,
                    pid=pid,
                    token=token,
                    started_at=now_ms,
                    heartbeat_at=now_ms,
                )
            )

    def heartbeat(self, executor_id: str, token: str, now_ms: int) -> bool:
        """Renew this process's heartbeat; False if another process took the executor id."""
        with self.db.write() as conn:
            return bool(
                conn.execute(
                    update(executors)
                    .where(executors.c.executor_id == executor_id, executors.c.token == token)
                    .values(heartbeat_at=now_ms)
                ).rowcount
            )

    def unregister_executor(self, executor_id: str, token: str) -> None:
        """Remove this process's executor row (at destroy)."""
        with self.db.write() as conn:
            conn.execute(
                delete(executors).where(
                    executors.c.executor_id == executor_id, executors.c.token == token
                )
            )

    def list_executors(self) -> list[dict[str, Any]]:
        """Every registered executor with its heartbeat."""
        with self.db.read() as conn:
            return [dict(r) for r in conn.execute(select(executors)).mappings()]


def queue_settings_from_row(row: dict[str, Any]) -> QueueSettings:
    """Build QueueSettings from a `queues` row."""
    return QueueSettings(
        name=row["name"],
        concurrency=row["concurrency"],
        worker_concurrency=row["worker_concurrency"],
        limit=row["rate_limit"],
        period_ms=row["rate_period_ms"],
        priority_enabled=bool(row["priority_enabled"]),
        polling_interval_ms=int(row["polling_interval_ms"]),
        token_limit=row.get("token_limit"),
        token_period_ms=row.get("token_period_ms"),
    )


def _row_values(wf: NewWorkflow) -> dict[str, Any]:
    return {
        "workflow_uuid": wf.workflow_id,
        "status": wf.status,
        "name": wf.name,
        "class_name": wf.class_name,
        "config_name": wf.config_name,
        "inputs": wf.inputs,
        "executor_id": wf.executor_id,
        "owner_xid": wf.owner_xid,
        "application_version": wf.application_version,
        "recovery_attempts": wf.recovery_attempts,
        "created_at": wf.created_at,
        "updated_at": wf.created_at,
        "queue_name": wf.queue_name,
        "priority": wf.priority,
        "deduplication_id": wf.deduplication_id,
        "started_at_epoch_ms": wf.started_at_epoch_ms,
        "workflow_timeout_ms": wf.workflow_timeout_ms,
        "workflow_deadline_epoch_ms": wf.workflow_deadline_epoch_ms,
        "parent_workflow_id": wf.parent_workflow_id,
        "batch_id": wf.batch_id,
        "function_hash": wf.function_hash,
        "token_estimate": wf.token_estimate,
    }


def _chunks(items: Sequence[str], size: int) -> list[Sequence[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


__all__ = ["NewWorkflow", "StepPreflight", "SystemStore", "queue_settings_from_row"]
