"""Claiming queued work: one short transaction per queue that moves ENQUEUED rows to PENDING.

The claim first locks the queue's own row (PostgreSQL `SELECT ... FOR UPDATE`; on SQLite the
transaction's BEGIN IMMEDIATE already excludes every other writer). Claimers of one queue therefore
take turns for the length of one small transaction, and every count they make is exact:

- global concurrency: `concurrency - (PENDING rows of the queue)`, over all executors;
- worker concurrency: `worker_concurrency - (PENDING rows of the queue owned by this executor)`;
- rate limit: `limit - (starts in the ledger within the last period)`.

The budget is the smallest of these; that many ENQUEUED rows are taken in (priority,) enqueue order
and marked PENDING for this executor in the same transaction, and their starts enter the ledger
(`rate_ledger.py`).
Unrelated queues lock different rows and never wait on each other.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection
from typing import Any

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Boolean,
    Integer,
    String,
    all_,
    and_,
    any_,
    bindparam,
    func,
    or_,
    select,
    update,
)

from dbos_nb.ids import new_token
from dbos_nb.models import ClaimedWorkflow, ClaimResult, QueueSettings, WorkflowStatusString
from dbos_nb.storage import partitions, pgwire, rate_ledger
from dbos_nb.storage.database import Database
from dbos_nb.storage.queue_records import queue_settings_from_row, unshared_now
from dbos_nb.storage.schema import (
    operation_outputs,
    queues,
    status_is,
    workflow_status,
)

ws = workflow_status

PENDING = WorkflowStatusString.PENDING.value
ENQUEUED = WorkflowStatusString.ENQUEUED.value

# What stops a queue's next claim (ClaimResult.blocked).
BLOCKED_CONCURRENCY = "concurrency"
BLOCKED_RATE = "rate"
# Some partitions of a partitioned queue are held back by their own limits, others may not be.
BLOCKED_PARTITIONS = "partitions"

# Upper bound on rows taken by one claim, so one transaction stays short.
MAX_CLAIM_BATCH = 256

# What a resumed workflow already recorded, read with the claim instead of once per workflow.
# Exact: an ENQUEUED row has no owner, so no execution can record anything for it until the
# claim commits.
_LAST_RECORDED = (
    select(func.max(operation_outputs.c.function_id))
    .where(operation_outputs.c.workflow_uuid == ws.c.workflow_uuid)
    .scalar_subquery()
)


# The claim's statements, built once: building SQLAlchemy constructs costs more than running them.
_COUNT_RUNNING = (
    select(func.count())
    .select_from(ws)
    .where(ws.c.queue_name == bindparam("q"), status_is(ws.c.status, PENDING))
)
_COUNT_MINE = _COUNT_RUNNING.where(ws.c.executor_id == bindparam("executor"))
_NOW = bindparam("now", type_=BigInteger)
# ENQUEUED -> PENDING for this executor and a new owner token, the attempt counted.
_TAKE_VALUES: dict[str, Any] = {
    "status": PENDING,
    "executor_id": bindparam("executor"),
    "owner_xid": bindparam("owner"),
    "started_at_epoch_ms": _NOW,
    "updated_at": _NOW,
    "recovery_attempts": ws.c.recovery_attempts + 1,
    # Timeouts run from the dequeue; a deadline inherited from a parent stays.
    "workflow_deadline_epoch_ms": func.coalesce(
        ws.c.workflow_deadline_epoch_ms, _NOW + ws.c.workflow_timeout_ms
    ),
}
_TAKE = (
    update(ws)
    .where(
        ws.c.workflow_uuid.in_(bindparam("ids", expanding=True)), status_is(ws.c.status, ENQUEUED)
    )
    .values(_TAKE_VALUES)
)


# What a claim reads of each row it takes.
_CANDIDATE_COLUMNS = (
    ws.c.workflow_uuid,
    ws.c.name,
    ws.c.inputs,
    ws.c.workflow_timeout_ms,
    ws.c.workflow_deadline_epoch_ms,
    ws.c.recovery_attempts,
    ws.c.function_hash,
    ws.c.token_estimate,
    _LAST_RECORDED,
)


@functools.cache
def _candidates_statement(
    postgres: bool, priority_enabled: bool, by_name: bool, excluding: bool
) -> Any:
    """The ready rows of a queue, oldest (or most urgent) first, as far as the budget goes."""
    candidates = _ready_rows(
        ws,
        _CANDIDATE_COLUMNS,
        priority_enabled,
        by_name,
        excluding,
        postgres,
    )
    if postgres:
        candidates = candidates.with_for_update(skip_locked=True)
    return candidates


def _ready_rows(
    table: Any,
    columns: tuple[Any, ...],
    priority_enabled: bool,
    by_name: bool,
    excluding: bool,
    postgres: bool,
) -> Any:
    """ENQUEUED rows of queue :q, oldest (or most urgent) first, at most :n, restricted to the
    function names (:names) and away from the versions (:excluded) the claimer asks for.

    PostgreSQL takes the names and versions as arrays (`= ANY`), so the statement's text is the
    same whatever their number: compiled once, run on the driver (`prepared.py`). SQLite has no
    arrays: an `IN` list, which SQLAlchemy expands at each run."""
    queue: Any = bindparam("q")
    if postgres and not priority_enabled:
        # The queue as a range of one name, in order by (queue name, id): only the FIFO index
        # gives that order. With `queue_name = :q` and `ORDER BY id`, PostgreSQL may walk the
        # primary key instead, filtering: it expects a waiting row soon once its statistics
        # count many in the queue, but the queue's finished history comes first in id order
        # and each claim read all of it (100,000 finished rows: 27 ms a claim). An equality
        # would make the name a constant and the order by id alone again.
        in_queue = and_(table.c.queue_name >= queue, table.c.queue_name <= queue)
        order: tuple[Any, ...] = (table.c.queue_name, table.c.id)
    else:
        in_queue = table.c.queue_name == queue
        order = (table.c.priority, table.c.id) if priority_enabled else (table.c.id,)
    rows = (
        select(*columns)
        # The status as a literal: PostgreSQL's generic plans use the partial FIFO index only then.
        .where(in_queue, status_is(table.c.status, ENQUEUED))
        .order_by(*order)
        .limit(bindparam("n", type_=Integer))
    )
    if by_name:
        if postgres:
            rows = rows.where(table.c.name == any_(bindparam("names", type_=ARRAY(String))))
        else:
            rows = rows.where(table.c.name.in_(bindparam("names", expanding=True)))
    if excluding:
        if postgres:
            other_version = table.c.function_hash != all_(
                bindparam("excluded", type_=ARRAY(String))
            )
        else:
            other_version = table.c.function_hash.not_in(bindparam("excluded", expanding=True))
        rows = rows.where(or_(table.c.function_hash.is_(None), other_version))
    return rows


def claim(
    db: Database,
    queue_name: str,
    executor_id: str,
    clock: Callable[[], int],
    *,
    names: Collection[str] | None = None,
    exclude_versions: Collection[str] = (),
    max_rows: int = MAX_CLAIM_BATCH,
    running_here: int = 0,
) -> ClaimResult:
    """Claim as much ready work of one queue as its limits allow right now.

    `names` restricts the claim to workflows whose function this process can run (None: any);
    `exclude_versions` leaves out function versions it cannot load. `running_here`: how many
    workflows of the queue the claiming process counts as its own (its slots for work whose
    start it is still writing included); a worker_concurrency counts the larger of that and
    the executor's PENDING rows.
    Atomic: either every chosen row becomes PENDING for `executor_id` and its start is counted,
    or nothing changes. Rows are only ever taken from ENQUEUED, so two claimers never share one.
    `clock` gives epoch ms; it is read only once the queue is locked, so a claimer that waited
    for the lock does not record its starts at a time already in the past.
    """
    result = ClaimResult()
    if max_rows <= 0 or (names is not None and not names):
        return result
    with db.write() as conn:
        row = db.lock_queue_row(conn, queue_name)
        if row is None:
            return result
        now_ms = clock()
        queue = queue_settings_from_row(row)
        result.priority_enabled = queue.priority_enabled
        result.unshared = _is_unshared(queue) and row.get("paused_until_ms") is None
        result.worker_concurrency = queue.worker_concurrency
        budget = max_rows
        if queue.concurrency is not None:
            running = conn.execute(_COUNT_RUNNING, {"q": queue_name}).scalar_one()
            budget = min(budget, queue.concurrency - running)
        if queue.worker_concurrency is not None and budget > 0:
            mine = conn.execute(
                _COUNT_MINE, {"q": queue_name, "executor": executor_id}
            ).scalar_one()
            budget = min(budget, queue.worker_concurrency - max(mine, running_here))
        # What concurrency allows (None: no concurrency limit).
        limited = queue.concurrency is not None or queue.worker_concurrency is not None
        slots = budget if limited else None
        paused_until = row.get("paused_until_ms")
        if paused_until is not None and now_ms < paused_until:
            # A step of this queue was told "429, retry after ...": nobody starts work until then.
            result.next_rate_slot_ms = int(paused_until)
            result.blocked = BLOCKED_RATE
            return result
        windows = rate_ledger.read_windows(conn, queue, now_ms)
        if windows.room is not None:
            budget = min(budget, windows.room)
        tokens_left = windows.tokens_left
        if budget <= 0 or (tokens_left is not None and tokens_left <= 0):
            result.next_rate_slot_ms = _earliest(
                windows.next_slot() if budget <= 0 else None,
                # No candidate was read, so wait for room for the least one can need (1 token);
                # a token window with room left is not what stopped this claim (None).
                windows.token_slot(),
            )
            if slots is not None and slots <= 0:
                result.blocked = BLOCKED_CONCURRENCY
            elif result.next_rate_slot_ms is not None:
                result.blocked = BLOCKED_RATE
            return result

        picked: partitions.Pick | None = None
        if queue.partitioned:
            picked = partitions.pick(
                conn,
                queue,
                executor_id,
                now_ms,
                budget,
                postgres=db.is_postgres,
                names=None if names is None else list(names),
                excluded=list(exclude_versions),
            )
            rows: list[Any] = []
            if picked.ids:
                chosen = _chosen_statement(db.is_postgres, queue.priority_enabled)
                rows = list(conn.execute(chosen, {"ids": picked.ids}).all())
        else:
            candidates = _candidates_statement(
                db.is_postgres, queue.priority_enabled, names is not None, bool(exclude_versions)
            )
            params: dict[str, Any] = {"q": queue_name, "n": budget}
            if names is not None:
                params["names"] = list(names)
            if exclude_versions:
                params["excluded"] = list(exclude_versions)
            rows = list(conn.execute(candidates, params).all())
        raw = conn.connection.driver_connection
        if db.is_postgres and raw is not None:
            pgwire.note_received(raw, [r[2] for r in rows])
        estimates = [int(r[7] or 0) for r in rows]
        admitted, token_blocked = windows.fit_tokens(estimates)
        rows = rows[:admitted]
        if not rows:
            if token_blocked:
                result.next_rate_slot_ms = windows.token_slot(estimates[0])
                result.blocked = BLOCKED_RATE if result.next_rate_slot_ms is not None else None
            _note_partitions(result, picked)
            return result

        owner = new_token()
        ids = [r[0] for r in rows]
        conn.execute(_TAKE, {"ids": ids, "executor": executor_id, "owner": owner, "now": now_ms})
        ledgered = (
            queue.limit is not None
            or queue.token_limit is not None
            or queue.partition_limit is not None
        )
        if ledgered:
            rate_ledger.record_starts(
                conn,
                queue_name,
                now_ms,
                [(r[0], n) for r, n in zip(rows, estimates, strict=False)],
                picked.keys if picked is not None else None,
            )
            # The windows as this claim leaves them: the starts it just recorded decide when the
            # next slot opens as much as those it read (a window found empty has only those).
            windows.add(now_ms, estimates[:admitted])
            result.next_rate_slot_ms = _earliest(
                windows.next_slot(),
                windows.token_slot(estimates[admitted]) if token_blocked else None,
            )
        if slots is not None and len(ids) >= slots:
            result.blocked = BLOCKED_CONCURRENCY
        elif result.next_rate_slot_ms is not None:
            result.blocked = BLOCKED_RATE
        _note_partitions(result, picked)
        for r in rows:
            deadline = r[4]
            if deadline is None and r[3] is not None:
                deadline = now_ms + int(r[3])
            result.claimed.append(
                ClaimedWorkflow(
                    workflow_id=r[0],
                    name=r[1],
                    inputs=r[2],
                    queue_name=queue_name,
                    deadline_epoch_ms=deadline,
                    recovery_attempts=int(r[5]) + 1,
                    owner_xid=owner,
                    function_hash=r[6],
                    ledger_claimed_at_ms=now_ms if ledgered else None,
                    last_recorded_fid=-1 if r[8] is None else int(r[8]),
                )
            )
    return result


def _note_partitions(result: ClaimResult, picked: partitions.Pick | None) -> None:
    """A claim that the queue's own limits did not stop, but some partition's did: the next
    enqueue (to another partition), finish (in a full one) or rate slot may each let work
    start, so any of them is worth a claim."""
    if picked is None or result.blocked is not None:
        return
    if picked.concurrency_bound or picked.next_rate_slot_ms is not None:
        result.blocked = BLOCKED_PARTITIONS
        result.next_rate_slot_ms = _earliest(result.next_rate_slot_ms, picked.next_rate_slot_ms)


@functools.cache
def _chosen_statement(postgres: bool, priority_enabled: bool) -> Any:
    """The rows `partitions.pick` chose, with what the claim reads of each, still waiting (and
    on PostgreSQL locked, skipping any another transaction holds: a cancel, say)."""
    order = (ws.c.priority, ws.c.id) if priority_enabled else (ws.c.id,)
    chosen = (
        select(*_CANDIDATE_COLUMNS)
        .where(
            ws.c.workflow_uuid.in_(bindparam("ids", expanding=True)),
            status_is(ws.c.status, ENQUEUED),
        )
        .order_by(*order)
    )
    return chosen.with_for_update(skip_locked=True) if postgres else chosen


def claim_unshared(
    db: Database,
    queue_name: str,
    executor_id: str,
    clock: Callable[[], int],
    *,
    priority_enabled: bool,
    worker_concurrency: int | None = None,
    names: Collection[str] | None = None,
    exclude_versions: Collection[str] = (),
    max_rows: int = MAX_CLAIM_BATCH,
) -> list[ClaimedWorkflow]:
    """`claim` in one statement, for a queue with no limit shared between processes (as a
    previous `claim` found): no concurrency, rate or token limit, perhaps a worker_concurrency.

    With nothing shared to count there is nothing to lock: one UPDATE takes the oldest ENQUEUED
    rows (PostgreSQL: skipping rows another claimer is taking) and returns them, in one round
    trip. A worker_concurrency is the caller's to respect through `max_rows`: only this process
    claims for its executor, so it can count its own running workflows. The statement itself
    checks that the stored settings are still these and the queue is not paused; if not, it
    takes nothing, and the caller goes back to `claim`.
    """
    if max_rows <= 0 or (names is not None and not names):
        return []
    now_ms = clock()
    owner = new_token()
    stmt = _unshared_claim_statement(
        db.is_postgres, priority_enabled, names is not None, bool(exclude_versions)
    )
    params: dict[str, Any] = {
        "q": queue_name,
        "now": now_ms,
        "prio": priority_enabled,
        "wc": worker_concurrency,
        "n": max_rows,
        "executor": executor_id,
        "owner": owner,
    }
    if names is not None:
        params["names"] = list(names)
    if exclude_versions:
        params["excluded"] = list(exclude_versions)
    if db.is_postgres:
        # Compiled once and run on the driver: the scheduler's thread claims after every few
        # finished workflows of a busy queue, and SQLAlchemy's execution would cost more than
        # the statement.
        with db.driver_single() as raw:
            found = db.prepared(stmt).all(raw, params)
    else:
        with db.single() as conn:
            found = [tuple(r) for r in conn.execute(stmt, params)]
    rows = sorted(found, key=lambda r: r[0])
    return [
        ClaimedWorkflow(
            workflow_id=r[1],
            name=r[2],
            inputs=r[3],
            queue_name=queue_name,
            deadline_epoch_ms=r[4],
            recovery_attempts=int(r[5]),
            owner_xid=owner,
            function_hash=r[6],
            last_recorded_fid=-1 if r[7] is None else int(r[7]),
        )
        for r in rows
    ]


@functools.cache
def _unshared_claim_statement(
    postgres: bool, priority_enabled: bool, by_name: bool, excluding: bool
) -> Any:
    """The statement of `claim_unshared`, built once per variant (building SQLAlchemy
    constructs costs more than running them)."""
    now = _NOW
    still_unshared = unshared_now(
        bindparam("q"),
        bindparam("wc", type_=Integer),
        now,
        queues.c.priority_enabled == bindparam("prio", type_=Boolean),
    )
    # An alias, so that the pick is a subquery of its own and not correlated to the UPDATE.
    cand = ws.alias("candidate")
    picked = _ready_rows(
        cand, (cand.c.workflow_uuid,), priority_enabled, by_name, excluding, postgres
    ).where(still_unshared)
    if postgres:
        # A materialized CTE: as `IN (subquery)` PostgreSQL may run the pick once per row it
        # updates, and with SKIP LOCKED each run finds other rows, taking more than LIMIT.
        chosen = (
            picked.with_for_update(skip_locked=True)
            .cte("picked")
            .prefix_with("MATERIALIZED", dialect="postgresql")
        )
        # The picked rows are ENQUEUED and locked by this statement until it commits, so the
        # update repeats no status test: one would let the planner, misled by a young
        # table's statistics, join through the index of waiting rows, reading all of them
        # once per picked row.
        take = update(ws).where(ws.c.workflow_uuid == chosen.c.workflow_uuid)
    else:
        take = update(ws).where(
            ws.c.workflow_uuid.in_(picked.scalar_subquery()), status_is(ws.c.status, ENQUEUED)
        )
    return take.values(_TAKE_VALUES).returning(
        ws.c.id,
        ws.c.workflow_uuid,
        ws.c.name,
        ws.c.inputs,
        ws.c.workflow_deadline_epoch_ms,
        ws.c.recovery_attempts,
        ws.c.function_hash,
        _LAST_RECORDED.correlate(ws),
    )


def _is_unshared(queue: QueueSettings) -> bool:
    return (
        queue.concurrency is None
        and queue.limit is None
        and queue.token_limit is None
        and not queue.partitioned
    )


def _earliest(*times: int | None) -> int | None:
    present = [t for t in times if t is not None]
    return min(present) if present else None
