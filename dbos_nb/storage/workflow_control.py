"""Operator actions on workflows: cancel (also every workflow past its deadline), resume,
fork, delete.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Connection, bindparam, case, delete, func, literal_column, select, update

from dbos_nb.errors import WorkflowActiveError
from dbos_nb.models import ACTIVE_STATUSES, INTERNAL_QUEUE, WorkflowStatusString
from dbos_nb.storage.rows import CANCELLED, ENQUEUED, StoreBase, _chunks, requeued_afresh
from dbos_nb.storage.schema import operation_outputs, queues, status_is, workflow_status

ws = workflow_status
oo = operation_outputs

# The scheduler's sweep runs ten times a second while work runs: constant statements, compiled
# once and sent through the driver, cost the workers' GIL a fraction of building and compiling
# the query each time.
_OVERDUE = select(ws.c.workflow_uuid).where(
    ws.c.workflow_deadline_epoch_ms <= bindparam("now", type_=ws.c.workflow_deadline_epoch_ms.type),
    status_is(ws.c.status, *ACTIVE_STATUSES),
)
# Usually nothing is overdue: the sweep first asks for one row, in deadline order. PostgreSQL
# reads that through the index itself (for all rows it would collect them in a bitmap first),
# and an index scan marks the entries of dead row versions as it meets them: right after a
# large timed batch, the index still points at every finished row's old PENDING version until
# vacuum passes, and the sweep would visit them all, every time (4.5 ms a sweep after 50,000);
# this way only the first sweep does. The LIMIT is a literal so that the generic plan of the
# prepared statement knows it is 1.
_FIRST_OVERDUE = _OVERDUE.order_by(ws.c.workflow_deadline_epoch_ms).limit(literal_column("1"))


# Whether a row is still ENQUEUED or PENDING, as an expression that no index serves: a cancel
# names its rows by id, and the planner, seeing a status that its statistics call rare, would
# otherwise read the whole index of a status (every waiting row of a big batch) for each chunk
# of 500 ids (cancelling 60,000 waiting items took a minute on PostgreSQL).
_still_active = func.coalesce(ws.c.status, "").in_(ACTIVE_STATUSES)


def _children(conn: Connection, parents: Sequence[str], but_batch_items: bool = False) -> list[str]:
    """The ids of the workflows started by any of `parents` (`but_batch_items`: not the items
    of named batches), read in chunks (a statement takes at most 65,535 parameters on
    PostgreSQL)."""
    found: list[str] = []
    for chunk in _chunks(list(parents), 500):
        children = select(ws.c.workflow_uuid).where(ws.c.parent_workflow_id.in_(chunk))
        if but_batch_items:
            children = children.where(ws.c.batch_key.is_(None))
        found.extend(conn.execute(children).scalars())
    return found


class WorkflowControl(StoreBase):
    """Cancel, resume, fork and delete workflows."""

    def cancel_workflows(
        self, workflow_ids: Sequence[str], now_ms: int, *, cancel_children: bool
    ) -> list[str]:
        """Mark active workflows CANCELLED (with their descendants if asked); returns the ids
        changed. Finished workflows are left as they are. Idempotent."""
        changed: list[str] = []
        queues: set[str] = set()
        with self.db.write() as conn:
            frontier = list(workflow_ids)
            seen: set[str] = set()
            while frontier:
                batch = [w for w in frontier if w not in seen]
                seen.update(batch)
                if not batch:
                    break
                for chunk in _chunks(batch, 500):
                    rows = conn.execute(
                        update(ws)
                        .where(ws.c.workflow_uuid.in_(chunk), _still_active)
                        .values(
                            status=CANCELLED,
                            updated_at=now_ms,
                            completed_at=now_ms,
                            deduplication_id=None,
                        )
                        .returning(ws.c.workflow_uuid, ws.c.queue_name)
                    ).all()
                    changed.extend(row[0] for row in rows)
                    queues.update(row[1] for row in rows if row[1] is not None)
                if not cancel_children:
                    break
                frontier = _children(conn, batch)
            # A cancelled running workflow frees a slot of its queue: other processes'
            # schedulers may wait for it (the caller wakes this process's own).
            wakes = [f"q:{queue}" for queue in sorted(queues)]
            self.db.notify_many(conn, [f"done:{wid}" for wid in changed] + wakes)
        return changed

    def cancel_overdue(self, now_ms: int) -> list[str]:
        """Cancel every active workflow whose deadline has passed; returns their ids.

        Not their children as such: a child that inherited its parent's deadline holds it in
        its own row, so it is overdue too and cancelled in the same transaction; one started
        with its own timeout, or none (`SetWorkflowTimeout(None)`), opted out of the parent's
        deadline, and runs on, as in DBOS."""
        if self.db.read_row(_FIRST_OVERDUE, {"now": now_ms}) is None:
            return []
        ids = [row[0] for row in self.db.read_rows(_OVERDUE, {"now": now_ms})]
        if not ids:
            return []
        return self.cancel_workflows(ids, now_ms, cancel_children=False)

    def resume_workflows(
        self, workflow_ids: Sequence[str], now_ms: int, queue_name: str | None
    ) -> list[str]:
        """Put cancelled, dead-lettered or stuck workflows back in a queue, from their last
        completed step: `queue_name`, else each one's own queue (under that queue's limits: a
        batch's item resumed must not skip the rate limit it was enqueued under) if that is
        declared, else the internal queue. Finished (SUCCESS/ERROR) workflows are left alone;
        returns the ids that changed. One transaction for all."""
        declared = select(queues.c.name).where(queues.c.name == ws.c.queue_name).exists()
        own = case((declared, ws.c.queue_name), else_=INTERNAL_QUEUE)
        target = queue_name if queue_name is not None else own
        resumed: list[str] = []
        woken: set[str] = set()
        with self.db.write() as conn:
            for chunk in _chunks(list(dict.fromkeys(workflow_ids)), 500):
                rows = conn.execute(
                    update(ws)
                    .where(
                        ws.c.workflow_uuid.in_(chunk),
                        ws.c.status.not_in(
                            (WorkflowStatusString.SUCCESS.value, WorkflowStatusString.ERROR.value)
                        ),
                    )
                    .values(
                        {**requeued_afresh(now_ms), "queue_name": target, "deduplication_id": None}
                    )
                    .returning(ws.c.workflow_uuid, ws.c.queue_name)
                ).all()
                resumed.extend(row[0] for row in rows)
                woken.update(row[1] for row in rows)
            if woken:
                self.db.notify_many(conn, [f"q:{queue}" for queue in sorted(woken)])
        return resumed

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
                    # Into a named queue, the fork stays in its source's partition.
                    queue_partition_key=src["queue_partition_key"] if queue_name else None,
                    # No timeout, as in DBOS: a fork is often made to finish what timed out.
                    workflow_timeout_ms=None,
                    authenticated_user=src["authenticated_user"],
                    assumed_role=src["assumed_role"],
                    authenticated_roles=src["authenticated_roles"],
                    forked_from=source_id,
                )
            )
            conn.execute(
                update(ws).where(ws.c.workflow_uuid == source_id).values(was_forked_from=True)
            )
            steps = conn.execute(
                select(oo).where(oo.c.workflow_uuid == source_id, oo.c.function_id < start_step)
            ).mappings()
            copied = [dict(s, workflow_uuid=new_id) for s in steps]
            if copied:
                conn.execute(oo.insert(), copied)
            self.db.notify(conn, f"q:{target}")
            return True

    def delete_workflows(
        self,
        workflow_ids: Sequence[str],
        *,
        with_children: bool = True,
        refuse_active: bool = True,
        keep_batch_items: bool = False,
    ) -> list[str]:
        """Delete workflows (with their descendants, unless told not to) and their recorded
        operations, in one transaction; returns the ids deleted, none for an unknown id.
        Refuses, deleting nothing, when one of them is still ENQUEUED or PENDING (its execution
        would go on writing to rows that are gone), unless the caller knows that nothing runs
        them any more. `keep_batch_items`: the items of named batches among the descendants
        stay, with theirs (a durable cell run afresh maps its batch again and finds them)."""
        with self.db.write() as conn:
            doomed: list[str] = []
            seen: set[str] = set()
            frontier = list(workflow_ids)
            while frontier:
                frontier = [w for w in dict.fromkeys(frontier) if w not in seen]
                seen.update(frontier)
                doomed.extend(frontier)
                if not with_children or not frontier:
                    break
                frontier = _children(conn, frontier, keep_batch_items)
            deleted: list[str] = []
            for chunk in _chunks(doomed, 500):
                rows = delete(ws).where(ws.c.workflow_uuid.in_(chunk))
                if refuse_active:
                    # Checked in the DELETE itself: a row resumed and claimed a moment ago is
                    # not deleted (on PostgreSQL the condition is checked again on the row's
                    # newest version), and then refused below.
                    rows = rows.where(~status_is(ws.c.status, *ACTIVE_STATUSES))
                deleted.extend(conn.execute(rows.returning(ws.c.workflow_uuid)).scalars())
            gone = set(deleted)
            spared = [w for w in doomed if w not in gone]
            for chunk in _chunks(spared, 500) if refuse_active else ():
                active = conn.execute(
                    select(ws.c.workflow_uuid, ws.c.status).where(
                        ws.c.workflow_uuid.in_(chunk), status_is(ws.c.status, *ACTIVE_STATUSES)
                    )
                ).first()
                if active is not None:  # the transaction rolls back: nothing is deleted
                    raise WorkflowActiveError(active[0], active[1], "deleting it")
            for chunk in _chunks(deleted, 500):
                conn.execute(delete(oo).where(oo.c.workflow_uuid.in_(chunk)))
            return deleted
