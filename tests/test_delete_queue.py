"""`DBOS.delete_queue` (and the client's), refused while the queue holds work; and
`DBOS.register_queue_async`."""

from __future__ import annotations

import asyncio
import threading

import pytest
import sqlalchemy as sa

from conftest import wait_until
from dbos_nb import (
    DBOS,
    DBOSClient,
    Queue,
    QueueNotEmptyError,
    UnknownQueueError,
)
from dbos_nb.core.runtime import get_runtime
from dbos_nb.storage.schema import queue_starts

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
    with pytest.raises(UnknownQueueError, match="dq_gone"):
        queue.enqueue_many(plain, [2, 3])
    with pytest.raises(UnknownQueueError, match="dq_gone"):
        DBOS.enqueue_workflow("dq_gone", plain, 2)
    assert DBOS.list_workflows(queue_name="dq_gone", status="ENQUEUED") == []
    # Declared again: served again, the old object too.
    Queue("dq_gone", worker_concurrency=2)
    assert queue.enqueue(plain, 3).get_result(timeout_sec=20) == 6
    stored = DBOS.retrieve_queue("dq_gone")
    assert stored is not None and stored.worker_concurrency == 2


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
