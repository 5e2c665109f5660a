"""DBOS 3.4's queue setters (`set_global_concurrency`, `set_worker_concurrency`, `set_limiter`,
`set_polling_interval_sec`, ... and their `_async` twins): one setting changed in the stored
row, checked against the others, obeyed by every process's next claims."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from conftest import config, wait_until
from dbos_nb import (
    DBOS,
    DBOSClient,
    DbosNbError,
    EnqueueOptions,
    InvalidQueueSettingsError,
    Queue,
    UnknownQueueError,
)
from dbos_nb.core.queue import QUEUES
from dbos_nb.core.runtime import get_runtime

SPANS: dict[int, tuple[float, float]] = {}
_SPANS_LOCK = threading.Lock()
GATE = threading.Event()
STARTED: list[int] = []


@DBOS.workflow(name="setter_timed")
def timed(i: int) -> int:
    started = time.monotonic()
    time.sleep(0.05)
    with _SPANS_LOCK:
        SPANS[i] = (started, time.monotonic())
    return i


@DBOS.workflow(name="setter_gated")
def gated(i: int) -> int:
    STARTED.append(i)
    GATE.wait(30)
    return i


def _stored(name: str) -> tuple[object, ...]:
    settings = get_runtime().store.get_queue(name)
    assert settings is not None
    return (
        settings.concurrency,
        settings.worker_concurrency,
        settings.limit,
        settings.period_ms,
        settings.polling_interval_ms,
        settings.token_limit,
    )


def test_each_setter_changes_one_stored_setting(launched: str) -> None:
    queue = Queue("adjusted", concurrency=4, worker_concurrency=2)
    queue.set_worker_concurrency(1)
    assert _stored("adjusted") == (4, 1, None, None, 1000, None)
    queue.set_limiter({"limit": 5, "period": 1.5})
    assert _stored("adjusted") == (4, 1, 5, 1500, 1000, None)
    queue.set_global_concurrency(None)
    queue.set_polling_interval_sec(0.25)
    queue.set_token_limiter({"limit": 1000, "period": 60})
    assert _stored("adjusted") == (None, 1, 5, 1500, 250, 1000)
    queue.set_concurrency(3)  # DBOS's deprecated name
    assert (queue.concurrency, queue.global_concurrency, queue.worker_concurrency) == (3, 3, 1)
    assert queue.limiter == {"limit": 5, "period": 1.5}
    assert queue.polling_interval_sec == 0.25
    queue.set_limiter(None)
    assert _stored("adjusted") == (3, 1, None, None, 250, 1000)
    # Another object of the same queue (read from the database, or kept from an earlier
    # cell) changes the declaration as well.
    read = DBOS.retrieve_queue("adjusted")
    assert read is not None
    read.set_worker_concurrency(3)
    assert queue.worker_concurrency == 3
    declared = QUEUES.get("adjusted")
    assert declared is not None and declared.worker_concurrency == 3


def test_the_async_twins(launched: str) -> None:
    queue = Queue("adjusted_async", concurrency=2)

    async def adjust() -> tuple[object, ...]:
        await queue.set_global_concurrency_async(6)
        await queue.set_worker_concurrency_async(3)
        await queue.set_limiter_async({"limit": 9, "period": 3})
        await queue.set_polling_interval_sec_async(2)
        await queue.set_concurrency_async(5)
        await queue.set_token_limiter_async(None)
        return (
            await queue.get_global_concurrency_async(),
            await queue.get_concurrency_async(),
            await queue.get_worker_concurrency_async(),
            await queue.get_limiter_async(),
            await queue.get_polling_interval_sec_async(),
        )

    assert asyncio.run(adjust()) == (5, 5, 3, {"limit": 9, "period": 3.0}, 2.0)
    assert _stored("adjusted_async") == (5, 3, 9, 3000, 2000, None)


def test_invalid_changes_are_refused_and_change_nothing(launched: str) -> None:
    queue = Queue("guarded_setters", concurrency=3, worker_concurrency=2, limiter=None)
    before = _stored("guarded_setters")
    with pytest.raises(InvalidQueueSettingsError, match=r"worker_concurrency \(4\) cannot"):
        queue.set_worker_concurrency(4)
    with pytest.raises(InvalidQueueSettingsError, match=r"worker_concurrency \(2\) cannot"):
        queue.set_global_concurrency(1)
    with pytest.raises(ValueError, match="missing"):  # InvalidQueueSettingsError is one
        queue.set_limiter({"limit": 5})
    with pytest.raises(InvalidQueueSettingsError, match="polling_interval_sec"):
        queue.set_polling_interval_sec(0)
    with pytest.raises(InvalidQueueSettingsError, match="positive integer"):
        queue.set_worker_concurrency(0)
    assert _stored("guarded_setters") == before
    assert (queue.concurrency, queue.worker_concurrency) == (3, 2)


def test_a_running_process_obeys_a_limit_tightened_while_work_runs(launched: str) -> None:
    """Work starts on a queue without limits (each enqueue may start its workflow at once);
    the limit then drops to one: each workflow enqueued after that runs alone."""
    queue = Queue("tightened_midway")
    SPANS.clear()
    early = [queue.enqueue(timed, i) for i in range(4)]
    queue.set_global_concurrency(1)
    late = [queue.enqueue(timed, i) for i in range(100, 106)]
    assert [h.get_result(timeout_sec=30) for h in early + late] == [*range(4), *range(100, 106)]
    for i in range(100, 106):
        start, end = SPANS[i]
        others = [span for j, span in SPANS.items() if j != i]
        assert all(e <= start or s >= end for s, e in others), f"workflow {i} did not run alone"


def test_loosening_a_limit_starts_waiting_work_at_once(db_url: str) -> None:
    """Work waiting behind a full queue starts when a setter loosens the limit, without
    waiting for the fallback poll (here 60 s: the process's and the queue's own)."""
    DBOS(config=config(db_url, polling_interval_sec=60))
    queue = Queue("loosened", concurrency=1, polling_interval_sec=60)
    DBOS.launch()
    GATE.clear()
    STARTED.clear()
    try:
        handles = [queue.enqueue(gated, i) for i in range(2)]
        wait_until(lambda: STARTED == [0])
        time.sleep(0.2)
        assert STARTED == [0]  # the second waits behind the first
        queue.set_global_concurrency(2)
        wait_until(lambda: sorted(STARTED) == [0, 1], timeout=20)
    finally:
        GATE.set()
    assert [h.get_result(timeout_sec=20) for h in handles] == [0, 1]


def test_a_changed_setting_is_stored_again_at_the_next_launch(db_url: str) -> None:
    """The process's declaration follows the change: launching again (the notebook's next
    `%dbos_launch`) stores the changed settings, not the ones first declared."""
    DBOS(config=config(db_url))
    queue = Queue("relaunched", concurrency=4)
    DBOS.launch()
    queue.set_global_concurrency(2)
    DBOS.destroy()
    DBOS(config=config(db_url))
    DBOS.launch()
    assert _stored("relaunched")[0] == 2


def test_a_client_changes_its_own_databases_queue(launched: str) -> None:
    Queue("client_adjusted", concurrency=8)
    with DBOSClient(launched) as client:
        read = client.retrieve_queue("client_adjusted")
        assert read is not None
        read.set_limiter({"limit": 2, "period": 1})
        read.set_global_concurrency(4)
        assert (read.concurrency, read.limiter) == (4, {"limit": 2, "period": 1.0})
        registered = client.register_queue("client_made")
        registered.set_worker_concurrency(2)
    assert _stored("client_adjusted")[:4] == (4, None, 2, 1000)
    assert _stored("client_made")[1] == 2


def test_setters_refuse_a_queue_that_is_not_stored(db_url: str) -> None:
    DBOS(config=config(db_url))
    early = Queue("not_yet_stored", concurrency=2)
    with pytest.raises(DbosNbError, match=r"set_global_concurrency\(\) changes.*launch DBOS"):
        early.set_global_concurrency(3)
    DBOS.launch()
    assert early.concurrency == 2
    DBOS.delete_queue("not_yet_stored")
    with pytest.raises(UnknownQueueError, match="not_yet_stored"):
        early.set_global_concurrency(3)


def _race(a: Queue, b: Queue) -> list[str]:
    """a.set_global_concurrency(2) and b.set_worker_concurrency(3) at the same moment; returns
    the settings refused."""
    barrier = threading.Barrier(2)
    refused: list[str] = []

    def change(queue: Queue, setting: str, value: int) -> None:
        barrier.wait()
        try:
            getattr(queue, f"set_{setting}")(value)
        except InvalidQueueSettingsError:
            refused.append(setting)

    threads = [
        threading.Thread(target=change, args=(a, "global_concurrency", 2)),
        threading.Thread(target=change, args=(b, "worker_concurrency", 3)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return refused


def test_concurrent_changes_are_each_checked_against_the_other(launched: str) -> None:
    """One thread lowers the global limit while another raises the per-process one: whatever
    the order, the stored pair never has worker_concurrency above concurrency."""
    for round_ in range(10):
        name = f"raced_setters_{round_}"
        declared = Queue(name, concurrency=None, worker_concurrency=None)
        read = DBOS.retrieve_queue(name)
        assert read is not None
        refused = _race(declared, read)
        concurrency, worker = _stored(name)[:2]
        assert len(refused) == 1
        assert (concurrency, worker) in ((2, None), (None, 3))


def test_the_async_getters_read_what_is_stored_now(launched: str) -> None:
    """As DBOS's async getters do, they read the database: a change made by a client shows
    there, while the properties keep this process's view."""
    queue = Queue("read_async", concurrency=6, limiter={"limit": 4, "period": 2})
    with DBOSClient(launched) as client:
        read = client.retrieve_queue("read_async")
        assert read is not None
        read.set_global_concurrency(2)
        read.set_limiter(None)
        read.set_polling_interval_sec(0.5)

    async def look() -> tuple[object, ...]:
        return (
            await queue.get_global_concurrency_async(),
            await queue.get_limiter_async(),
            await queue.get_polling_interval_sec_async(),
        )

    assert asyncio.run(look()) == (2, None, 0.5)
    assert queue.concurrency == 6  # this process's declaration, until it declares again
    DBOS.delete_queue("read_async")
    with pytest.raises(UnknownQueueError):
        asyncio.run(queue.get_worker_concurrency_async())


def test_a_queue_polls_at_its_own_interval_when_shorter(db_url: str) -> None:
    """On SQLite nothing tells this process of a client's enqueue: it finds it by polling, at
    the queue's own interval (0.2 s) when the process's is longer (60 s)."""
    DBOS(config=config(db_url, polling_interval_sec=60))
    Queue("polled_often", polling_interval_sec=0.2)
    DBOS.launch()
    with DBOSClient(db_url) as client:
        handle = client.enqueue(
            EnqueueOptions(queue_name="polled_often", workflow_name="setter_timed"), 7
        )
        assert handle.get_result(timeout_sec=20) == 7
