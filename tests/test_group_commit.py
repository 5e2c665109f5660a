"""The hot write paths: group commit, what a claim tells the execution, skipped claims, and
cancellation seen without notifications.

Group commit is made deterministic by blocking the committer's first statement behind a
transaction this test holds (SQLite: the write lock; PostgreSQL: a row lock), so that every other
statement queues up and must run in the next batch.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest
from sqlalchemy import bindparam, insert, select, text

from conftest import config, insert_pending, wait_until
from dbos_nb import DBOS, DBOSClient, Queue
from dbos_nb.core.runtime import get_runtime
from dbos_nb.errors import DBOSQueueDeduplicatedError, WorkflowPreempted
from dbos_nb.models import QueueSettings
from dbos_nb.storage import claims
from dbos_nb.storage.database import Database
from dbos_nb.storage.listener import Listener
from dbos_nb.storage.merged import DONES_PER_NOTIFICATION, MERGE_FROM
from dbos_nb.storage.schema import operation_outputs, workflow_status
from dbos_nb.storage.store import NewWorkflow, SystemStore


def _pending(store: SystemStore, prefix: str, n: int, queue_name: str | None = None) -> list[str]:
    ids = [f"{prefix}{i}" for i in range(n)]
    for i, wid in enumerate(ids):
        insert_pending(store, wid, f"owner-{i}", queue_name)
    return ids


@contextmanager
def _held(
    db: Database, first_step: tuple[str, int] | None, first_row: str | None
) -> Iterator[None]:
    """Hold what the committer's first statement needs until the block ends (then roll back)."""

    class Release(Exception):
        pass

    try:
        with db.write() as conn:
            if db.is_postgres and first_step is not None:
                conn.execute(
                    insert(operation_outputs).values(
                        workflow_uuid=first_step[0], function_id=first_step[1], function_name="x"
                    )
                )
            if db.is_postgres and first_row is not None:
                conn.execute(
                    select(workflow_status.c.id)
                    .where(workflow_status.c.workflow_uuid == first_row)
                    .with_for_update()
                )
            yield
            raise Release
    except Release:
        pass


def _run_queued(
    db: Database, calls: list[Callable[[], Any]]
) -> tuple[list[Any], list[threading.Thread]]:
    """Start calls[0], wait until the committer holds it, start the rest, wait until they all
    queue behind it; returns each call's result or exception once the caller releases."""
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except BaseException as exc:  # WorkflowPreempted is one: user code must not catch it
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    threads[0].start()
    wait_until(lambda: db.committer.started and db.committer.waiting == 0)
    time.sleep(0.05)  # the committer took it and is blocked on the held lock
    for t in threads[1:]:
        t.start()
    wait_until(lambda: db.committer.waiting == len(calls) - 1)
    return results, threads


# A few statements of a kind are sent one by one in the batch's pipeline, many as one statement
# (PostgreSQL; SQLite shares a transaction either way).
SIZES = [12, MERGE_FROM + 8]


@pytest.mark.parametrize("n", SIZES, ids=["few", "many"])
def test_waiting_step_records_share_one_commit(launched: str, n: int) -> None:
    rt = get_runtime()
    db, store = rt.db, rt.store
    ids = _pending(store, "gc-step-", n)

    def record(i: int) -> Callable[[], Any]:
        owner = f"owner-{i}" if i != 5 else "someone-else"
        return lambda: store.record_step(ids[i], owner, 0, "s", b"out", None, 1, 2)

    before = (db.committer.batches, db.committer.statements)
    with _held(db, (ids[0], 0), None):
        results, threads = _run_queued(db, [record(i) for i in range(n)])
    for t in threads:
        t.join(20)
    batches = db.committer.batches - before[0]
    statements = db.committer.statements - before[1]
    # The held one alone, then all the others together. The stale execution's outcome is kept
    # too, since nobody had recorded that step (the owner will replay it): a write of its own,
    # through the committer on SQLite, beside it on PostgreSQL (a statement without a kind).
    assert (batches, statements) == ((2, n) if db.is_postgres else (3, n + 1))
    assert isinstance(results[5], WorkflowPreempted)  # but the stale execution must stop
    assert [r for i, r in enumerate(results) if i != 5] == [None] * (n - 1)
    with db.read() as conn:
        rows = conn.execute(select(operation_outputs.c.workflow_uuid)).scalars().all()
    assert sorted(rows) == sorted(ids)


@pytest.mark.parametrize("n", SIZES, ids=["few", "many"])
def test_waiting_finishes_share_one_commit(launched: str, n: int) -> None:
    rt = get_runtime()
    db, store = rt.db, rt.store
    ids = _pending(store, "gc-fin-", n)

    def finish(i: int) -> Callable[[], Any]:
        owner = f"owner-{i}" if i != 3 else "stale"
        return lambda: store.finish_workflow(ids[i], owner, "SUCCESS", b"v", None, 5)

    with _held(db, None, ids[0]):
        results, threads = _run_queued(db, [finish(i) for i in range(n)])
    for t in threads:
        t.join(20)
    assert results[3] == (False, None)
    assert [r for i, r in enumerate(results) if i != 3] == [(True, None)] * (n - 1)
    for i, wid in enumerate(ids):
        row = store.get_workflow(wid)
        assert row is not None
        assert row["status"] == ("PENDING" if i == 3 else "SUCCESS")


@pytest.mark.parametrize(
    ("n", "limits", "wakes"),
    [
        (6, {"concurrency": 1000}, 2),
        (2 * DONES_PER_NOTIFICATION + 3, {"concurrency": 1000}, 2),
        (6, {"worker_concurrency": 1000}, 0),
        (2 * DONES_PER_NOTIFICATION + 3, {"worker_concurrency": 1000}, 0),
    ],
    ids=["few", "many", "few-local-limit", "many-local-limit"],
)
def test_finishes_committed_together_are_announced_together(
    launched_pg: str, n: int, limits: dict[str, int], wakes: int
) -> None:
    """Other processes learn of workflows that finished in one batch from a few notifications
    (JSON lists of ids, whatever characters the ids hold), not one each, and wake whoever
    waits on them; the one-row finish still announces its workflow alone. Here a second
    `Database` (its own origin, as another process) finishes the workflows; this process's
    worker and a third listener receive the notifications."""
    rt = get_runtime()
    # Only a slot of a queue with a global concurrency limit is worth waking others for.
    rt.store.upsert_queue(QueueSettings("gc-note-queue", **limits), 1)
    ids = _pending(rt.store, 'gc-note-,"\\ é ', n, queue_name="gc-note-queue")
    finisher = Database(launched_pg)
    store = SystemStore(finisher)
    payloads: list[str] = []
    stop = threading.Event()
    spy = Database(launched_pg)
    spying = Listener(spy, payloads.append)
    listener = threading.Thread(target=spying.run, args=(stop,))
    listener.start()
    try:
        with ExitStack() as watching:
            woken = [watching.enter_context(rt.waiters.watch(wid)) for wid in ids]
            # Waiting: this process's listener listens for finishes (see test_listener.py).
            watching.enter_context(rt.waiters.waiting())
            time.sleep(0.5)  # listening
            with _held(finisher, None, ids[0]):
                results, threads = _run_queued(
                    finisher,
                    [
                        (
                            lambda i=i: store.finish_workflow(
                                ids[i], f"owner-{i}", "SUCCESS", b"v", None, 5
                            )
                        )
                        for i in range(n)
                    ],
                )
            for t in threads:
                t.join(20)
            assert results == [(True, "gc-note-queue")] * n
            wait_until(lambda: all(event.is_set() for event in woken))
        announced: list[str] = []
        wait_until(lambda: _announced(payloads, announced) >= n)
    finally:
        stop.set()
        listener.join(10)
        spy.dispose()
        finisher.dispose()
    assert sorted(announced) == sorted(ids)  # each once
    # The first finish ran alone ("done:<id>"); the other n - 1 shared a statement.
    assert [p for p in payloads if p.startswith("done:")] == [f"done:{ids[0]}"]
    lists = [p for p in payloads if p.startswith("dones:")]
    assert len(lists) == math.ceil((n - 1) / DONES_PER_NOTIFICATION)
    # With a global limit, their queue's schedulers are woken once per transaction: the lone
    # finish, then the batch (merged or one by one); otherwise not at all.
    assert [p for p in payloads if p.startswith("q:")] == ["q:gc-note-queue"] * wakes


@pytest.mark.parametrize(
    ("notifications", "per_kind"),
    [(True, 6), (False, 6), (True, MERGE_FROM + 2)],
    ids=["notifying-few", "quiet-few", "notifying-many"],
)
def test_step_records_and_finishes_waiting_together_commit_together(
    launched_pg: str, notifications: bool, per_kind: int
) -> None:
    """On PostgreSQL a batch's kinds of statements are sent together and commit as one
    transaction: the rows they write carry the same transaction id (xmin). If one statement
    fails, the batch is rolled back and run again statement by statement: only the failing
    caller gets an error and nothing of the others is lost. (Here a `Database` of its own,
    with or without notifications, writes; a few statements of a kind are sent one by one,
    many as one.)"""
    db = Database(launched_pg, notifications=notifications)
    try:
        _mixed_batches(db, SystemStore(db), per_kind)
    finally:
        db.dispose()


def test_without_pipeline_mode_a_batch_is_still_one_transaction(
    launched_pg: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a libpq older than 14 (no pipeline mode) a batch is one explicit transaction."""
    import psycopg

    monkeypatch.setattr(psycopg.Pipeline, "is_supported", classmethod(lambda cls: False))
    db = Database(launched_pg)
    try:
        _mixed_batches(db, SystemStore(db), 6)
    finally:
        db.dispose()


def test_a_statement_refused_before_it_is_sent_leaves_nothing_of_its_batch(
    launched_pg: str,
) -> None:
    """psycopg refuses text holding a NUL character while it queues the batch, after the
    statements before it were sent. None of them may commit: run again one by one, the others
    still answer that their outcome was recorded (not that someone else took the workflow),
    and only the refused caller gets the error."""
    db = Database(launched_pg)
    store = SystemStore(db)
    try:
        ids = _pending(store, "gc-nul-", 7)
        before = db.committer.batches

        def finish(i: int) -> Callable[[], Any]:
            output = b"v"
            status = "SUCCESS" if i != 4 else "SUC\x00CESS"
            return lambda: store.finish_workflow(ids[i], f"owner-{i}", status, output, None, 5)

        with _held(db, None, ids[0]):
            results, threads = _run_queued(db, [finish(i) for i in range(7)])
        for t in threads:
            t.join(20)
        assert db.committer.batches - before == 2
        assert "NUL" in str(results[4])
        assert [r for i, r in enumerate(results) if i != 4] == [(True, None)] * 6
        for i, wid in enumerate(ids):
            row = store.get_workflow(wid)
            assert row is not None
            assert row["status"] == ("PENDING" if i == 4 else "SUCCESS")
    finally:
        db.dispose()


def _mixed_batches(db: Database, store: SystemStore, per_kind: int) -> None:
    """Step records of `per_kind` workflows and finishes of `per_kind` others, queued behind a
    held first record: one batch, one transaction. Then the same with a failing record."""
    n = 1 + 2 * per_kind
    ids = _pending(store, "gc-mixed-", n)

    def record(i: int) -> Callable[[], Any]:
        return lambda: store.record_step(ids[i], f"owner-{i}", 0, "s", b"out", None, 1, 2)

    def finish(i: int) -> Callable[[], Any]:
        return lambda: store.finish_workflow(ids[i], f"owner-{i}", "SUCCESS", b"v", None, 5)

    steps_to = 1 + per_kind
    calls = [record(i) for i in range(steps_to)] + [finish(i) for i in range(steps_to, n)]
    before = db.committer.batches
    with _held(db, (ids[0], 0), None):
        results, threads = _run_queued(db, calls)
    for t in threads:
        t.join(20)
    assert db.committer.batches - before == 2  # the held record alone, then all the others
    assert results == [None] * steps_to + [(True, None)] * per_kind
    with db.read() as conn:
        steps = conn.execute(
            text(
                "SELECT workflow_uuid, xmin::text FROM dbos_nb.operation_outputs"
                " WHERE workflow_uuid LIKE 'gc-mixed-%'"
            )
        ).all()
        finished = conn.execute(
            text(
                "SELECT workflow_uuid, xmin::text FROM dbos_nb.workflow_status"
                " WHERE workflow_uuid LIKE 'gc-mixed-%' AND status = 'SUCCESS'"
            )
        ).all()
    assert sorted(w for w, _ in steps) == sorted(ids[:steps_to])
    assert sorted(w for w, _ in finished) == sorted(ids[steps_to:])
    held_alone = {x for w, x in steps if w == ids[0]}
    together = {x for w, x in steps + finished if w != ids[0]}
    assert len(together) == 1 and together != held_alone

    # The same with a failing step record among them (NULL in a NOT NULL column).
    more = _pending(store, "gc-mixfail-", n)

    def bad_or_good(i: int) -> Callable[[], Any]:
        name: Any = None if i == 3 else "s"
        return lambda: store.record_step(more[i], f"owner-{i}", 0, name, b"out", None, 1, 2)

    def finish_more(i: int) -> Callable[[], Any]:
        return lambda: store.finish_workflow(more[i], f"owner-{i}", "SUCCESS", b"v", None, 5)

    calls = [bad_or_good(i) for i in range(steps_to)] + [finish_more(i) for i in range(steps_to, n)]
    with _held(db, (more[0], 0), None):
        results, threads = _run_queued(db, calls)
    for t in threads:
        t.join(20)
    assert "NOT NULL" in str(results[3]).upper() or "function_name" in str(results[3])
    expected = [None] * (steps_to - 1) + [(True, None)] * per_kind
    assert [r for i, r in enumerate(results) if i != 3] == expected
    for i, wid in enumerate(more):
        row = store.get_workflow(wid)
        assert row is not None
        assert row["status"] == ("SUCCESS" if i >= steps_to else "PENDING")
        assert store.step_preflight(wid, 0).recorded == (i < steps_to and i != 3)


def test_announced_id_lists_fit_a_notification() -> None:
    """Ids up to the column's 255 characters, even ones JSON must escape or that take four
    bytes a character, are split into lists under PostgreSQL's 8,000-byte payload limit, in
    order, each id once."""
    import json

    from dbos_nb.storage.merged import _id_lists

    ids = ["a" * 255] * 60 + ['"\\' * 85] * 30 + ["😀" * 255] * 10 + ["x"] * 3
    lists = _id_lists(ids)
    assert all(len(f"{'o' * 12}|dones:{text}".encode()) < 8000 for text in lists)
    assert [wid for text in lists for wid in json.loads(text)] == ids
    assert all(len(json.loads(text)) <= DONES_PER_NOTIFICATION for text in lists)
    assert len(_id_lists(["u" * 36] * 52)) == 3  # uuids: 25 to a list


def _announced(payloads: list[str], into: list[str]) -> int:
    import json

    into.clear()
    for p in list(payloads):
        if p.startswith("done:"):
            into.append(p[5:])
        elif p.startswith("dones:"):
            into.extend(json.loads(p[6:]))
    return len(into)


def test_a_failing_statement_fails_only_its_caller(launched: str) -> None:
    rt = get_runtime()
    db, store = rt.db, rt.store
    ids = _pending(store, "gc-bad-", 8)

    def record(i: int) -> Callable[[], Any]:
        # NULL in a NOT NULL column: the batch fails as a whole, then runs one by one.
        name: Any = None if i == 4 else "s"
        return lambda: store.record_step(ids[i], f"owner-{i}", 0, name, b"out", None, 1, 2)

    with _held(db, (ids[0], 0), None):
        results, threads = _run_queued(db, [record(i) for i in range(8)])
    for t in threads:
        t.join(20)
    assert "function_name" in str(results[4]) or "NOT NULL" in str(results[4]).upper()
    assert [r for i, r in enumerate(results) if i != 4] == [None] * 7
    with db.read() as conn:
        rows = conn.execute(select(operation_outputs.c.workflow_uuid)).scalars().all()
    assert sorted(rows) == sorted(w for i, w in enumerate(ids) if i != 4)


def test_a_duplicate_enqueue_in_a_batch_is_refused_alone(launched: str) -> None:
    rt = get_runtime()
    db, store = rt.db, rt.store

    def enqueue(i: int, dedup: str | None) -> Callable[[], Any]:
        row = NewWorkflow(
            workflow_id=f"gc-enq-{i}",
            name="wf",
            inputs=b"",
            status="ENQUEUED",
            created_at=1,
            queue_name="gc_q",
            deduplication_id=dedup,
        )
        return lambda: store.insert_workflow(row)

    enqueue(0, "same")()
    calls = [enqueue(i, "same" if i == 3 else None) for i in range(1, 7)]
    with _held(db, None, None):
        if db.is_postgres:
            # Enqueues run on their caller's thread there (one autocommit round trip each).
            results: list[Any] = [None] * len(calls)
            for i, call in enumerate(calls):
                try:
                    results[i] = call()
                except Exception as exc:
                    results[i] = exc
            threads: list[threading.Thread] = []
        else:
            results, threads = _run_queued(db, calls)
    for t in threads:
        t.join(20)
    assert isinstance(results[2], DBOSQueueDeduplicatedError)
    assert [r for i, r in enumerate(results) if i != 2] == [None] * 5
    assert store.get_workflow("gc-enq-3") is None
    assert all(store.get_workflow(f"gc-enq-{i}") is not None for i in (1, 2, 4, 5, 6))


def test_a_claim_reports_what_a_workflow_already_recorded(launched: str) -> None:
    rt = get_runtime()
    db, store = rt.db, rt.store
    for wid in ("gc-resumed", "gc-fresh"):
        store.insert_workflow(
            NewWorkflow(
                workflow_id=wid,
                name="never_registered",
                inputs=b"",
                status="ENQUEUED",
                created_at=1,
                queue_name="gc_claims",
            )
        )
    with db.write() as conn:
        for fid in (0, 1, 2):
            conn.execute(
                insert(operation_outputs).values(
                    workflow_uuid="gc-resumed", function_id=fid, function_name="s"
                )
            )
    from dbos_nb.models import QueueSettings

    store.upsert_queue(QueueSettings(name="gc_claims"), rt.now_ms())
    result = claims.claim(db, "gc_claims", "someone", rt.now_ms, names=["never_registered"])
    assert {c.workflow_id: c.last_recorded_fid for c in result.claimed} == {
        "gc-resumed": 2,
        "gc-fresh": -1,
    }


@pytest.mark.parametrize("limit", ["rate", "concurrency"])
def test_enqueues_onto_a_full_queue_do_not_trigger_claims(
    db_url: str, limit: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fallback polls far apart: every claim counted here comes from a wake-up.
    DBOS(config=config(db_url, polling_interval_sec=30))
    gate = threading.Event()

    @DBOS.workflow()
    def held(i: int) -> int:
        gate.wait(30)
        return i

    if limit == "rate":
        q = Queue("gc_full", limiter={"limit": 1, "period": 3600})
    else:
        q = Queue("gc_full", concurrency=1)
    DBOS.launch()
    first = q.enqueue(held, 0)
    wait_until(lambda: first.get_status().status == "PENDING")
    time.sleep(0.2)  # the scheduler has seen the queue full
    calls: list[str] = []
    real_claim = claims.claim

    def counting_claim(db: Any, queue_name: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(queue_name)
        return real_claim(db, queue_name, *args, **kwargs)

    monkeypatch.setattr(claims, "claim", counting_claim)
    handles = [q.enqueue(held, i) for i in range(1, 31)]
    time.sleep(0.3)
    assert calls.count("gc_full") == 0
    assert all(h.get_status().status == "ENQUEUED" for h in handles)
    gate.set()
    assert first.get_result(timeout_sec=20) == 0
    if limit == "concurrency":
        # A finished workflow frees the slot: the next one starts at once, without a poll,
        # and so on down the queue (each a wake-up that must not be lost).
        assert [h.get_result(timeout_sec=20) for h in handles] == list(range(1, 31))
        assert calls.count("gc_full") >= 1


def test_a_cancel_from_another_process_stops_the_next_step(db_url: str) -> None:
    """Without notifications (SQLite, or PostgreSQL with them turned off) the scheduler's sweep
    finds a cancel made elsewhere; the running workflow stops before its next step."""
    DBOS(config=config(db_url, use_listen_notify=False))
    entered = threading.Event()
    gate = threading.Event()
    ran: list[int] = []

    @DBOS.step()
    def step(i: int) -> int:
        ran.append(i)
        if i == 0:
            entered.set()
            gate.wait(30)
        return i

    @DBOS.workflow()
    def three_steps() -> int:
        return sum(step(i) for i in range(3))

    q = Queue("gc_cancel")
    DBOS.launch()
    handle = q.enqueue(three_steps)
    assert entered.wait(20)
    with DBOSClient(db_url) as client:  # its own connections: nothing in this runtime is told
        client.cancel_workflow(handle.workflow_id)
    rt = get_runtime()
    wait_until(lambda: rt._running[handle.workflow_id].preempt_reason == "cancelled")
    gate.set()
    wait_until(lambda: not rt.is_running(handle.workflow_id))
    assert ran == [0]
    assert handle.get_status().status == "CANCELLED"


def _counting_claims(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the queue of every claim from here on (both kinds)."""
    calls: list[str] = []
    for name in ("claim", "claim_unshared"):
        real = getattr(claims, name)

        def counting(db: Any, queue_name: str, *a: Any, _real: Any = real, **k: Any) -> Any:
            calls.append(queue_name)
            return _real(db, queue_name, *a, **k)

        monkeypatch.setattr(claims, name, counting)
    return calls


def _served_queue(
    db_url: str,
    name: str,
    *,
    worker_concurrency: int | None = None,
    max_concurrent_workflows: int | None = None,
) -> tuple[Queue, Callable[[int], int]]:
    """DBOS launched (fallback poll: 30 s) with a queue this process serves, and a workflow
    doubling its argument that has run on it once: the scheduler has claimed from the queue,
    so it knows the queue's settings, and has handled every wake-up of that first enqueue."""
    DBOS(
        config=config(
            db_url, polling_interval_sec=30, max_concurrent_workflows=max_concurrent_workflows
        )
    )

    @DBOS.workflow()
    def double(i: int) -> int:
        return 2 * i

    q = Queue(name, worker_concurrency=worker_concurrency)
    DBOS.launch()
    assert q.enqueue(double, 1).get_result(timeout_sec=20) == 2
    time.sleep(0.3)
    return q, double


def test_an_enqueue_onto_a_served_unlimited_queue_starts_without_a_claim(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    q, double = _served_queue(db_url, "gc_direct")
    calls = _counting_claims(monkeypatch)
    handles = [q.enqueue(double, i) for i in range(20)]
    assert [h.get_result(timeout_sec=20) for h in handles] == [2 * i for i in range(20)]
    assert calls.count("gc_direct") == 0
    status = handles[0].get_status()
    assert (status.status, status.queue_name, status.executor_id) == (
        "SUCCESS",
        "gc_direct",
        get_runtime().executor_id,
    )


def test_a_queue_limited_elsewhere_is_not_started_directly(db_url: str) -> None:
    """Another process gave the queue a limit: this one still believes it unlimited, but the
    write checks the stored settings, so the work is enqueued and claimed under the limit."""
    DBOS(config=config(db_url, polling_interval_sec=30))
    gate = threading.Event()

    @DBOS.workflow()
    def held(i: int) -> int:
        gate.wait(30)
        return i

    q = Queue("gc_changed")
    DBOS.launch()
    first = q.enqueue(held, 0)
    wait_until(lambda: first.get_status().status == "PENDING")
    rt = get_runtime()
    from dbos_nb.models import QueueSettings

    rt.store.upsert_queue(QueueSettings(name="gc_changed", concurrency=1), rt.now_ms())
    second = q.enqueue(held, 1)
    time.sleep(0.3)
    assert second.get_status().status == "ENQUEUED"  # the concurrency slot is taken
    gate.set()
    assert (first.get_result(timeout_sec=20), second.get_result(timeout_sec=20)) == (0, 1)


def test_waiting_work_is_not_overtaken_by_a_direct_start(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    DBOS(config=config(db_url, polling_interval_sec=30))

    @DBOS.workflow()
    def noop(i: int) -> int:
        return i

    q = Queue("gc_fifo")
    DBOS.launch()
    assert q.enqueue(noop, 0).get_result(timeout_sec=20) == 0
    time.sleep(0.3)  # the scheduler has handled every wake-up that enqueue caused
    rt = get_runtime()
    # Work waiting in the queue that this process cannot run (say, enqueued by a client for a
    # function only other workers have).
    rt.store.insert_workflow(
        NewWorkflow(
            workflow_id="gc-waiting",
            name="elsewhere",
            inputs=b"",
            status="ENQUEUED",
            created_at=1,
            queue_name="gc_fifo",
        )
    )
    calls = _counting_claims(monkeypatch)
    later = q.enqueue(noop, 1)
    assert later.get_result(timeout_sec=20) == 1
    assert "gc_fifo" in calls  # written the ordinary way and claimed, not started directly


class _Peak:
    """How many calls run at once, and the most that ever did."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active = 0
        self.most = 0

    @contextmanager
    def running(self) -> Iterator[None]:
        with self.lock:
            self.active += 1
            self.most = max(self.most, self.active)
        try:
            yield
        finally:
            with self.lock:
                self.active -= 1


def test_worker_concurrency_claims_follow_a_changed_setting(db_url: str) -> None:
    """Claims of a worker_concurrency queue count in memory; when another process stores a
    different limit, the claim statement sees it and the next claims use the new one."""
    DBOS(config=config(db_url, polling_interval_sec=30))
    peak = _Peak()

    @DBOS.workflow()
    def work(i: int) -> int:
        with peak.running():
            time.sleep(0.03)
        return i

    q = Queue("gc_wc", worker_concurrency=3)
    DBOS.launch()
    assert [h.get_result(timeout_sec=20) for h in [q.enqueue(work, i) for i in range(12)]] == list(
        range(12)
    )
    assert 1 <= peak.most <= 3
    rt = get_runtime()
    from dbos_nb.models import QueueSettings

    rt.store.upsert_queue(QueueSettings(name="gc_wc", worker_concurrency=1), rt.now_ms())
    peak.most = 0
    handles = [q.enqueue(work, i) for i in range(6)]
    assert [h.get_result(timeout_sec=20) for h in handles] == list(range(6))
    assert peak.most == 1


def test_an_enqueue_onto_a_worker_concurrency_queue_with_room_starts_without_a_claim(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker_concurrency is this process's own count: with a slot free and nothing
    waiting, the enqueue writes the workflow started and runs it, as on a queue without
    limits; once the slots are taken, the next one waits ENQUEUED and is claimed when one
    frees."""
    gate = threading.Event()

    @DBOS.workflow()
    def held(i: int) -> int:
        gate.wait(30)
        return i

    q, double = _served_queue(db_url, "gc_wc_direct", worker_concurrency=2)
    calls = _counting_claims(monkeypatch)
    assert [q.enqueue(double, i).get_result(timeout_sec=20) for i in range(10)] == [
        2 * i for i in range(10)
    ]
    assert calls.count("gc_wc_direct") == 0
    first, second = q.enqueue(held, 1), q.enqueue(held, 2)
    third = q.enqueue(held, 3)
    assert [first.get_status().status, second.get_status().status] == ["PENDING", "PENDING"]
    time.sleep(0.3)
    assert third.get_status().status == "ENQUEUED"  # both slots are taken
    gate.set()
    assert [h.get_result(timeout_sec=20) for h in (first, second, third)] == [1, 2, 3]


@pytest.mark.parametrize(
    ("worker_concurrency", "cap"), [(3, None), (None, 3)], ids=["worker_concurrency", "cap"]
)
def test_limits_hold_with_direct_starts_from_many_threads(
    db_url: str, worker_concurrency: int | None, cap: int | None
) -> None:
    """Threads enqueueing at once onto a queue with a worker_concurrency, or onto one without
    limits in a process with a cap (max_concurrent_workflows), some workflows started directly
    and others claimed: never more running than the limit, and every one done."""
    DBOS(config=config(db_url, max_concurrent_workflows=cap))
    peak = _Peak()

    @DBOS.workflow()
    def work(i: int) -> int:
        with peak.running():
            time.sleep(0.002 * (i % 4))
        return i

    q = Queue("gc_wc_threads", worker_concurrency=worker_concurrency)
    DBOS.launch()
    assert q.enqueue(work, 0).get_result(timeout_sec=20) == 0
    handles: list[list[Any]] = [[] for _ in range(4)]

    def enqueue_some(t: int) -> None:
        handles[t] = [q.enqueue(work, t * 100 + i) for i in range(40)]

    threads = [threading.Thread(target=enqueue_some, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    results = [h.get_result(timeout_sec=60) for group in handles for h in group]
    assert results == [t * 100 + i for t in range(4) for i in range(40)]
    assert 1 <= peak.most <= 3


@pytest.mark.parametrize(
    ("worker_concurrency", "cap"), [(2, None), (None, 2)], ids=["worker_concurrency", "cap"]
)
def test_no_direct_start_while_a_claim_that_counted_its_slot_is_under_way(
    db_url: str, monkeypatch: pytest.MonkeyPatch, worker_concurrency: int | None, cap: int | None
) -> None:
    """A claim counts the free slots before its round trip (of the queue's
    worker_concurrency, or of the process's cap): a workflow started directly meanwhile would
    take a slot the claim may fill too. The enqueue waits a moment for the claim, then writes
    its workflow ENQUEUED for the next claim."""
    q, double = _served_queue(
        db_url,
        "gc_wc_claiming",
        worker_concurrency=worker_concurrency,
        max_concurrent_workflows=cap,
    )
    entered, release = threading.Event(), threading.Event()
    real = claims.claim_unshared

    def held_claim(db: Any, queue_name: str, *a: Any, **k: Any) -> Any:
        if queue_name == "gc_wc_claiming":
            entered.set()
            release.wait(30)
        return real(db, queue_name, *a, **k)

    monkeypatch.setattr(claims, "claim_unshared", held_claim)
    get_runtime().wake_scheduler("gc_wc_claiming")  # a claim, with nothing waiting
    assert entered.wait(20)
    handle = q.enqueue(double, 1)
    assert handle.get_status().status == "ENQUEUED"
    release.set()
    assert handle.get_result(timeout_sec=20) == 2


@pytest.mark.parametrize("landed", [True, False], ids=["landed", "refused"])
def test_an_interrupted_direct_start_runs_the_workflow_if_its_row_landed(
    db_url: str, monkeypatch: pytest.MonkeyPatch, landed: bool
) -> None:
    """Ctrl-C while a direct start's write waits for its commit: the write stays queued in
    the group committer and may still land, PENDING and owned by this process. The enqueue
    raises the interrupt at once; a row that landed is run (it waited for ever), and a write
    refused gives its slot back."""
    from dbos_nb import SetWorkflowID
    from dbos_nb.storage.workflow_rows import WorkflowRows

    q, double = _served_queue(db_url, "gc_interrupted")
    rt = get_runtime()
    real = WorkflowRows.insert_started_if_unshared
    calls: list[str] = []

    def interrupted(self: Any, wf: Any, *a: Any, **k: Any) -> bool:
        calls.append(wf.workflow_id)
        if len(calls) == 1:
            if landed:
                real(self, wf, *a, **k)
            else:  # the queue got a limit meanwhile: the write is refused
                rt.store.upsert_queue(
                    QueueSettings(name="gc_interrupted", concurrency=5), rt.now_ms()
                )
            raise KeyboardInterrupt
        return real(self, wf, *a, **k)

    monkeypatch.setattr(WorkflowRows, "insert_started_if_unshared", interrupted)
    with SetWorkflowID("gc-interrupted-1"), pytest.raises(KeyboardInterrupt):
        q.enqueue(double, 21)
    assert rt.direct is not None
    if landed:
        assert DBOS.retrieve_workflow("gc-interrupted-1").get_result(timeout_sec=20) == 42
    else:
        wait_until(lambda: len(calls) == 2)
    wait_until(lambda: rt.direct is not None and rt.direct.inflight == 0)  # no slot kept
    assert (rt.store.get_workflow("gc-interrupted-1") is not None) == landed


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("when", ["before_the_write", "before_the_hand_over"])
def test_a_direct_start_that_races_destroy_leaves_its_workflow_queued(
    db_url: str, monkeypatch: pytest.MonkeyPatch, when: str, kind: str
) -> None:
    """DBOS.destroy() while a direct start is under way, its slot reserved: before its write
    lands (after destroy returned this process's unfinished work to the queues), or between
    the write and the hand-over to the workers. The enqueue still returns its handle, the row
    is left in its queue rather than PENDING for a process that will never run it, and the
    next process to serve the queue runs it."""
    from dbos_nb import SetWorkflowID
    from dbos_nb.core.scheduler import Scheduler
    from dbos_nb.storage.workflow_rows import WorkflowRows

    q, double = _served_queue(db_url, "gc_destroyed")

    @DBOS.workflow()
    async def double_async(i: int) -> int:
        return 2 * i

    real_insert = WorkflowRows.insert_started_if_unshared
    real_adopt = Scheduler.adopt
    destroyed: list[str] = []

    def insert_after_destroy(self: Any, *args: Any, **kwargs: Any) -> bool:
        if when == "before_the_write" and not destroyed:
            destroyed.append(when)
            DBOS.destroy()
        return real_insert(self, *args, **kwargs)

    def adopt_after_destroy(self: Any, item: Any, is_async: bool) -> bool:
        if when == "before_the_hand_over" and not destroyed:
            destroyed.append(when)
            DBOS.destroy()
        return real_adopt(self, item, is_async)

    monkeypatch.setattr(WorkflowRows, "insert_started_if_unshared", insert_after_destroy)
    monkeypatch.setattr(Scheduler, "adopt", adopt_after_destroy)
    with SetWorkflowID("gc-destroyed-1"):
        handle = q.enqueue(double if kind == "sync" else double_async, 21)
    assert destroyed == [when] and handle.workflow_id == "gc-destroyed-1"
    monkeypatch.undo()
    with DBOSClient(db_url) as client:
        status = client.get_workflow_status("gc-destroyed-1")
        assert status is not None and status.status == "ENQUEUED"
        assert status.queue_name == "gc_destroyed"
    _served_queue(db_url, "gc_destroyed")
    assert DBOS.retrieve_workflow("gc-destroyed-1").get_result(timeout_sec=20) == 42


def test_a_stopped_event_loop_refuses_new_work() -> None:
    """The loop of a destroyed runtime does not start again for work handed to it late (an
    async workflow's direct start racing DBOS.destroy()): it raises, so that the workflow goes
    back to its queue, and the coroutine is closed rather than left never awaited."""
    import asyncio

    from dbos_nb.core.loop import LoopThread

    loop = LoopThread()
    assert loop.submit(asyncio.sleep(0, result=7)).result(timeout=10) == 7
    loop.stop()

    async def late() -> int:
        return 1

    coro = late()
    with pytest.raises(RuntimeError, match="stopped"):
        loop.submit(coro)
    assert coro.cr_frame is None  # closed
    assert not any(t.name == "dbos_nb-async" for t in threading.enumerate())


def test_an_interrupt_in_the_leader_still_completes_the_others(tmp_path: Any) -> None:
    """Ctrl-C reaching a caller while it leads a batch: the other callers' statements are
    still written and answered; the leader's caller gets the interrupt."""
    from dbos_nb.storage.committer import GroupCommitter
    from dbos_nb.storage.migrations import migrate

    db = Database(f"sqlite:///{tmp_path / 'interrupt.sqlite'}")
    migrate(db)
    shared_attempts = [0]

    @contextmanager
    def interrupted_once() -> Iterator[Any]:
        shared_attempts[0] += 1
        if shared_attempts[0] == 1:
            raise KeyboardInterrupt
        with db.driver_write() as conn:
            yield conn

    committer = GroupCommitter(interrupted_once, db.driver_write)
    columns = ("workflow_uuid", "function_id", "function_name")
    stmt = db.prepared(
        insert(operation_outputs)
        .values({c: bindparam(c) for c in columns})
        .returning(operation_outputs.c.function_id)
    )

    def record(i: int) -> Callable[[], Any]:
        params = {"workflow_uuid": "gc-int", "function_id": i, "function_name": "s"}
        return lambda: committer.execute(stmt, params)

    results: list[Any] = [None] * 4

    def run(i: int) -> None:
        try:
            results[i] = record(i)()
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    with _held(db, None, None):  # the first caller's statement waits for the write lock
        threads[0].start()
        wait_until(lambda: committer.started and committer.waiting == 0)
        time.sleep(0.05)
        for t in threads[1:]:
            t.start()
        wait_until(lambda: committer.waiting == 3)
    for t in threads:
        t.join(20)
    assert results[0] == (0,)
    # The second caller led the batch of three and was interrupted; the others were answered.
    assert isinstance(results[1], KeyboardInterrupt)
    assert results[2:] == [(2,), (3,)]
    with db.read() as conn:
        rows = conn.execute(select(operation_outputs.c.function_id)).scalars().all()
    assert sorted(rows) == [0, 1, 2, 3]
    db.dispose()


def test_a_caller_interrupted_while_waiting_hands_nothing_over(tmp_path: Any) -> None:
    """Ctrl-C reaching a caller that waits for another's batch: its statement is still
    written, and the callers after it are not left without a leader."""
    import signal

    db = Database(f"sqlite:///{tmp_path / 'follower.sqlite'}")
    from dbos_nb.storage.migrations import migrate

    migrate(db)
    committer = db.committer
    columns = ("workflow_uuid", "function_id", "function_name")
    stmt = db.prepared(
        insert(operation_outputs)
        .values({c: bindparam(c) for c in columns})
        .returning(operation_outputs.c.function_id)
    )

    def params(i: int) -> dict[str, Any]:
        return {"workflow_uuid": "gc-follow", "function_id": i, "function_name": "s"}

    results: dict[int, Any] = {}

    def run(i: int) -> None:
        try:
            results[i] = committer.execute(stmt, params(i))
        except BaseException as exc:
            results[i] = exc

    main = threading.get_ident()

    def interrupt_main_when_it_waits() -> None:
        wait_until(lambda: committer.waiting == 1)
        time.sleep(0.05)
        signal.pthread_kill(main, signal.SIGINT)

    leader = threading.Thread(target=run, args=(0,))
    # The leader's statement waits for the write lock that _held takes.
    with pytest.raises(KeyboardInterrupt), _held(db, None, None):
        leader.start()
        wait_until(lambda: committer.started and committer.waiting == 0)
        threading.Thread(target=interrupt_main_when_it_waits).start()
        committer.execute(stmt, params(1))  # follows the blocked leader; interrupted
    leader.join(20)
    assert results[0] == (0,)
    # Later callers still get a leader (without the hand-over fix they would wait forever).
    later = threading.Thread(target=run, args=(2,))
    later.start()
    later.join(20)
    assert results.get(2) == (2,)
    with db.read() as conn:
        rows = conn.execute(select(operation_outputs.c.function_id)).scalars().all()
    assert sorted(rows) == [0, 1, 2]  # the interrupted caller's statement was written too
    db.dispose()


def test_a_leader_waits_a_moment_for_running_writers_on_postgres_only(launched: str) -> None:
    """While batches have company and more workflows run than statements wait, a PostgreSQL
    leader waits a moment (its commit costs a WAL flush) so that the others' statements share
    its batch; a lone writer never waits, nor does SQLite, where commits are cheap."""
    rt = get_runtime()
    db, store = rt.db, rt.store
    committer = db.committer
    ids = _pending(store, "gc-gather-", 8)
    writers = [1]
    waits: list[float] = []
    in_wait = threading.Event()

    def scripted_sleep(seconds: float) -> None:  # the others queue while the leader waits
        waits.append(seconds)
        in_wait.set()
        wait_until(lambda: committer.waiting == 3)

    def record(i: int) -> None:
        store.record_step(ids[i], f"owner-{i}", 0, "s", b"out", None, 1, 2)

    committer.expect_writers(lambda: writers[0])
    committer.sleep = scripted_sleep
    try:
        record(7)  # one writer, one statement
        writers[0] = 3
        record(6)  # more workflows run, but no batch had company yet
        assert waits == []
        if not db.is_postgres:
            threads = [threading.Thread(target=record, args=(i,)) for i in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(20)
            assert waits == [] and committer.gather_sec == 0
            return
        committer.expect_writers(None)  # a batch with company, made as in the tests above
        with _held(db, (ids[3], 0), None):
            _, held = _run_queued(db, [lambda i=i: record(i) for i in (3, 4, 5)])
        for t in held:
            t.join(20)
        committer.expect_writers(lambda: writers[0])
        before = (committer.batches, committer.statements)
        threads = [threading.Thread(target=record, args=(i,)) for i in range(3)]
        threads[0].start()
        assert in_wait.wait(20)
        for t in threads[1:]:
            t.start()
        for t in threads:
            t.join(20)
        assert waits == [committer.gather_sec] and committer.gather_sec > 0
        assert (committer.batches - before[0], committer.statements - before[1]) == (1, 3)
        with db.read() as conn:
            rows = conn.execute(select(operation_outputs.c.workflow_uuid)).scalars().all()
        assert sorted(rows) == sorted(ids)
    finally:
        committer.sleep = time.sleep
        committer.expect_writers(rt.running_count)
