"""Claiming from a partitioned queue (DBOS's `partition_concurrency`,
`partition_worker_concurrency` and `partition_limiter`): which waiting rows the limits of their
own partition let start now.

A partitioned queue's work carries a partition key (`SetEnqueueOptions(queue_partition_key=)`),
and each partition has the limits apart: at most `partition_concurrency` of its workflows
running across all processes, `partition_worker_concurrency` in one process, and
`partition_limiter` starts per period. The queue's own limits still apply to the queue as a
whole, and the caller (`claims.claim`) has already turned them into the claim's budget.

`pick` runs inside the claim's transaction, under the queue row's lock, so its counts are
exact as the unpartitioned ones are. It reads, in one pass, each partition's oldest waiting rows
(no more per partition than one partition could ever start at once, so a deep backlog in one
partition is not read again at each claim, and does not hold up the others), then takes them in
queue order while their partition has room. Work enqueued without a key (by a client, or before
the queue was partitioned) forms one partition of its own rather than waiting for ever.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ARRAY, Connection, String, all_, any_, bindparam, func, or_, select

from dbos_nb.models import QueueSettings, WorkflowStatusString
from dbos_nb.storage.rate_ledger import next_opening, window_open
from dbos_nb.storage.schema import queue_starts, status_is, workflow_status

ws = workflow_status
qs = queue_starts
PENDING = WorkflowStatusString.PENDING.value
ENQUEUED = WorkflowStatusString.ENQUEUED.value

_KEY = ws.c.queue_partition_key
_RUNNING = (
    select(_KEY, func.count())
    .where(ws.c.queue_name == bindparam("q"), status_is(ws.c.status, PENDING))
    .group_by(_KEY)
)
_MINE = _RUNNING.where(ws.c.executor_id == bindparam("executor"))
_STARTS = select(qs.c.partition_key, qs.c.started_at_ms).where(
    qs.c.queue_name == bindparam("q"), qs.c.started_at_ms > bindparam("open")
)


@dataclass
class Pick:
    """What `pick` chose: the ids in the order they start, the partition of each, and what
    holds back the partitions that could not start all their waiting work."""

    ids: list[str] = field(default_factory=list)
    keys: dict[str, str | None] = field(default_factory=dict)
    # Some partition with waiting work is at its concurrency limit (a finish frees it).
    concurrency_bound: bool = False
    # When the first partition held back by its rate limit gets room again.
    next_rate_slot_ms: int | None = None


@functools.cache
def _heads_statement(priority_enabled: bool, by_name: bool, excluding: bool, postgres: bool) -> Any:
    """The first :cap waiting rows of each partition of queue :q, in queue order."""
    order = (ws.c.priority, ws.c.id) if priority_enabled else (ws.c.id,)
    rank = func.row_number().over(partition_by=_KEY, order_by=order).label("rank")
    inner = select(ws.c.workflow_uuid, _KEY.label("pkey"), ws.c.priority, ws.c.id, rank).where(
        ws.c.queue_name == bindparam("q"), status_is(ws.c.status, ENQUEUED)
    )
    if by_name:
        if postgres:
            inner = inner.where(ws.c.name == any_(bindparam("names", type_=ARRAY(String))))
        else:
            inner = inner.where(ws.c.name.in_(bindparam("names", expanding=True)))
    if excluding:
        if postgres:
            other = ws.c.function_hash != all_(bindparam("excluded", type_=ARRAY(String)))
        else:
            other = ws.c.function_hash.not_in(bindparam("excluded", expanding=True))
        inner = inner.where(or_(ws.c.function_hash.is_(None), other))
    heads = inner.subquery("heads")
    outer_order = (heads.c.priority, heads.c.id) if priority_enabled else (heads.c.id,)
    return (
        select(heads.c.workflow_uuid, heads.c.pkey)
        .where(heads.c.rank <= bindparam("cap"))
        .order_by(*outer_order)
    )


def pick(
    conn: Connection,
    queue: QueueSettings,
    executor_id: str,
    now_ms: int,
    budget: int,
    *,
    postgres: bool,
    names: list[str] | None,
    excluded: list[str],
) -> Pick:
    """Choose up to `budget` waiting rows of the partitioned `queue` that their partitions'
    limits let start at `now_ms` (in the claim's transaction, under the queue's lock)."""
    result = Pick()
    q = queue.name
    caps = [
        c
        for c in (
            queue.partition_concurrency,
            queue.partition_worker_concurrency,
            queue.partition_limit,
        )
        if c is not None
    ]
    running: dict[str | None, int] = {}
    mine: dict[str | None, int] = {}
    starts: dict[str | None, list[int]] = {}
    if queue.partition_concurrency is not None:
        running = {k: int(n) for k, n in conn.execute(_RUNNING, {"q": q})}
    if queue.partition_worker_concurrency is not None:
        mine = {k: int(n) for k, n in conn.execute(_MINE, {"q": q, "executor": executor_id})}
    if queue.partition_limit is not None and queue.partition_period_ms is not None:
        opened = window_open(now_ms, queue.partition_period_ms)
        for key, started in conn.execute(_STARTS, {"q": q, "open": opened}):
            starts.setdefault(key, []).append(int(started))
    params: dict[str, Any] = {"q": q, "cap": min(caps)}
    if names is not None:
        params["names"] = names
    if excluded:
        params["excluded"] = excluded
    heads = conn.execute(
        _heads_statement(queue.priority_enabled, names is not None, bool(excluded), postgres),
        params,
    ).all()
    room: dict[str | None, int] = {}
    for wid, key in heads:
        if len(result.ids) >= budget:
            break
        if key not in room:
            room[key] = _room(queue, key, running, mine, starts)
        if room[key] <= 0:
            continue
        room[key] -= 1
        result.ids.append(wid)
        result.keys[wid] = key
    filled = {k for k, left in room.items() if left <= 0}
    if filled and (
        queue.partition_concurrency is not None or queue.partition_worker_concurrency is not None
    ):
        # A partition full now (perhaps by this claim): its next finish lets work start.
        result.concurrency_bound = True
    if queue.partition_limit is not None and queue.partition_period_ms is not None:
        # The partitions this claim filled: their windows now hold its starts too, and the
        # scheduler must wake when the first of them has room again.
        for key in filled:
            entries = [(t, 1) for t in starts.get(key, [])]
            entries += [(now_ms, 1)] * sum(1 for w in result.ids if result.keys[w] == key)
            slot = next_opening(entries, queue.partition_limit, queue.partition_period_ms, 1)
            if slot is not None and (
                result.next_rate_slot_ms is None or slot < result.next_rate_slot_ms
            ):
                result.next_rate_slot_ms = slot
    return result


def _room(
    queue: QueueSettings,
    key: str | None,
    running: dict[str | None, int],
    mine: dict[str | None, int],
    starts: dict[str | None, list[int]],
) -> int:
    """How many more of partition `key`'s workflows may start now."""
    rooms = []
    if queue.partition_concurrency is not None:
        rooms.append(queue.partition_concurrency - running.get(key, 0))
    if queue.partition_worker_concurrency is not None:
        rooms.append(queue.partition_worker_concurrency - mine.get(key, 0))
    if queue.partition_limit is not None:
        rooms.append(queue.partition_limit - len(starts.get(key, [])))
    return min(rooms)
