"""Queues in one process, on SQLite and PostgreSQL: order, limits, options, timeouts, client."""

from __future__ import annotations

import gc
import logging
import threading
import time
import warnings
from typing import Any

import pytest
from sqlalchemy import select

from conftest import config, max_overlap, wait_until
from dbos_nb import (
    DBOS,
    DBOSAwaitedWorkflowCancelledError,
    DBOSConflictingWorkflowError,
    DbosNbError,
    DBOSQueueDeduplicatedError,
    DBOSWorkflowTimedOutError,
    InvalidQueueSettingsError,
    Queue,
    SetEnqueueOptions,
    SetWorkflowID,
    SetWorkflowTimeout,
    UnknownQueueError,
    UnknownWorkflowNameError,
)
from dbos_nb.client import DBOSClient, EnqueueOptions
from dbos_nb.clock import ManualClock
from dbos_nb.storage import rate_ledger
from dbos_nb.storage.database import Database
from dbos_nb.storage.migrations import migrate
from dbos_nb.storage.schema import queue_starts


def test_fifo_with_concurrency_one(launched: str) -> None:
    q = Queue("fifo", concurrency=1)
    order: list[int] = []

    @DBOS.step()
    def record(i: int) -> int:
        order.append(i)
        return i

    handles = [q.enqueue(record, i) for i in range(50)]
    assert [h.get_result() for h in handles] == list(range(50))
    assert order == list(range(50))


def test_global_concurrency_holds_and_is_used(launched: str) -> None:
    q = Queue("conc", concurrency=3)
    spans: list[tuple[float, float]] = []
    lock = threading.Lock()

    @DBOS.step()
    def work(i: int) -> int:
        start = time.monotonic()
        time.sleep(0.03)
        with lock:
            spans.append((start, time.monotonic()))
        return i

    handles = [q.enqueue(work, i) for i in range(15)]
    assert sorted(h.get_result() for h in handles) == list(range(15))
    assert max_overlap(spans) == 3


def test_worker_concurrency_holds(launched: str) -> None:
    q = Queue("wc", concurrency=5, worker_concurrency=2)
    spans: list[tuple[float, float]] = []
    lock = threading.Lock()

    @DBOS.step()
    def work() -> None:
        start = time.monotonic()
        time.sleep(0.02)
        with lock:
            spans.append((start, time.monotonic()))

    for h in [q.enqueue(work) for _ in range(10)]:
        h.get_result()
    assert max_overlap(spans) == 2


def test_rate_limiter_with_an_injected_clock(db_url: str) -> None:
    clock = ManualClock()
    DBOS(config=config(db_url), clock=clock)
    q = Queue("limited", limiter={"limit": 3, "period": 10})
    ran: list[int] = []

    @DBOS.step()
    def call(i: int) -> int:
        ran.append(i)
        return i

    DBOS.launch()
    handles = [q.enqueue(call, i) for i in range(8)]
    wait_until(lambda: len(ran) == 3)
    time.sleep(0.3)
    assert sorted(ran) == [0, 1, 2]  # the window is full until the clock moves
    # A start leaves the window after the period plus the limiter's guard (2%: 0.2 s here).
    clock.advance(10.1)
    time.sleep(0.2)
    assert len(ran) == 3
    clock.advance(0.15)
    wait_until(lambda: len(ran) == 6)
    clock.advance(10.25)
    assert [h.get_result(timeout_sec=10) for h in handles] == list(range(8))
    # Each window started the next three in FIFO order (threads may interleave inside one).
    assert [sorted(ran[0:3]), sorted(ran[3:6]), sorted(ran[6:])] == [[0, 1, 2], [3, 4, 5], [6, 7]]


@pytest.mark.parametrize(
    ("readings", "counted_from"),
    [
        ([1_000, 1_002], 1_000),
        # 90 ms late: written again 180 ms ahead, which the next commit does not overtake.
        ([1_000, 1_090, 1_090, 1_091], 1_270),
        # As slow again (30 ms past the new stamp): ahead by twice the whole write.
        ([1_000, 1_090, 1_090, 1_300, 1_300, 1_301], 1_720),
    ],
    ids=["quick-commit", "slow-commit", "slow-twice"],
)
def test_a_start_is_counted_from_after_a_slow_commit(
    db_url: str, readings: list[int], counted_from: int
) -> None:
    """The ledger counts a start from when the work began: the clock is read inside the
    transaction, and if the commit took long (a checkpoint's fsyncs), the start is written
    again ahead of the clock (later is only stricter), until the work does not run past it."""
    db = Database(db_url)
    try:
        migrate(db)
        with db.write() as conn:
            rate_ledger.record_starts(conn, "limited", 500, [("wf-1", 1)])
        clock = iter(readings)
        rate_ledger.record_real_start(db, "limited", "wf-1", 500, lambda: next(clock))
        assert next(clock, None) is None  # every reading was used
        with db.read() as conn:
            starts = conn.execute(select(queue_starts.c.started_at_ms)).scalars().all()
        assert starts == [counted_from]
    finally:
        db.dispose()


def test_priority_orders_waiting_work(launched: str) -> None:
    q = Queue("prio", concurrency=1, priority_enabled=True)
    gate = threading.Event()
    order: list[str] = []

    @DBOS.step()
    def blocker() -> None:
        gate.wait(10)

    @DBOS.step()
    def record(tag: str) -> None:
        order.append(tag)

    first = q.enqueue(blocker)
    wait_until(lambda: first.get_status().status == "PENDING")
    for tag, priority in [("low", 10), ("high", 1), ("mid", 5), ("default", None)]:
        with SetEnqueueOptions(priority=priority):  # None: no priority, stored as 0
            q.enqueue(record, tag)
    gate.set()
    wait_until(lambda: len(order) == 4)
    assert order == ["default", "high", "mid", "low"]


def test_deduplication(launched: str) -> None:
    q = Queue("dedup", concurrency=1)
    gate = threading.Event()

    @DBOS.step()
    def slow(x: int) -> int:
        gate.wait(10)
        return x

    with SetEnqueueOptions(deduplication_id="user-1"):
        h1 = q.enqueue(slow, 1)
    with (
        pytest.raises(DBOSQueueDeduplicatedError, match="user-1"),
        SetEnqueueOptions(deduplication_id="user-1"),
    ):
        q.enqueue(slow, 2)
    gate.set()
    assert h1.get_result() == 1
    # Once the first finished, the id is free again.
    with SetEnqueueOptions(deduplication_id="user-1"):
        assert q.enqueue(slow, 3).get_result() == 3
    # An empty id would deduplicate unrelated work (EnqueueOptions refuses it too).
    with pytest.raises(DbosNbError, match="non-empty string"):
        SetEnqueueOptions(deduplication_id="")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"concurrency": 0}, "concurrency must be a positive integer"),
        ({"concurrency": "5"}, "concurrency must be a positive integer"),
        ({"concurrency": 2, "worker_concurrency": 3}, "cannot exceed concurrency"),
        ({"limiter": {"limit": 0, "period": 1}}, "limit"),
        ({"limiter": {"limit": 5, "period": -1}}, "period"),
        ({"limiter": {"limit": 5}}, "missing"),
        ({"limiter": {"limit": 5, "period": 1, "burst": 2}}, "unknown"),
        ({"limiter": [5, 1]}, "must be a dict"),
        ({"polling_interval_sec": 0}, "polling_interval_sec"),
        ({"polling_interval_sec": float("nan")}, "polling_interval_sec"),
        # Beyond what the database's columns hold (PostgreSQL would refuse it at launch).
        ({"concurrency": 2**31}, "up to 2"),
        ({"worker_concurrency": 2**40}, "up to 2"),
        ({"limiter": {"limit": 2**31, "period": 1}}, "up to 2"),
        ({"limiter": {"limit": 5, "period": float("inf")}}, "period"),
        ({"limiter": {"limit": 5, "period": float("nan")}}, "period"),
        ({"limiter": {"limit": 5, "period": 1e20}}, "century"),
    ],
)
def test_invalid_queue_settings(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidQueueSettingsError, match=message):
        Queue("bad", **kwargs)


def test_a_queue_name_longer_than_the_database_holds_is_refused() -> None:
    with pytest.raises(InvalidQueueSettingsError, match="at most 255 characters"):
        Queue("q" * 256)
    assert len(Queue("q" * 255).name) == 255


def test_a_queue_the_database_refuses_is_not_declared(launched: str) -> None:
    """A declaration the database refuses raises and leaves the earlier declaration in force,
    so that nothing is enqueued onto a queue that no other process can see. (Here a rule added
    to the table refuses a concurrency of 5 or more.)"""
    from sqlalchemy import text

    from dbos_nb.core.queue import QUEUES
    from dbos_nb.storage.schema import PG_SCHEMA

    Queue("refused", concurrency=2)
    db = Database(launched)
    try:
        with db.write() as conn:
            if db.is_postgres:
                conn.execute(
                    text(
                        f"ALTER TABLE {PG_SCHEMA}.queues ADD CONSTRAINT dbos_nb_test_refusal "
                        "CHECK (concurrency IS NULL OR concurrency < 5)"
                    )
                )
            else:
                for event in ("INSERT", "UPDATE"):
                    conn.execute(
                        text(
                            f"CREATE TRIGGER refuse_{event.lower()} BEFORE {event} ON queues "
                            "WHEN NEW.concurrency >= 5 "
                            "BEGIN SELECT RAISE(ABORT, 'dbos_nb_test_refusal'); END"
                        )
                    )
    finally:
        db.dispose()
    with pytest.raises(Exception, match="dbos_nb_test_refusal"):
        Queue("refused", concurrency=5)
    with pytest.raises(Exception, match="dbos_nb_test_refusal"):
        Queue("never_stored", concurrency=7)
    declared = QUEUES.get("refused")
    assert declared is not None and declared.settings.concurrency == 2
    assert QUEUES.get("never_stored") is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"workflow_timeout": float("nan")}, "workflow_timeout"),
        ({"workflow_timeout": float("inf")}, "workflow_timeout"),
        ({"workflow_timeout": 1e30}, "century"),
        ({"priority": 2**40}, "priority"),
        ({"workflow_id": 123}, "workflow_id"),
        ({"deduplication_id": ""}, "deduplication_id"),
    ],
)
def test_client_enqueue_options_out_of_range_are_refused(
    launched: str, options: dict[str, Any], message: str
) -> None:
    Queue("client_checks")

    @DBOS.workflow(name="client_checked")
    def client_checked() -> int:
        return 1

    with DBOSClient(launched) as client:
        with pytest.raises(DbosNbError, match=message):
            client.enqueue(
                {"queue_name": "client_checks", "workflow_name": "client_checked", **options}  # type: ignore[typeddict-item]
            )
        assert client.list_workflows(name="client_checked") == []


@pytest.mark.parametrize("seconds", [float("nan"), float("inf"), 1e30, 0, -1])
def test_workflow_timeouts_out_of_range_are_refused(seconds: float) -> None:
    with pytest.raises(DbosNbError, match="SetWorkflowTimeout"):
        SetWorkflowTimeout(seconds)


def test_token_estimates_beyond_the_column_are_refused() -> None:
    with pytest.raises(DbosNbError, match="token_estimate"):
        SetEnqueueOptions(token_estimate=2**31)


def test_redeclaring_a_queue(launched: str, caplog: pytest.LogCaptureFixture) -> None:
    Queue("again", concurrency=2)
    with caplog.at_level(logging.WARNING):
        Queue("again", concurrency=2)
    assert not [r for r in caplog.records if "again" in r.getMessage()]
    with caplog.at_level(logging.WARNING):
        Queue("again", concurrency=4)
    said = [r.getMessage() for r in caplog.records if "new limits" in r.getMessage()]
    assert len(said) == 1 and "'again'" in said[0]  # said once, not by both layers
    assert "new limits: concurrency=4 (were concurrency=2)" in said[0]
    client = DBOSClient(launched)
    from dbos_nb.storage.store import SystemStore

    stored = SystemStore(client._db).get_queue("again")
    assert stored is not None and stored.concurrency == 4
    client.destroy()


# A second process (another notebook) that only names the queue, to enqueue onto it.
_BARE_DECLARATION = """
import sys
from dbos_nb import DBOS, Queue
DBOS(config={"name": "other", "system_database_url": sys.argv[1], "executor_id": "other"})
early = Queue("kept_limits")  # before launch: adopted at launch
DBOS.launch()
late = Queue("kept_limits")  # after launch
print(early.concurrency, early.limiter, late.worker_concurrency)
DBOS.destroy()
"""


def test_a_queue_named_without_settings_keeps_the_stored_ones(launched: str) -> None:
    import subprocess
    import sys

    Queue("kept_limits", concurrency=3, worker_concurrency=2, limiter={"limit": 5, "period": 2})
    out = subprocess.run(
        [sys.executable, "-c", _BARE_DECLARATION, launched],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.split() == ["3", "{'limit':", "5,", "'period':", "2.0}", "2"]
    with DBOSClient(launched) as client:
        from dbos_nb.storage.store import SystemStore

        stored = SystemStore(client._db).get_queue("kept_limits")
    assert stored is not None
    assert (stored.concurrency, stored.worker_concurrency, stored.limit) == (3, 2, 5)
    # In this process too; and a setting given, even None, declares the whole set.
    assert Queue("kept_limits").concurrency == 3
    lifted = Queue("kept_limits", concurrency=None)
    assert (lifted.concurrency, lifted.limiter) == (None, None)
    assert DBOS.register_queue("kept_limits").concurrency is None
    assert DBOS.register_queue("kept_limits", global_concurrency=7).concurrency == 7
    # A new queue named alone gets the defaults, stored for every process.
    fresh = Queue("named_alone")
    assert (fresh.concurrency, fresh.limiter, fresh.priority_enabled) == (None, None, False)
    with DBOSClient(launched) as client:
        from dbos_nb.storage.store import SystemStore

        assert SystemStore(client._db).get_queue("named_alone") is not None


def test_a_name_alone_after_a_declaration_keeps_that_declaration(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    from dbos_nb.core.queue import QUEUES
    from dbos_nb.core.runtime import get_runtime

    DBOS(config=config(db_url))
    Queue("pre_kept", concurrency=5)
    DBOS.launch()
    DBOS.destroy()
    QUEUES.clear()  # a new kernel: the database holds concurrency=5
    DBOS(config=config(db_url))
    with caplog.at_level(logging.WARNING):
        Queue("late_explicit")  # the name alone, then the settings: nothing was replaced
        Queue("late_explicit", concurrency=3)
    assert not [r for r in caplog.records if "late_explicit" in r.getMessage()]
    explicit = Queue("pre_kept", concurrency=2)  # the notebook's new limit
    named = Queue("pre_kept")  # then a module that only names the queue
    DBOS.launch()
    store = get_runtime().store
    assert explicit.concurrency == named.concurrency == 2
    assert store.get_queue("pre_kept").concurrency == 2  # type: ignore[union-attr]
    assert store.get_queue("late_explicit").concurrency == 3  # type: ignore[union-attr]
    DBOS.destroy()


def test_a_kept_queue_object_shows_the_latest_declaration(launched: str) -> None:
    """A `Queue` kept from an earlier cell shows (and warns by) the limits of the latest
    declaration of its name, which are the ones that apply."""
    from dbos_nb.core.runtime import get_runtime

    @DBOS.workflow()
    def ranked(i: int) -> int:
        return i

    early = Queue("kept_obj")  # the name alone: the defaults of a new queue
    later = Queue(
        "kept_obj", concurrency=3, limiter={"limit": 5, "period": 2}, priority_enabled=True
    )
    assert early.concurrency == later.concurrency == 3
    assert early.limiter == {"limit": 5, "period": 2.0} and early.priority_enabled
    assert "concurrency=3" in repr(early)
    assert get_runtime().store.get_queue("kept_obj").concurrency == 3  # type: ignore[union-attr]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # priority is enabled: no "orders nothing" warning
        with SetEnqueueOptions(priority=2):
            handle = early.enqueue(ranked, 7)
    assert handle.get_result(timeout_sec=20) == 7


def test_enqueue_errors(launched: str) -> None:
    def plain() -> None:
        return None

    q = Queue("errs")
    with pytest.raises(DbosNbError, match="not a DBOS workflow"):
        q.enqueue(plain)

    @DBOS.workflow()
    def wf() -> int:
        return 1

    with pytest.raises(UnknownQueueError, match="nowhere"):
        DBOS.enqueue_workflow("nowhere", wf)
    assert DBOS.enqueue_workflow("errs", wf).get_result() == 1


def test_enqueue_from_a_workflow_tutorial_example(launched: str) -> None:
    queue = Queue("example_queue")

    @DBOS.step()
    def process_task(task: str) -> str:
        return task.upper()

    @DBOS.workflow()
    def process_tasks(tasks: list[str]) -> list[str]:
        task_handles = [queue.enqueue(process_task, task) for task in tasks]
        return [handle.get_result() for handle in task_handles]

    with SetWorkflowID("tasks-1"):
        assert process_tasks(["a", "b", "c"]) == ["A", "B", "C"]
    kids = DBOS.list_workflows(workflow_id_prefix="tasks-1-")
    assert [k.workflow_id for k in kids] == ["tasks-1-1", "tasks-1-2", "tasks-1-3"]
    assert all(k.queue_name == "example_queue" for k in kids)


def test_enqueue_many_is_idempotent_and_ordered(launched: str) -> None:
    q = Queue("many", concurrency=1)
    order: list[int] = []

    @DBOS.step()
    def record(i: int) -> int:
        order.append(i)
        return i * i

    handles = q.enqueue_many(record, range(20), batch_id="batch-A")
    again = q.enqueue_many(record, range(20), batch_id="batch-A")
    assert [h.workflow_id for h in handles] == [f"batch-A/{i}" for i in range(20)]
    assert [h.workflow_id for h in again] == [h.workflow_id for h in handles]
    assert [h.get_result() for h in handles] == [i * i for i in range(20)]
    assert order == list(range(20))
    assert len(DBOS.list_workflows(queue_name="many")) == 20

    @DBOS.step()
    def add(a: int, b: int = 0) -> int:
        return a + b

    mixed = q.enqueue_many(add, [(1, 2), {"a": 5, "b": 5}], unpack=True)
    assert [h.get_result() for h in mixed] == [3, 10]
    with pytest.raises(DbosNbError, match="tuple or a dict"):
        q.enqueue_many(add, [7], unpack=True)


@pytest.mark.parametrize("batch_id", ["taken", None])
def test_enqueue_many_never_adopts_another_functions_workflow(
    launched: str, batch_id: str | None
) -> None:
    """An item id `<batch>/<i>` already held by another function's workflow would answer for
    that item with the other's result: refused, like a single enqueue, and nothing written."""
    q = Queue("adopt")

    @DBOS.workflow(name="adopt_f")
    def f(x: int) -> tuple[str, int]:
        return ("f", x)

    @DBOS.workflow(name="adopt_g")
    def g(x: int) -> tuple[str, int]:
        return ("g", x)

    with SetWorkflowID("taken/1"):
        assert q.enqueue(g, 99).get_result(timeout_sec=10) == ("g", 99)
    with pytest.raises(DBOSConflictingWorkflowError, match=r"'taken/1'.*adopt_g"):
        if batch_id is None:  # the base id given by SetWorkflowID instead
            with SetWorkflowID("taken"):
                q.enqueue_many(f, [7, 8, 9])
        else:
            q.enqueue_many(f, [7, 8, 9], batch_id=batch_id)
    assert [s.workflow_id for s in DBOS.list_workflows(queue_name="adopt")] == ["taken/1"]
    # Its own ids, enqueued again, are its own: no conflict.
    handles = q.enqueue_many(f, [1, 2], batch_id="mine")
    again = q.enqueue_many(f, [1, 2], batch_id="mine")
    assert [h.get_result(timeout_sec=10) for h in again] == [("f", 1), ("f", 2)]
    assert [h.workflow_id for h in handles] == ["mine/0", "mine/1"]


@pytest.mark.parametrize("with_tokens", [False, True])
def test_enqueue_many_spanning_several_statements_keeps_every_item_in_order(
    launched: str, with_tokens: bool
) -> None:
    """A large batch is written as several multi-row INSERTs plus a shorter last one: every
    item arrives once, with its own inputs, in order, and enqueueing it again adds nothing."""
    q = Queue(f"wide-{with_tokens}", concurrency=1)
    order: list[int] = []

    @DBOS.step()
    def note(i: int) -> int:
        order.append(i)
        return -i

    n = 1001  # two full statements and a remainder, with 2 and with 3 columns per row
    tokens = 7 if with_tokens else None
    batch = f"wide-{with_tokens}"
    handles = q.enqueue_many(note, range(n), batch_id=batch, tokens=tokens)
    again = q.enqueue_many(note, range(n), batch_id=batch, tokens=tokens)
    assert [h.workflow_id for h in again] == [f"{batch}/{i}" for i in range(n)]
    rows = DBOS.list_workflows(queue_name=q.name)
    assert [r.workflow_id for r in rows] == [f"{batch}/{i}" for i in range(n)]  # by id
    assert [h.get_result() for h in handles] == [-i for i in range(n)]
    assert order == list(range(n))


def test_enqueue_many_pauses_the_cycle_collector_and_restores_it(launched: str) -> None:
    """A bulk enqueue builds its many objects with Python's cycle collector paused (it cost
    a fifth of the time), and leaves the collector as it found it, also when it fails."""
    q = Queue("bulk")
    seen: list[bool] = []

    @DBOS.step()
    def echo(i: int) -> int:
        return i

    def estimate(item: int) -> int:  # called while the batch is built
        seen.append(gc.isenabled())
        return 1

    assert gc.isenabled()
    handles = q.enqueue_many(echo, range(3), tokens=estimate)
    assert seen == [False] * 3
    assert gc.isenabled()
    assert [h.get_result() for h in handles] == [0, 1, 2]
    with pytest.raises(DbosNbError, match="tuple or a dict"):
        q.enqueue_many(echo, [7], unpack=True)
    assert gc.isenabled()
    gc.disable()  # the caller's choice stands
    try:
        q.enqueue_many(echo, range(2))
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_enqueue_many_writes_shared_values_that_need_quoting(launched: str) -> None:
    """Values every row of a batch shares are written into the statement as literals: a
    queue and a batch id with quotes and backslashes must arrive intact."""
    name = "bob's \\ queue"
    q = Queue(name)

    @DBOS.step()
    def echo(i: int) -> int:
        return i

    handles = q.enqueue_many(echo, range(3), batch_id="it's \\ a batch")
    assert [h.get_result() for h in handles] == [0, 1, 2]
    rows = DBOS.list_workflows(queue_name=name)
    assert sorted(r.workflow_id for r in rows) == [f"it's \\ a batch/{i}" for i in range(3)]
    with SetWorkflowTimeout(60):
        timed = q.enqueue_many(echo, [5], batch_id="timed")
    assert timed[0].get_result() == 5
    status = DBOS.get_workflow_status(timed[0].workflow_id)
    assert status is not None and status.workflow_timeout_ms == 60_000


def test_timeout_cancels_workflow_and_children(launched: str) -> None:
    q = Queue("timeouts")
    child_started = threading.Event()

    @DBOS.workflow()
    def child() -> None:
        child_started.set()
        for _ in range(200):
            DBOS.sleep(0.05)

    @DBOS.workflow()
    def parent() -> None:
        DBOS.start_workflow(child).get_result()

    with SetWorkflowID("to-parent"), SetWorkflowTimeout(0.5):
        handle = q.enqueue(parent)
    with pytest.raises(DBOSWorkflowTimedOutError):
        handle.get_result(timeout_sec=20)
    assert child_started.is_set()
    wait_until(lambda: DBOS.get_workflow_status("to-parent-1").status == "CANCELLED")  # type: ignore[union-attr]
    status = handle.get_status()
    assert status.status == "CANCELLED" and status.workflow_timeout_ms == 500
    with pytest.raises(DBOSAwaitedWorkflowCancelledError):
        DBOS.retrieve_workflow("to-parent-1").get_result()


@pytest.mark.parametrize("how", ["direct", "enqueued"])
def test_a_workflow_that_times_out_between_steps_raises_the_timeout_error(
    launched: str, how: str
) -> None:
    """Its steps outlast the deadline: the caller learns it timed out, whichever saw it first
    (the workflow at its next step, or the sweep, after which the row reads CANCELLED)."""

    @DBOS.step(name="outlasting_step")
    def outlasting() -> None:
        time.sleep(0.3)

    @DBOS.workflow(name="outlasting_wf")
    def outlasting_wf() -> None:
        for _ in range(5):
            outlasting()

    with SetWorkflowTimeout(0.2), pytest.raises(DBOSWorkflowTimedOutError):
        if how == "direct":
            outlasting_wf()
        else:
            Queue("outlasting").enqueue(outlasting_wf).get_result(timeout_sec=20)


def test_a_workflow_stopped_past_its_deadline_reports_a_timeout(launched: str) -> None:
    """Another process's sweep may cancel an overdue workflow before this one's: this process
    then hears of a cancellation, but the caller must still learn that it timed out."""
    from dbos_nb.core.runtime import get_runtime
    from dbos_nb.core.workflows import Execution, on_failure
    from dbos_nb.errors import WorkflowPreempted

    @DBOS.workflow(name="overdue_wf")
    def overdue_wf() -> None:
        return None

    rt = get_runtime()
    reg = overdue_wf.__dbos_nb_registration__  # type: ignore[attr-defined]
    past, future = rt.now_ms() - 1, rt.now_ms() + 60_000
    heard = WorkflowPreempted("w", "cancelled")
    shown = on_failure(rt, Execution(reg, "w", "o", (), {}, past), heard)
    assert isinstance(shown, DBOSWorkflowTimedOutError)
    shown = on_failure(rt, Execution(reg, "w", "o", (), {}, future), heard)
    assert type(shown) is DBOSAwaitedWorkflowCancelledError  # a real cancel stays one
    shutdown = WorkflowPreempted("w", "shutdown")
    assert on_failure(rt, Execution(reg, "w", "o", (), {}, past), shutdown) is shutdown


def test_timeout_starts_at_dequeue(launched: str) -> None:
    q = Queue("busy", concurrency=1)
    gate = threading.Event()

    @DBOS.step()
    def occupy() -> None:
        gate.wait(10)

    @DBOS.workflow()
    def quick() -> str:
        return "made it"

    blocker = q.enqueue(occupy)
    with SetWorkflowTimeout(0.2):
        waiting = q.enqueue(quick)
    time.sleep(0.5)  # longer than the timeout, but the workflow has not started yet
    assert waiting.get_status().status == "ENQUEUED"
    gate.set()
    blocker.get_result()
    assert waiting.get_result(timeout_sec=10) == "made it"


def test_deadline_survives_a_restart(db_url: str) -> None:
    clock = ManualClock()
    DBOS(config=config(db_url), clock=clock)
    q = Queue("durable_timeout")
    entered = threading.Event()

    @DBOS.workflow(name="long_wf")
    def long_wf() -> None:
        entered.set()
        DBOS.sleep(3600)

    DBOS.launch()
    with SetWorkflowTimeout(60):
        handle = q.enqueue(long_wf)
    assert entered.wait(10)
    deadline = handle.get_status().workflow_deadline_epoch_ms
    assert deadline == handle.get_status().dequeued_at + 60_000  # type: ignore[operator]
    DBOS.destroy()

    clock.advance(61)
    DBOS(config=config(db_url), clock=clock)
    Queue("durable_timeout")
    DBOS.workflow(name="long_wf")(long_wf.__wrapped__)  # type: ignore[attr-defined]
    DBOS.launch()
    with pytest.raises(DBOSWorkflowTimedOutError):
        DBOS.retrieve_workflow(handle.workflow_id).get_result(timeout_sec=10)
    assert DBOS.get_workflow_status(handle.workflow_id).workflow_deadline_epoch_ms == deadline  # type: ignore[union-attr]


def test_client_enqueue_and_manage(launched: str) -> None:
    Queue("client_q", concurrency=2)

    @DBOS.workflow(name="client_wf")
    def client_wf(x: int, y: int = 0) -> int:
        return x + y

    @DBOS.step(name="client_step")
    def client_step(s: str) -> str:
        return s + "!"

    with DBOSClient(launched) as client:
        h = client.enqueue(
            {"queue_name": "client_q", "workflow_name": "client_wf", "workflow_id": "c-1"}, 2, y=3
        )
        assert h.get_result(timeout_sec=10) == 5
        assert client.retrieve_workflow("c-1").get_status().status == "SUCCESS"
        hs = client.enqueue({"queue_name": "client_q", "workflow_name": "client_step"}, "hi")
        assert hs.get_result(timeout_sec=10) == "hi!"
        with pytest.raises(UnknownQueueError, match="no_such_queue"):
            client.enqueue({"queue_name": "no_such_queue", "workflow_name": "client_wf"})
        with pytest.raises(UnknownWorkflowNameError, match="no_such_wf"):
            client.enqueue({"queue_name": "client_q", "workflow_name": "no_such_wf"})
        with pytest.raises(DbosNbError, match="workflow_name"):
            client.enqueue({"queue_name": "client_q"})  # type: ignore[typeddict-item]
        with pytest.raises(DbosNbError, match="unknown enqueue option"):
            client.enqueue({"queue_name": "client_q", "workflow_name": "client_wf", "bogus": 1})  # type: ignore[typeddict-unknown-key]
        pending = client.enqueue(
            {"queue_name": "later", "workflow_name": "not_yet", "allow_unregistered": True}
        )
        assert pending.get_status().status == "ENQUEUED"
        client.cancel_workflow(pending.workflow_id)
        assert pending.get_status().status == "CANCELLED"
        assert [w.workflow_id for w in client.list_workflows(name="client_wf")] == ["c-1"]
        assert client.list_workflow_steps("c-1") == []


def test_client_reads_queue_and_name_once_for_a_loop_of_enqueues(launched: str) -> None:
    """A client's enqueue checks that the queue is declared and the name registered: read once
    for a loop of enqueues (one round trip each, not three), never remembered when it refuses,
    and read again after TARGET_TTL_SEC (a name registered anew as a step is then seen).
    The queue is only stored, not served here: the rows stay as the client wrote them."""
    from dbos_nb.client import TARGET_TTL_SEC
    from dbos_nb.core.runtime import get_runtime
    from dbos_nb.models import STEP_WORKFLOW_PREFIX, QueueSettings

    store = get_runtime().store
    store.upsert_queue(QueueSettings(name="ttl_q"), 0)
    store.record_functions([("ttl_fn", "workflow", "elsewhere", "h1")], 0)
    clock = ManualClock()
    with DBOSClient(launched, clock=clock) as client:
        reads: list[tuple[str, str]] = []
        read = client._store.enqueue_target

        def counted(queue_name: str, name: str) -> tuple[bool, str | None]:
            reads.append((queue_name, name))
            return read(queue_name, name)

        client._store.enqueue_target = counted  # type: ignore[method-assign]
        options: EnqueueOptions = {"queue_name": "ttl_q", "workflow_name": "ttl_fn"}
        ids = [client.enqueue(options, i).workflow_id for i in range(5)]
        assert reads == [("ttl_q", "ttl_fn")]
        assert {client.get_workflow_status(w).name for w in ids} == {"ttl_fn"}  # type: ignore[union-attr]

        # Refusals are read each time: a queue declared right after one is used at once.
        later: EnqueueOptions = {"queue_name": "ttl_later", "workflow_name": "ttl_fn"}
        with pytest.raises(UnknownQueueError, match="ttl_later"):
            client.enqueue(later, 1)
        store.upsert_queue(QueueSettings(name="ttl_later"), 0)
        assert client.enqueue(later, 1).get_status().status == "ENQUEUED"
        with pytest.raises(UnknownWorkflowNameError, match="ttl_other"):
            client.enqueue({"queue_name": "ttl_q", "workflow_name": "ttl_other"})
        with pytest.raises(UnknownWorkflowNameError, match="ttl_other"):
            client.enqueue({"queue_name": "ttl_q", "workflow_name": "ttl_other"})
        assert reads.count(("ttl_later", "ttl_fn")) == 2
        # What `allow_unregistered` let through is not taken as a declaration.
        nowhere: EnqueueOptions = {"queue_name": "ttl_nowhere", "workflow_name": "ttl_fn"}
        assert client.enqueue({**nowhere, "allow_unregistered": True}, 1).get_status() is not None
        with pytest.raises(UnknownQueueError, match="ttl_nowhere"):
            client.enqueue(nowhere, 2)
        assert reads.count(("ttl_q", "ttl_other")) == 2

        # Another process registers the name as a step: seen once the remembered kind expires.
        store.record_functions([("ttl_fn", "step", "elsewhere", "h2")], 0)
        clock.advance(TARGET_TTL_SEC / 2)
        stale = client.enqueue(options, 6).get_status()
        assert stale.name == "ttl_fn"
        clock.advance(TARGET_TTL_SEC)
        fresh = client.enqueue(options, 7).get_status()
        assert fresh.name == STEP_WORKFLOW_PREFIX + "ttl_fn"
        assert reads.count(("ttl_q", "ttl_fn")) == 2


def test_a_queue_declared_by_two_processes_at_once_is_stored_once(launched: str) -> None:
    """Processes that launch together declare the same queues at the same moment: the second
    declaration waits for the first one's row and finds it (no unique violation). Here another
    connection, standing for the other process, holds its uncommitted insert of the row while
    this process declares the queue."""
    from sqlalchemy import insert as sa_insert

    from dbos_nb.core.runtime import get_runtime
    from dbos_nb.models import QueueSettings
    from dbos_nb.storage.schema import queues

    rt = get_runtime()
    settings = QueueSettings(name="raced", concurrency=3)
    outcome: list[Any] = []

    def declare() -> None:
        try:
            outcome.append(rt.store.upsert_queue(settings, rt.now_ms()))
        except Exception as exc:
            outcome.append(exc)

    other = Database(launched)
    try:
        with other.write() as conn:
            conn.execute(sa_insert(queues).values(name="raced", concurrency=3, updated_at=1))
            thread = threading.Thread(target=declare)
            thread.start()
            thread.join(0.5)
            assert thread.is_alive()  # it waits for the other declaration to commit
        thread.join(20)
    finally:
        other.dispose()
    assert len(outcome) == 1 and isinstance(outcome[0], QueueSettings), outcome
    assert outcome[0].concurrency == 3
    stored = rt.store.get_queue("raced")
    assert stored is not None and stored.concurrency == 3


def test_management_and_batch_arguments_of_the_wrong_kind_are_refused(launched: str) -> None:
    """Clear errors instead of the database's (or a string read as a list of characters)."""

    @DBOS.workflow(name="arg_checked")
    def arg_checked(x: int) -> int:
        return x

    arg_checked(1)
    for filters, message in (
        ({"limit": -1}, "limit"),
        ({"offset": -1}, "offset"),
        ({"name": 3}, "name"),
        ({"queue_name": [b"q"]}, "queue_name"),
        ({"workflow_ids": "abc"}, "workflow_ids"),
        ({"status": [1]}, "status"),
    ):
        with pytest.raises(DbosNbError, match=message):
            DBOS.list_workflows(**filters)
    assert len(DBOS.list_workflows(name="arg_checked", limit=1)) == 1
    assert len(DBOS.list_workflows(name=["arg_checked", "other"])) == 1  # a list, as in DBOS
    wid = DBOS.list_workflows(name="arg_checked")[0].workflow_id
    # Any iterable of strings will do, a generator too (read once).
    assert len(DBOS.list_workflows(workflow_ids=(w for w in [wid]))) == 1
    assert len(DBOS.list_workflows(status=(s for s in ["SUCCESS"]), name="arg_checked")) == 1
    q = Queue("arg_checks")
    with pytest.raises(DbosNbError, match="batch_id"):
        q.enqueue_many(arg_checked, [1, 2], batch_id=5)  # type: ignore[arg-type]
    with (
        pytest.raises(DbosNbError, match="deduplication_id"),
        SetEnqueueOptions(deduplication_id="once"),
    ):
        q.enqueue_many(arg_checked, [1, 2])
    assert len(DBOS.list_workflows(name="arg_checked")) == 1  # nothing was enqueued
    for options, message in (
        ({"interval_seconds": float("nan")}, "interval_seconds"),
        ({"interval_seconds": "1"}, "interval_seconds"),
        ({"backoff_rate": 0.5}, "backoff_rate"),
    ):
        with pytest.raises(DbosNbError, match=message):
            DBOS.step(**options)  # type: ignore[arg-type]
