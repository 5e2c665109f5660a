"""`DBOS.delete_queue` (and the client's), refused while the queue holds work; and
`DBOS.register_queue_async`."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest
import sqlalchemy as sa

from conftest import wait_until
from dbos_nb import (
    DBOS,
    DBOSClient,
    EnqueueOptions,
    InvalidQueueSettingsError,
    Queue,
    QueueNotEmptyError,
    UnknownQueueError,
)
from dbos_nb.core.queue import QUEUES
from dbos_nb.core.runtime import get_runtime
from dbos_nb.core.scheduler import Scheduler
from dbos_nb.models import INTERNAL_QUEUE
from dbos_nb.storage.schema import queue_starts, workflow_status

GATE = threading.Event()


@DBOS.workflow(name="dq_held")
def held(i: int) -> int:
    GATE.wait(20)
    return i


@DBOS.workflow(name="dq_plain")
def plain(i: int) -> int:
    return i * 2


def _starts_recorded(queue_name: str) -> int:
    with get_runtime().db.read() as conn:
        count = sa.select(sa.func.count()).where(queue_starts.c.queue_name == queue_name)
        return int(conn.execute(count).scalar_one())


def test_a_queue_holding_work_is_not_deleted(launched: str) -> None:
    """Deleting a queue whose workflows wait or run would leave them to nobody (DBOS deletes it
    all the same): refused, naming what it holds, and nothing changes; once they have
    finished the queue goes, with its settings and its limiter's record of starts."""
    GATE.clear()
    queue = Queue("dq_busy", concurrency=1, limiter={"limit": 100, "period": 60})
    handles = [queue.enqueue(held, i) for i in range(3)]
    wait_until(lambda: handles[0].get_status().status == "PENDING")
    with pytest.raises(QueueNotEmptyError, match=r"'dq_busy' still holds workflows") as refused:
        DBOS.delete_queue("dq_busy")
    assert refused.value.counts == {"ENQUEUED": 2, "PENDING": 1}
    assert "1 PENDING" in str(refused.value) and "2 ENQUEUED" in str(refused.value)
    stored = DBOS.retrieve_queue("dq_busy")
    assert stored is not None and stored.concurrency == 1  # nothing deleted
    GATE.set()
    assert [h.get_result(timeout_sec=20) for h in handles] == [0, 1, 2]
    assert _starts_recorded("dq_busy") == 3

    DBOS.delete_queue("dq_busy")
    assert DBOS.retrieve_queue("dq_busy") is None
    assert "dq_busy" not in [q.name for q in DBOS.list_queues()]
    assert _starts_recorded("dq_busy") == 0


def test_a_deleted_queue_takes_no_more_work_until_declared_again(launched: str) -> None:
    queue = Queue("dq_gone")
    assert queue.enqueue(plain, 1).get_result(timeout_sec=20) == 2
    DBOS.delete_queue("dq_gone")
    DBOS.delete_queue("dq_gone")  # unknown now: not an error, as in DBOS
    DBOS.delete_queue("dq_never_declared")
    # The Queue object kept from before, and the name, are refused: nobody serves it now.
    with pytest.raises(UnknownQueueError, match=r"'dq_gone' was deleted"):
        queue.enqueue(plain, 2)
    with pytest.raises(UnknownQueueError, match=r"'dq_gone' was deleted"):
        queue.enqueue_many(plain, [2, 3])
    assert "dq_gone" not in QUEUES.names()  # not served here any more
    with pytest.raises(UnknownQueueError, match=r"'dq_gone' has not been declared"):
        DBOS.enqueue_workflow("dq_gone", plain, 2)
    assert DBOS.list_workflows(queue_name="dq_gone", status="ENQUEUED") == []
    # Declared again: served again, the old object too.
    Queue("dq_gone", worker_concurrency=2)
    assert queue.enqueue(plain, 3).get_result(timeout_sec=20) == 6
    stored = DBOS.retrieve_queue("dq_gone")
    assert stored is not None and stored.worker_concurrency == 2


def test_a_queue_deleted_here_and_declared_again_elsewhere_is_served_again(
    launched: str,
) -> None:
    """After this process deleted the queue, a client (or another process) declares it again:
    the Queue objects kept here enqueue again, with the stored settings, and this process
    serves the queue again."""
    queue = Queue("dq_back", concurrency=4)
    DBOS.delete_queue("dq_back")
    with pytest.raises(UnknownQueueError, match="was deleted"):
        queue.enqueue(plain, 1)
    with DBOSClient(launched) as client:
        client.register_queue("dq_back", global_concurrency=2)
    assert queue.enqueue(plain, 5).get_result(timeout_sec=20) == 10
    assert "dq_back" in QUEUES.names()
    assert queue.concurrency == 2


def test_the_client_deletes_a_queue_as_dbos_does(launched: str) -> None:
    GATE.clear()
    Queue("dq_client")
    handle = Queue("dq_client_busy", concurrency=1).enqueue(held, 7)
    wait_until(lambda: handle.get_status().status == "PENDING")
    with DBOSClient(launched) as client:
        with pytest.raises(QueueNotEmptyError, match="dq_client_busy"):
            client.delete_queue("dq_client_busy")
        client.delete_queue("dq_client")
        asyncio.run(client.delete_queue_async("dq_client_unknown"))
        assert client.retrieve_queue("dq_client") is None
        assert client.retrieve_queue("dq_client_busy") is not None
    GATE.set()
    assert handle.get_result(timeout_sec=20) == 7
    asyncio.run(DBOS.delete_queue_async("dq_client_busy"))
    assert DBOS.retrieve_queue("dq_client_busy") is None


def test_register_queue_async_declares_and_stores(launched: str) -> None:
    queue = asyncio.run(
        DBOS.register_queue_async(
            "dq_async", worker_concurrency=2, limiter={"limit": 5, "period": 1}
        )
    )
    assert isinstance(queue, Queue)
    assert queue.enqueue(plain, 4).get_result(timeout_sec=20) == 8
    stored = DBOS.retrieve_queue("dq_async")
    assert stored is not None
    assert (stored.worker_concurrency, stored.limiter) == (2, {"limit": 5, "period": 1.0})


def test_a_deleted_rate_limited_queue_leaves_the_scheduler_idle(launched: str) -> None:
    """The limiter announced when its next slot frees; the queue is deleted before the
    scheduler looks at it again: once that moment has passed, the scheduler must not wake for
    the queue at once, pass after pass (it spun a core)."""
    queue = Queue("dq_limited", limiter={"limit": 1, "period": 1.0})
    first, second = queue.enqueue(plain, 1), queue.enqueue(plain, 2)
    assert first.get_result(timeout_sec=20) == 2
    # The waiting one ends, and the queue goes, without waking the scheduler in between (a
    # cancel would: its claim would then find nothing waiting and forget the slot).
    with get_runtime().db.write() as conn:
        conn.execute(
            sa.update(workflow_status)
            .where(workflow_status.c.workflow_uuid == second.workflow_id)
            .values(status="CANCELLED")
        )
    DBOS.delete_queue("dq_limited")
    time.sleep(1.2)  # past the slot
    scheduler = get_runtime().direct
    assert isinstance(scheduler, Scheduler)
    before = scheduler.passes
    time.sleep(0.5)
    # Polling every 0.05 s: about ten passes; spinning, tens of thousands.
    assert scheduler.passes - before < 200


def test_the_internal_queue_cannot_be_deleted(launched: str) -> None:
    with pytest.raises(InvalidQueueSettingsError, match="internal queue"):
        DBOS.delete_queue(INTERNAL_QUEUE)
    with DBOSClient(launched) as client, pytest.raises(InvalidQueueSettingsError):
        client.delete_queue(INTERNAL_QUEUE)
    assert get_runtime().store.get_queue(INTERNAL_QUEUE) is not None


def test_a_batch_is_not_put_back_in_a_deleted_queue(launched: str) -> None:
    """`retry_failed` and `resume_cancelled` put a batch's workflows back in their queue: a
    deleted one would keep them waiting for nobody. Refused, and nothing changes."""
    GATE.clear()
    queue = Queue("dq_batch", concurrency=1)
    batch = queue.map(held, [1, 2], batch="dq-batch")
    wait_until(lambda: DBOS.get_workflow_status("dq-batch/0").status == "PENDING")  # type: ignore[union-attr]
    DBOS.cancel_workflows(["dq-batch/0", "dq-batch/1"])
    GATE.set()
    wait_until(lambda: not get_runtime().is_running("dq-batch/0"))
    DBOS.delete_queue("dq_batch")
    with pytest.raises(UnknownQueueError, match="dq_batch"):
        batch.resume_cancelled()
    statuses = [DBOS.get_workflow_status(f"dq-batch/{i}").status for i in (0, 1)]  # type: ignore[union-attr]
    assert statuses == ["CANCELLED", "CANCELLED"]
    Queue("dq_batch", concurrency=1)  # declared again: the batch goes back and runs
    batch.resume_cancelled()
    batch.wait(timeout=20, show=False)
    assert [DBOS.get_workflow_status(f"dq-batch/{i}").status for i in (0, 1)] == ["SUCCESS"] * 2  # type: ignore[union-attr]


FAIL_FINISH = {"now": True}
REPLAYED: dict[str, Queue] = {}  # the queue object, declared once by the test


@DBOS.step(name="dq_finish")
def finish(r: int) -> int:
    if FAIL_FINISH["now"]:
        raise RuntimeError("service down")
    return r + 1


@DBOS.workflow(name="dq_by_object")
def by_object() -> int:
    return finish(REPLAYED["queue"].enqueue(plain, 4).get_result())


@DBOS.workflow(name="dq_by_name")
def by_name() -> int:
    return finish(DBOS.enqueue_workflow("dq_replayed", plain, 4).get_result())


@DBOS.workflow(name="dq_by_options")
def by_options() -> int:
    options = EnqueueOptions(queue_name="dq_replayed", workflow_name="dq_plain")
    return finish(DBOS.enqueue_workflow_with_options(options, 4).get_result())


@pytest.mark.parametrize("parent", [by_object, by_name, by_options])
def test_a_replay_of_an_enqueue_onto_a_queue_deleted_since_returns_the_child(
    launched: str, parent: Callable[[], int]
) -> None:
    """A workflow enqueued a child, which finished; the queue was deleted; a fork (or a
    recovery) replays the enqueue: it returns the recorded child, rather than refuse the
    queue, which a new enqueue would."""
    REPLAYED["queue"] = Queue("dq_replayed")
    FAIL_FINISH["now"] = True
    handle = DBOS.start_workflow(parent)
    with pytest.raises(RuntimeError, match="service down"):
        handle.get_result(timeout_sec=20)
    DBOS.delete_queue("dq_replayed")
    FAIL_FINISH["now"] = False
    forked = DBOS.fork_workflow(handle.workflow_id, 3)  # keeps the enqueue and its result
    assert forked.get_result(timeout_sec=20) == 9
    with pytest.raises(UnknownQueueError):
        DBOS.start_workflow(parent).get_result(timeout_sec=20)


CHILD_QUEUE: dict[str, Queue] = {}


@DBOS.workflow(name="dq_parent_item")
def parent_item(i: int) -> int:
    return CHILD_QUEUE["queue"].enqueue(held, i).get_result()


def test_a_batch_items_child_goes_back_through_the_internal_queue_if_its_queue_is_gone(
    launched: str,
) -> None:
    """resume_cancelled() puts an item's cancelled child back too: in its own queue while it
    is declared, else (deleted since by another process) in the internal queue, which every
    process serves, rather than a queue where nothing would ever start it."""
    GATE.clear()
    CHILD_QUEUE["queue"] = Queue("dq_child_q")
    batch = Queue("dq_items").map(parent_item, [5], batch="dq-children")
    wait_until(lambda: len(DBOS.list_workflows(queue_name="dq_child_q", status="PENDING")) == 1)
    assert batch.cancel() == 2  # the item and its child
    GATE.set()
    wait_until(lambda: not get_runtime().has_running())
    with DBOSClient(launched) as client:  # another process deletes the child's queue
        client.delete_queue("dq_child_q")
    assert batch.resume_cancelled() == 1
    assert batch.wait(timeout=20, show=False).results() == [5]
    (child,) = DBOS.list_workflows(parent_workflow_id="dq-children/0")
    assert (child.status, child.queue_name) == ("SUCCESS", INTERNAL_QUEUE)
