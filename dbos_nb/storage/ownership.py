"""Who runs a workflow: claiming one in the foreground, giving a claim back, putting the work of
a stopped or dead executor back in its queues, and telling executions they lost their workflow.

(Claiming queued work in bulk, under the queues' limits, is `claims.py`.)
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, case, delete, func, literal, select, update

from dbos_nb.models import INTERNAL_QUEUE
from dbos_nb.storage.executor_registry import forget_executor
from dbos_nb.storage.rows import CANCELLED, ENQUEUED, PENDING, StoreBase, _chunks
from dbos_nb.storage.schema import executors, queue_starts, status_is, workflow_status

ws = workflow_status


class WorkflowOwnership(StoreBase):
    """Claim, release, requeue and take over workflows; detect lost executions."""

    def claim_workflow(
        self, workflow_id: str, executor_id: str, owner_xid: str, now_ms: int
    ) -> dict[str, Any] | None:
        """Take one ENQUEUED workflow for this executor to run now (in the foreground).

        Returns its row, or None if it is not ENQUEUED (someone else has it, or it finished).
        """
        with self.db.write() as conn:
            done = conn.execute(
                update(ws)
                .where(ws.c.workflow_uuid == workflow_id, status_is(ws.c.status, ENQUEUED))
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

    def requeue_workflow(
        self,
        workflow_id: str,
        now_ms: int,
        owner_xid: str | None = None,
        *,
        wake_others: bool = True,
    ) -> bool:
        """Put a PENDING workflow that nothing runs any more back in its queue (the internal
        one if it has none), to run again from its last completed step; with `owner_xid`, only
        if that execution still owns it (one whose checkpoint lost the database, say). Its
        start stays counted, and its deadline stands. Whether it was put back. Other processes
        are woken to claim it unless `wake_others` is false (the caller claims it at once)."""
        pending = [ws.c.workflow_uuid == workflow_id, status_is(ws.c.status, PENDING)]
        if owner_xid is not None:
            pending.append(ws.c.owner_xid == owner_xid)
        with self.db.write() as conn:
            row = conn.execute(
                update(ws)
                .where(*pending)
                .values(
                    status=ENQUEUED,
                    owner_xid=None,
                    executor_id=None,
                    started_at_epoch_ms=None,
                    queue_name=func.coalesce(ws.c.queue_name, INTERNAL_QUEUE),
                    updated_at=now_ms,
                )
                .returning(ws.c.queue_name)
            ).first()
            if row is not None and wake_others:
                self.db.notify(conn, f"q:{row[0]}")
            return row is not None

    def release_claim(self, workflow_id: str, owner_xid: str, now_ms: int) -> bool:
        """Give back a claimed workflow this process cannot run: ENQUEUED again, its attempt and
        its rate-limiter start uncounted."""
        with self.db.write() as conn:
            released = conn.execute(
                update(ws)
                .where(
                    ws.c.workflow_uuid == workflow_id,
                    ws.c.owner_xid == owner_xid,
                    status_is(ws.c.status, PENDING),
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
                    status_is(ws.c.status, PENDING), ws.c.executor_id == executor_id
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
                .where(ws.c.workflow_uuid.in_(chunk), status_is(ws.c.status, PENDING))
                .values(status=ENQUEUED, owner_xid=None, executor_id=None, updated_at=now_ms)
            )
        if ids:
            self.db.notify(conn, "q:*")
        return ids

    def take_over_expired(
        self, now_ms: int, lease_ms: int, keep: str, silent_since: int = 0
    ) -> dict[str, list[str]]:
        """Declare dead every executor (but `keep`) whose heartbeat is older than its own
        lease, and put its PENDING workflows back in their queues, in one transaction. Returns
        the executors taken over and their requeued workflow ids.

        Each executor is judged by the lease it registered with, never by the judge's: a judge
        started with a short lease must not take the work of a live executor that renews less
        often than that (its in-flight steps would run twice). `lease_ms`, the judge's own, only
        serves rows registered without one (before schema version 5 had the column).

        Silence counts from `silent_since` at the earliest: the end of a time when the judge
        itself could not write, nor, probably, could the others.

        A dead executor that comes back finds its row gone and its workflows owned by others:
        its writes fail the owner checks, so it never overwrites the new owner's work.
        """
        taken: dict[str, list[str]] = {}
        with self.db.write() as conn:
            lease = func.coalesce(executors.c.lease_ms, lease_ms)
            heard = case(
                (executors.c.heartbeat_at > silent_since, executors.c.heartbeat_at),
                else_=literal(silent_since),
            )
            expired = list(
                conn.execute(
                    select(executors.c.executor_id).where(
                        heard + lease < now_ms,
                        executors.c.executor_id != keep,
                    )
                ).scalars()
            )
            for executor_id in expired:
                forget_executor(conn, executor_id)
                taken[executor_id] = self._requeue_pending(conn, executor_id, now_ms)
        return taken

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
