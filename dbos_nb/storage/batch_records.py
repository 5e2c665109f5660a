"""Batches: enqueueing many workflows at once (with the batch's record), retrying a batch's
failures, and reading a batch's progress, rows, errors and usage.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from sqlalchemy import Connection, case, delete, func, literal, select, update

from dbos_nb.errors import (
    BatchConflictError,
    BatchItemsConflictError,
    DBOSConflictingWorkflowError,
    UnknownQueueError,
    WorkflowPreempted,
)
from dbos_nb.models import INTERNAL_QUEUE, shown_function_name
from dbos_nb.storage.rows import (
    FAILED,
    NewWorkflow,
    StoreBase,
    _chunks,
    _row_values,
    in_batch,
    requeued_afresh,
)
from dbos_nb.storage.schema import (
    batch_key,
    batches,
    operation_outputs,
    queues,
    status_is,
    workflow_status,
)

ws = workflow_status
oo = operation_outputs


def _check_queues_declared(conn: Connection, batch_id: str, statuses: Sequence[str]) -> None:
    """Refuse to put a batch's workflows back in a queue that was deleted (DBOS.delete_queue):
    no process would start them there."""
    named = select(ws.c.queue_name).where(in_batch(batch_id), status_is(ws.c.status, *statuses))
    wanted = {name for name in conn.execute(named.distinct()).scalars() if name is not None}
    if not wanted:
        return
    stored = set(conn.execute(select(queues.c.name).where(queues.c.name.in_(wanted))).scalars())
    for name in sorted(wanted - stored):
        raise UnknownQueueError(name)


def _a_queue_that_runs_it() -> Any:
    """A workflow's own queue if it is still declared (stored), else the internal queue."""
    stored = select(queues.c.name).where(queues.c.name == ws.c.queue_name).exists()
    return case((stored, ws.c.queue_name), else_=literal(INTERNAL_QUEUE))


def item_index(workflow_id: str) -> int:
    """A batch item's index in its batch: the number its id ends with (`<batch id>/<index>`)."""
    return int(workflow_id.rsplit("/", 1)[-1])


def _in_item_order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A batch's rows in input order. Usually their insertion order already (the rows come
    sorted by it), but an item deleted and enqueued again by mapping the batch anew comes
    last there."""
    rows.sort(key=lambda row: item_index(str(row["workflow_uuid"])))
    return rows


class ParentRecord(NamedTuple):
    """A workflow's record of the batch it enqueued: one operation of the parent, naming the
    batch's base id as its child, written by the execution `owner_xid`."""

    workflow_id: str
    owner_xid: str
    function_id: int
    function_name: str
    child_workflow_id: str
    at_ms: int


def _write_parent_record(db: Any, conn: Connection, parent: ParentRecord) -> None:
    """Write the parent's record of the batch, if this execution still owns the parent (its
    row read FOR SHARE on PostgreSQL: a take-over waits for this transaction). The same record
    already there (an attempt whose reply was lost) is fine. Otherwise raises
    WorkflowPreempted, which rolls the batch back with it: a stale execution enqueues nothing."""
    owned = conn.execute(
        select(ws.c.id)
        .where(ws.c.workflow_uuid == parent.workflow_id, ws.c.owner_xid == parent.owner_xid)
        .with_for_update(read=True)
    ).first()
    existing = conn.execute(
        select(oo.c.function_name, oo.c.child_workflow_id).where(
            oo.c.workflow_uuid == parent.workflow_id, oo.c.function_id == parent.function_id
        )
    ).first()
    if existing is not None:
        if tuple(existing) != (parent.function_name, parent.child_workflow_id):
            raise WorkflowPreempted(parent.workflow_id, "taken over by another execution")
        return
    if owned is None:
        raise WorkflowPreempted(parent.workflow_id, "taken over by another execution")
    conn.execute(
        db.insert(oo).values(
            workflow_uuid=parent.workflow_id,
            function_id=parent.function_id,
            function_name=parent.function_name,
            child_workflow_id=parent.child_workflow_id,
            started_at_epoch_ms=parent.at_ms,
            completed_at_epoch_ms=parent.at_ms,
        )
    )


class BatchRecords(StoreBase):
    """Enqueue, retry and report on batches of workflows."""

    def insert_enqueued_batch(
        self,
        template: NewWorkflow,
        items: Sequence[tuple[str, bytes, int | None]],
        items_digest: str | None = None,
        parent: ParentRecord | None = None,
    ) -> None:
        """Enqueue many workflows that share everything but id and inputs, in one transaction.

        `items` are (workflow id, serialized inputs, token estimate), written in order (so they
        start in that order). Ids that already exist are skipped: enqueueing the same batch
        again writes nothing twice. With `template.batch_id` set, the batch is recorded too; a
        batch id already used for another function, queue or size, or for other items (when
        both calls give an `items_digest`), raises BatchConflictError. With `parent`, the
        enqueuing workflow's record of the batch is written in the same transaction: a crash
        cannot leave a batch its parent's replay does not know of. All or nothing.
        """
        if not items and parent is None:
            return
        base = _row_values(template)
        # Only the columns this batch sets: NULLs are the columns' defaults anyway, and every
        # bound parameter costs time over 100,000 rows.
        per_item = ("workflow_uuid", "inputs", "token_estimate")
        constants = {c: v for c, v in base.items() if c not in per_item and v is not None}
        estimates = any(e is not None for _, _, e in items)
        with self.db.write() as conn:
            if parent is not None:
                _write_parent_record(self.db, conn, parent)
            if not items:
                return
            recorded = False
            if template.batch_id is not None:
                recorded = self._record_batch(
                    conn, template, template.batch_id, len(items), items_digest
                )
            if estimates:
                inserted = self.db.bulk_insert(
                    conn,
                    ws,
                    ["workflow_uuid", "inputs", "token_estimate"],
                    list(items),
                    constants=constants,
                    skip_conflicts_on="workflow_uuid",
                )
            else:
                inserted = self.db.bulk_insert(
                    conn,
                    ws,
                    ["workflow_uuid", "inputs"],
                    [(wid, data) for wid, data, _ in items],
                    constants=constants,
                    skip_conflicts_on="workflow_uuid",
                )
            if inserted < len(items) and not recorded:
                # Ids were taken, and not by this batch's earlier run (its record was there
                # already then): by another function's workflow, they would answer for it.
                self._refuse_foreign(conn, [wid for wid, _, _ in items], template.name)
            if template.queue_name:
                self.db.notify(conn, f"q:{template.queue_name}")

    def _refuse_foreign(self, conn: Connection, ids: list[str], name: str) -> None:
        """Raise DBOSConflictingWorkflowError if one of `ids` belongs to another function."""
        for chunk in _chunks(ids, 500):
            row = conn.execute(
                select(ws.c.workflow_uuid, ws.c.name)
                .where(ws.c.workflow_uuid.in_(chunk), ws.c.name != name)
                .limit(1)
            ).first()
            if row is not None:
                raise DBOSConflictingWorkflowError(
                    str(row[0]),
                    f"it belongs to workflow {row[1]!r}, not {name!r}; enqueue the batch under "
                    "another batch id",
                )

    def _record_batch(
        self,
        conn: Connection,
        template: NewWorkflow,
        batch_id: str,
        size: int,
        items_digest: str | None,
    ) -> bool:
        """Record the batch, or check the record already there against this call; whether
        the record was there already."""
        key = batch_key(batch_id)
        values = {
            "batch_id": batch_id,
            "batch_key": key,
            "queue_name": template.queue_name,
            "function_name": template.name,
            "size": size,
            "created_at": template.created_at,
            "items_digest": items_digest,
        }
        created = conn.execute(
            self.db.insert(batches)
            .values(**values)
            .on_conflict_do_nothing()
            .returning(batches.c.batch_id)
        ).first()
        if created is not None:
            return False
        row = conn.execute(select(batches).where(batches.c.batch_id == batch_id)).mappings().first()
        if row is None:  # not there, yet not inserted: another batch id has the same key
            other = conn.execute(
                select(batches.c.batch_id).where(batches.c.batch_key == key)
            ).scalar()
            raise BatchConflictError(
                f"batch id {batch_id!r} has the same 64-bit key as the existing "
                f"batch {other!r} (a hash collision); use another batch id"
            )
        mismatched = [k for k in ("queue_name", "function_name", "size") if row[k] != values[k]]
        if mismatched:
            raise BatchConflictError(
                f"batch {batch_id!r} already exists with {row['size']} items of "
                f"{shown_function_name(row['function_name'])!r} on queue "
                f"{row['queue_name']!r}; this call has {size} items of "
                f"{shown_function_name(template.name)!r} on {template.queue_name!r}. Use another "
                "batch name (or the same items and function to attach to it)"
            )
        # The partition is the batch's too (its items were enqueued in one): the same items
        # mapped for another tenant would only attach to the first tenant's.
        partition = conn.execute(
            select(ws.c.queue_partition_key).where(in_batch(batch_id)).limit(1)
        ).first()
        if partition is not None and partition[0] != template.queue_partition_key:
            raise BatchConflictError(
                f"batch {batch_id!r} already exists in partition {partition[0]!r} of queue "
                f"{row['queue_name']!r}; this call enqueues into partition "
                f"{template.queue_partition_key!r}. Use another batch name for this partition"
            )
        stored = row["items_digest"]
        if stored is not None and items_digest is not None and stored != items_digest:
            raise BatchItemsConflictError(
                f"batch {batch_id!r} already exists with other items (the same "
                f"number, {size}, of {shown_function_name(template.name)!r}); running it again "
                "under this name would only attach to the old items. Use another batch name "
                "for these items, "
                f"or Batch.attach({batch_id!r}) to follow the existing batch"
            )
        if stored is None and items_digest is not None:
            # A batch recorded without a digest (before digests were kept, or by an
            # enqueue_many that asked for no check): these items are compared with from now on.
            conn.execute(
                update(batches)
                .where(batches.c.batch_id == batch_id)
                .values(items_digest=items_digest)
            )
        return True

    def run_again_in_batch(
        self,
        batch_id: str,
        now_ms: int,
        statuses: Sequence[str] = FAILED,
        *,
        version: str | None = None,
    ) -> list[str]:
        """Put the batch's workflows that ended in one of `statuses` (by default failed: ERROR,
        or given up after too many recoveries; or CANCELLED) back in their queue, in one
        transaction; returns their ids.

        Their failed operations' records are removed so those run again; their completed
        operations stay recorded and are not run again (no call is paid for twice). Their
        descendants that ended so go back too (to their queue, or the internal one if it has
        none or it was deleted since, where no process would start them): an item
        replaying a child workflow's recorded failure or cancellation would only end so again.
        With `version`, the batch's own items run that version of their function from now on.
        """
        with self.db.write() as conn:
            ids = list(
                conn.execute(
                    select(ws.c.workflow_uuid).where(
                        in_batch(batch_id), status_is(ws.c.status, *statuses)
                    )
                ).scalars()
            )
            _check_queues_declared(conn, batch_id, statuses)
            retried = list(ids)
            frontier = ids
            while frontier:
                frontier = [
                    wid
                    for chunk in _chunks(frontier, 500)
                    for wid in conn.execute(
                        select(ws.c.workflow_uuid).where(
                            ws.c.parent_workflow_id.in_(chunk), status_is(ws.c.status, *statuses)
                        )
                    ).scalars()
                ]
                retried.extend(frontier)
            queues: set[str] = set()
            for chunk in _chunks(retried, 500):
                conn.execute(
                    delete(oo).where(oo.c.workflow_uuid.in_(chunk), oo.c.error.is_not(None))
                )
                queues.update(
                    conn.execute(
                        update(ws)
                        .where(ws.c.workflow_uuid.in_(chunk), status_is(ws.c.status, *statuses))
                        .values(
                            {
                                **requeued_afresh(now_ms),
                                "queue_name": _a_queue_that_runs_it(),
                                "error": None,
                                "output": None,
                                "completed_at": None,
                            }
                        )
                        .returning(ws.c.queue_name)
                    ).scalars()
                )
            if version is not None:
                for chunk in _chunks(ids, 500):
                    conn.execute(
                        update(ws)
                        .where(ws.c.workflow_uuid.in_(chunk))
                        .values(function_hash=version)
                    )
            for queue in sorted(queues):
                self.db.notify(conn, f"q:{queue}")
            return ids

    def get_batch(self, batch_id: str) -> dict[str, Any] | None:
        """A batch's record: queue, function, size, creation time."""
        return self._read_one(select(batches).where(batches.c.batch_id == batch_id))

    def list_batches(self) -> list[dict[str, Any]]:
        """Every recorded batch, newest first."""
        with self.db.read() as conn:
            rows = conn.execute(select(batches).order_by(batches.c.created_at.desc())).mappings()
            return [dict(r) for r in rows]

    def batch_counts(self, batch_id: str) -> dict[str, int]:
        """Number of the batch's workflows per status (one indexed GROUP BY)."""
        with self.db.read() as conn:
            rows = conn.execute(
                select(ws.c.status, func.count()).where(in_batch(batch_id)).group_by(ws.c.status)
            )
            return {str(status): int(n) for status, n in rows}

    def batch_finished_since(self, batch_id: str, since_ms: int) -> int:
        """How many of the batch's workflows finished at or after `since_ms`."""
        with self.db.read() as conn:
            return int(
                conn.execute(
                    select(func.count()).where(in_batch(batch_id), ws.c.completed_at >= since_ms)
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
                select(*columns).where(in_batch(batch_id)).order_by(ws.c.id)
            ).mappings()
            return _in_item_order([dict(r) for r in rows])

    def batch_outputs(self, batch_id: str) -> list[dict[str, Any]]:
        """The outcome columns of the batch's items in input order (id, status, output, error,
        deadline, completion time): what `results()` needs, without the inputs (large items
        made it read every payload twice)."""
        columns = (
            ws.c.workflow_uuid,
            ws.c.status,
            ws.c.output,
            ws.c.error,
            ws.c.workflow_deadline_epoch_ms,
            ws.c.completed_at,
        )
        with self.db.read() as conn:
            rows = conn.execute(select(*columns).where(in_batch(batch_id)).order_by(ws.c.id))
            return _in_item_order([dict(r) for r in rows.mappings()])

    def batch_function_version(self, batch_id: str) -> str | None:
        """The function version the batch's first item was enqueued with (None: no such item
        or no version recorded)."""
        with self.db.read() as conn:
            value = conn.execute(
                select(ws.c.function_hash).where(ws.c.workflow_uuid == f"{batch_id}/0")
            ).scalar()
        return None if value is None else str(value)

    def batch_inputs(self, batch_id: str) -> list[bytes | None]:
        """The batch's serialized inputs, in input order."""
        with self.db.read() as conn:
            rows = conn.execute(
                select(ws.c.workflow_uuid, ws.c.inputs).where(in_batch(batch_id)).order_by(ws.c.id)
            ).mappings()
            return [r["inputs"] for r in _in_item_order([dict(r) for r in rows])]

    def batch_recent_errors(self, batch_id: str, limit: int) -> list[tuple[str, bytes | None]]:
        """(workflow id, serialized error) of the batch's latest failures."""
        with self.db.read() as conn:
            rows = conn.execute(
                select(ws.c.workflow_uuid, ws.c.error)
                .where(in_batch(batch_id), status_is(ws.c.status, *FAILED))
                .order_by(ws.c.updated_at.desc())
                .limit(limit)
            ).all()
            return [(str(r[0]), r[1]) for r in rows]

    def batch_usage(self, batch_id: str) -> tuple[int, float]:
        """Total tokens and cost the batch's workflows reported."""
        with self.db.read() as conn:
            row = conn.execute(
                select(
                    func.coalesce(func.sum(ws.c.usage_tokens), 0),
                    func.coalesce(func.sum(ws.c.usage_cost), 0.0),
                ).where(in_batch(batch_id))
            ).one()
        return int(row[0]), float(row[1])
