"""`retrieve_queue` and `list_queues` (on DBOS and DBOSClient): queues as the database holds
them, as every process sees them; reading one declares nothing."""

from __future__ import annotations

import asyncio

import pytest

from dbos_nb import (
    DBOS,
    DBOSClient,
    DbosNbError,
    InvalidQueueSettingsError,
    Queue,
)
from dbos_nb.core.queue import QUEUES
from dbos_nb.core.runtime import get_runtime
from dbos_nb.models import INTERNAL_QUEUE, QueueSettings


def _limits(queue: Queue) -> tuple[object, ...]:
    return (
        queue.name,
        queue.concurrency,
        queue.worker_concurrency,
        queue.limiter,
        queue.priority_enabled,
        queue.polling_interval_sec,
    )


def test_a_declared_queue_reads_back_with_its_settings(launched: str) -> None:
    Queue("stored_llm", 10, {"limit": 50, "period": 30}, worker_concurrency=5)
    Queue("stored_plain", priority_enabled=True, polling_interval_sec=0.25)
    read = DBOS.retrieve_queue("stored_llm")
    assert read is not None
    assert _limits(read) == ("stored_llm", 10, 5, {"limit": 50, "period": 30.0}, False, 1.0)
    plain = DBOS.retrieve_queue("stored_plain")
    assert plain is not None and _limits(plain) == ("stored_plain", None, None, None, True, 0.25)
    assert DBOS.retrieve_queue("stored_never") is None
    assert DBOS.retrieve_queue(INTERNAL_QUEUE) is None  # nobody's declaration
    names = [q.name for q in DBOS.list_queues()]
    assert "stored_llm" in names and "stored_plain" in names
    assert names == sorted(names) and not any(n.startswith("_") for n in names)
    assert asyncio.run(DBOS.retrieve_queue_async("stored_llm")) is not None
    assert [q.name for q in asyncio.run(DBOS.list_queues_async())] == names
    with pytest.raises(InvalidQueueSettingsError, match="non-empty string"):
        DBOS.retrieve_queue("")

    @DBOS.workflow(name="stored_doubled")
    def doubled(x: int) -> int:
        return 2 * x

    # Work enqueued through a queue read back runs as any (this process serves the queue).
    assert read.enqueue(doubled, 21).get_result(timeout_sec=10) == 42


def test_reading_a_queue_declares_nothing_and_shows_the_database(launched: str) -> None:
    """A queue only another process declared is read, not declared: this process does not
    start serving it, and its object shows the stored settings, also when this process
    declared the same name with other settings before another process changed them."""
    store = get_runtime().store
    store.upsert_queue(QueueSettings(name="stored_elsewhere", concurrency=3), 0)
    read = DBOS.retrieve_queue("stored_elsewhere")
    assert read is not None and read.concurrency == 3
    assert QUEUES.get("stored_elsewhere") is None
    Queue("stored_changed", 2)
    store.upsert_queue(QueueSettings(name="stored_changed", concurrency=7), 0)  # elsewhere
    changed = DBOS.retrieve_queue("stored_changed")
    assert changed is not None and changed.concurrency == 7


def test_the_client_reads_the_same_queues(launched: str) -> None:
    Queue("stored_for_client", 4)
    with DBOSClient(launched) as client:
        read = client.retrieve_queue("stored_for_client")
        assert read is not None and read.concurrency == 4
        assert client.retrieve_queue("stored_nowhere") is None
        assert [q.name for q in client.list_queues()] == [q.name for q in DBOS.list_queues()]
        assert asyncio.run(client.list_queues_async()) != []
        assert asyncio.run(client.retrieve_queue_async("stored_for_client")) is not None
        # It describes the client's database: enqueueing goes through the client.
        with pytest.raises(DbosNbError, match=r"client\.enqueue"):
            read.enqueue(print, 1)
        with pytest.raises(DbosNbError, match=r"client\.enqueue"):
            read.enqueue_many(print, [1])
        assert isinstance(read, Queue)
        with pytest.raises(DbosNbError, match=r"client\.enqueue"):
            read.map(print, [1])


def test_queues_dbos_makes_have_the_notebook_map(launched: str) -> None:
    """`DBOS.register_queue`, `retrieve_queue` and `list_queues` give dbos_nb's exported Queue,
    with `map()`, as `Queue(...)` does."""

    @DBOS.step(name="stored_double")
    def double(x: int) -> int:
        return 2 * x

    registered = DBOS.register_queue("stored_mapped", concurrency=2)
    read = DBOS.retrieve_queue("stored_mapped")
    listed = [q for q in DBOS.list_queues() if q.name == "stored_mapped"]
    assert isinstance(registered, Queue) and isinstance(read, Queue) and len(listed) == 1
    assert isinstance(listed[0], Queue)
    first = registered.map(double, [1, 2, 3], batch="stored_mapped_first")
    second = read.map(double, [4, 5], batch="stored_mapped_second")
    first.wait(timeout=20, show=False)
    second.wait(timeout=20, show=False)
    assert first.results() == [2, 4, 6] and second.results() == [8, 10]


def test_the_queue_class_must_be_a_queue() -> None:
    from dbos_nb.core.queue import queue_class, use_queue_class

    with pytest.raises(TypeError, match="subclass of Queue"):
        use_queue_class(int)  # type: ignore[arg-type]
    assert queue_class() is Queue
