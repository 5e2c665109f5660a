"""Queues' shared state: their declared settings, the back-off every process honours, and the
usage reported against their token windows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import ColumnElement, Exists, delete, func, or_, select, update

from dbos_nb.errors import InvalidQueueSettingsError, QueueNotEmptyError, UnknownQueueError
from dbos_nb.models import INTERNAL_QUEUE, QueueSettings, WorkflowStatusString
from dbos_nb.storage.rows import StoreBase
from dbos_nb.storage.schema import queue_starts, queues, workflow_status

ws = workflow_status
ENQUEUED, PENDING = WorkflowStatusString.ENQUEUED.value, WorkflowStatusString.PENDING.value


class QueueRecords(StoreBase):
    """Store and read queue settings; pause a queue; report usage."""

    def upsert_queue(self, settings: QueueSettings, now_ms: int) -> QueueSettings | None:
        """Store a queue's settings; returns the settings it replaced (None if it is new)."""
        values = {**_columns(settings), "updated_at": now_ms}
        # Insert first, doing nothing if the row exists: processes that launch at once all
        # declare the same queues, and a read-then-insert let two of them insert (PostgreSQL,
        # READ COMMITTED: a raw unique violation in the second one's launch).
        insert = (
            self.db.insert(queues)
            .values(name=settings.name, **values)
            .on_conflict_do_nothing(index_elements=["name"])
            .returning(queues.c.name)
        )
        with self.db.write() as conn:
            if conn.execute(insert).first() is not None:
                return None
            previous = (
                conn.execute(select(queues).where(queues.c.name == settings.name).with_for_update())
                .mappings()
                .one()
            )
            old_settings = queue_settings_from_row(dict(previous))
            if old_settings != settings:
                conn.execute(update(queues).where(queues.c.name == settings.name).values(**values))
            return old_settings

    def adopt_queue(self, settings: QueueSettings, now_ms: int) -> QueueSettings:
        """The queue's stored settings; `settings` are stored first if the queue is new."""
        insert = (
            self.db.insert(queues)
            .values(name=settings.name, updated_at=now_ms, **_columns(settings))
            .on_conflict_do_nothing(index_elements=["name"])
        )
        with self.db.write() as conn:
            conn.execute(insert)
            row = conn.execute(select(queues).where(queues.c.name == settings.name)).mappings()
            return queue_settings_from_row(dict(row.one()))

    def change_queue(
        self, name: str, change: Callable[[QueueSettings], QueueSettings], now_ms: int
    ) -> QueueSettings:
        """Change a stored queue's settings: `change` gets them as stored and returns the new
        ones, or raises (and nothing is written). Under the queue row's lock (PostgreSQL;
        SQLite's write transaction is exclusive), so that two processes changing two settings
        at once both land, each checked against the other's. Raises UnknownQueueError when
        the queue is not stored (never declared, or deleted)."""
        with self.db.write() as conn:
            row = self.db.lock_queue_row(conn, name)
            if row is None:
                raise UnknownQueueError(name)
            old = queue_settings_from_row(row)
            new = change(old)
            if new != old:
                values = {**_columns(new), "updated_at": now_ms}
                conn.execute(update(queues).where(queues.c.name == name).values(**values))
                # Other processes serving the queue claim again at once (PostgreSQL): a
                # loosened limit lets waiting work start.
                self.db.notify(conn, f"q:{name}")
            return new

    def get_queue(self, name: str) -> QueueSettings | None:
        """A queue's stored settings, or None when no process declared it."""
        with self.db.read() as conn:
            row = conn.execute(select(queues).where(queues.c.name == name)).mappings().first()
        return queue_settings_from_row(dict(row)) if row is not None else None

    def delete_queue(self, name: str) -> bool:
        """Delete a queue's stored settings and its rate limiter's record of starts; False if
        it had none. Refused (QueueNotEmptyError, nothing deleted) while workflows of the
        queue are enqueued or running: no process would ever start or resume them (DBOS
        deletes the queue all the same and calls them unrecoverable)."""
        if name == INTERNAL_QUEUE:
            raise InvalidQueueSettingsError(
                f"the internal queue {name!r} cannot be deleted: resumed, forked and taken-over "
                "workflows run through it"
            )
        with self.db.write() as conn:
            # Claims lock the queue's row (PostgreSQL): none is half way through meanwhile.
            if self.db.lock_queue_row(conn, name) is None:
                return False
            active = conn.execute(
                select(ws.c.status, func.count())
                .where(ws.c.queue_name == name, ws.c.status.in_((ENQUEUED, PENDING)))
                .group_by(ws.c.status)
            ).all()
            if active:
                raise QueueNotEmptyError(name, {str(s): int(n) for s, n in active})
            conn.execute(delete(queue_starts).where(queue_starts.c.queue_name == name))
            conn.execute(delete(queues).where(queues.c.name == name))
        return True

    def list_queues(self) -> list[QueueSettings]:
        """Every declared queue."""
        with self.db.read() as conn:
            rows = conn.execute(select(queues).order_by(queues.c.name)).mappings()
            return [queue_settings_from_row(dict(r)) for r in rows]

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
            queue_name = conn.execute(
                update(ws)
                .where(ws.c.workflow_uuid == workflow_id)
                .values(
                    usage_tokens=func.coalesce(ws.c.usage_tokens, 0) + (tokens or 0),
                    usage_cost=func.coalesce(ws.c.usage_cost, 0.0) + (cost or 0.0),
                )
                .returning(ws.c.queue_name)
            ).scalar()
            if tokens is None:
                return
            if queue_name is not None:
                # Real use below the estimate frees token budget that other processes' schedulers
                # may wait for (this one's is woken directly).
                self.db.notify(conn, f"q:{queue_name}")
            latest = (
                select(func.max(queue_starts.c.id))
                .where(queue_starts.c.workflow_uuid == workflow_id)
                .scalar_subquery()
            )
            value = tokens if replace_estimate else queue_starts.c.tokens + tokens
            conn.execute(
                update(queue_starts).where(queue_starts.c.id == latest).values(tokens=value)
            )


def unshared_now(
    name: ColumnElement[Any],
    worker_concurrency: ColumnElement[Any],
    now: ColumnElement[Any],
    *also: ColumnElement[bool],
) -> Exists:
    """SQL: the stored settings of queue `name` have no limit shared between processes (no
    concurrency, rate, token or partition limit; exactly this `worker_concurrency`, which only
    the process counted against it can hold), the queue is not paused at `now`, and `also`
    holds. What lets one statement claim (or start) the queue's work without locking or
    counting in the database; a setting changed meanwhile makes it false."""
    return (
        select(queues.c.name)
        .where(
            queues.c.name == name,
            queues.c.concurrency.is_(None),
            queues.c.worker_concurrency.is_not_distinct_from(worker_concurrency),
            queues.c.rate_limit.is_(None),
            queues.c.token_limit.is_(None),
            queues.c.partition_concurrency.is_(None),
            queues.c.partition_worker_concurrency.is_(None),
            queues.c.partition_rate_limit.is_(None),
            or_(queues.c.paused_until_ms.is_(None), queues.c.paused_until_ms <= now),
            *also,
        )
        .exists()
    )


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
        partition_concurrency=row.get("partition_concurrency"),
        partition_worker_concurrency=row.get("partition_worker_concurrency"),
        partition_limit=row.get("partition_rate_limit"),
        partition_period_ms=row.get("partition_rate_period_ms"),
    )


def _columns(settings: QueueSettings) -> dict[str, Any]:
    """The `queues` columns that hold a queue's settings."""
    return {
        "concurrency": settings.concurrency,
        "worker_concurrency": settings.worker_concurrency,
        "rate_limit": settings.limit,
        "rate_period_ms": settings.period_ms,
        "priority_enabled": settings.priority_enabled,
        "polling_interval_ms": settings.polling_interval_ms,
        "token_limit": settings.token_limit,
        "token_period_ms": settings.token_period_ms,
        "partition_concurrency": settings.partition_concurrency,
        "partition_worker_concurrency": settings.partition_worker_concurrency,
        "partition_rate_limit": settings.partition_limit,
        "partition_rate_period_ms": settings.partition_period_ms,
    }
