"""`DBOSClient.register_queue`: a queue declared from a process without the application's code;
its settings are stored for every process, and the processes' claims obey them."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

from conftest import max_overlap, wait_until
from dbos_nb import (
    DBOS,
    DBOSClient,
    DbosNbError,
    EnqueueOptions,
    InvalidQueueSettingsError,
    Queue,
)
from dbos_nb.models import INTERNAL_QUEUE

SPANS: list[tuple[float, float]] = []
_SPANS_LOCK = threading.Lock()


@DBOS.workflow(name="client_registered_work")
def timed(i: int) -> int:
    started = time.monotonic()
    time.sleep(0.05)
    with _SPANS_LOCK:
        SPANS.append((started, time.monotonic()))
    return i


def test_a_queue_registered_by_a_client_is_stored_for_every_process(launched: str) -> None:
    with DBOSClient(launched) as client:
        queue = client.register_queue(
            "from_client",
            global_concurrency=3,
            worker_concurrency=2,
            limiter={"limit": 5, "period": 2},
            polling_interval_sec=0.5,
        )
        assert (queue.name, queue.concurrency, queue.worker_concurrency) == ("from_client", 3, 2)
        assert queue.limiter == {"limit": 5, "period": 2.0}
        # It describes the client's database: enqueueing goes through the client.
        with pytest.raises(DbosNbError, match=r"client\.enqueue"):
            queue.enqueue(timed, 1)
        stored = DBOS.retrieve_queue("from_client")
        assert stored is not None
        assert (stored.concurrency, stored.worker_concurrency, stored.limiter) == (
            3,
            2,
            {"limit": 5, "period": 2.0},
        )
        assert stored.polling_interval_sec == 0.5
        # A process that names the queue takes the stored settings, and serves it.
        declared = Queue("from_client")
        assert (declared.concurrency, declared.worker_concurrency) == (3, 2)
        handle = client.enqueue(
            EnqueueOptions(queue_name="from_client", workflow_name="client_registered_work"), 7
        )
        assert handle.get_result(timeout_sec=20) == 7
        # DBOS's deprecated spelling of the global limit.
        assert client.register_queue("from_client_old", concurrency=4).concurrency == 4
        registered = asyncio.run(client.register_queue_async("from_client_async", limiter=None))
        assert registered.concurrency is None
        assert DBOS.retrieve_queue("from_client_async") is not None


def test_the_processes_claims_obey_the_settings_a_client_stores(launched: str) -> None:
    """A running process serves a queue declared by name; a client then limits it to one
    workflow at a time: from its next claim on, no two run at once."""
    Queue("client_limited")
    SPANS.clear()
    with DBOSClient(launched) as client:
        client.register_queue("client_limited", global_concurrency=1)
        options = EnqueueOptions(
            queue_name="client_limited", workflow_name="client_registered_work"
        )
        handles = [client.enqueue(options, i) for i in range(6)]
        assert [h.get_result(timeout_sec=30) for h in handles] == list(range(6))
    assert len(SPANS) == 6
    assert max_overlap(SPANS) == 1


def test_on_conflict_chooses_whether_stored_settings_change(
    launched: str, caplog: pytest.LogCaptureFixture
) -> None:
    Queue("conflicted", concurrency=5)
    with DBOSClient(launched) as client:
        kept = client.register_queue("conflicted", global_concurrency=1, on_conflict="never_update")
        assert kept.concurrency == 5
        stored = DBOS.retrieve_queue("conflicted")
        assert stored is not None and stored.concurrency == 5
        with caplog.at_level(logging.WARNING):
            replaced = client.register_queue("conflicted", global_concurrency=2)
        assert replaced.concurrency == 2
        stored = DBOS.retrieve_queue("conflicted")
        assert stored is not None and stored.concurrency == 2
        assert any("declared again with new limits" in r.getMessage() for r in caplog.records)
        # A new queue is stored under never_update too.
        fresh = client.register_queue(
            "fresh_never", worker_concurrency=3, on_conflict="never_update"
        )
        assert fresh.worker_concurrency == 3
        stored = DBOS.retrieve_queue("fresh_never")
        assert stored is not None and stored.worker_concurrency == 3


def test_bad_registrations_are_refused_and_store_nothing(launched: str) -> None:
    Queue("guarded", concurrency=4)
    with DBOSClient(launched) as client:
        with pytest.raises(DbosNbError, match=r"update_if_latest_version.*application version"):
            client.register_queue("guarded", on_conflict="update_if_latest_version")
        with pytest.raises(InvalidQueueSettingsError, match="on_conflict must be"):
            client.register_queue("guarded", on_conflict="sometimes")
        with pytest.raises(InvalidQueueSettingsError, match=r"worker_concurrency \(3\) cannot"):
            client.register_queue("guarded", global_concurrency=2, worker_concurrency=3)
        with pytest.raises(InvalidQueueSettingsError, match="limit"):
            client.register_queue("guarded", limiter={"limit": 0, "period": 1})
        with pytest.raises(InvalidQueueSettingsError, match="reserved"):
            client.register_queue(INTERNAL_QUEUE)
        with pytest.raises(InvalidQueueSettingsError, match=r"partition_concurrency \(5\) cannot"):
            client.register_queue("guarded", global_concurrency=4, partition_concurrency=5)
        stored = DBOS.retrieve_queue("guarded")
        assert stored is not None and (stored.concurrency, stored.limiter) == (4, None)
        assert client.retrieve_queue("never_stored") is None


def test_a_client_can_declare_a_queue_before_any_worker(tmp_path: object) -> None:
    """A client that creates the database may declare the queue; a worker that launches later
    and names it takes the client's settings."""
    url = f"sqlite:///{tmp_path}/client_first.sqlite"
    with DBOSClient(url, create=True) as client:
        client.register_queue("early", global_concurrency=2, worker_concurrency=1)
    DBOS(config={"name": "late_worker", "system_database_url": url})
    queue = Queue("early")
    DBOS.launch()
    wait_until(lambda: queue.concurrency == 2)
    assert queue.worker_concurrency == 1


def test_dbos_nb_settings_the_client_does_not_give_are_kept(launched: str) -> None:
    """DBOS's client has no `priority_enabled` or `token_limiter`: registering a queue again
    from it (always_update) leaves the ones the application declared."""
    Queue(
        "kept_extras", concurrency=5, priority_enabled=True, token_limiter={"limit": 9, "period": 6}
    )
    with DBOSClient(launched) as client:
        again = client.register_queue("kept_extras", global_concurrency=2)
        assert (again.concurrency, again.priority_enabled) == (2, True)
        assert again.token_limiter == {"limit": 9, "period": 6.0}
        given = client.register_queue("kept_extras", priority_enabled=False, token_limiter=None)
        assert (given.concurrency, given.priority_enabled, given.token_limiter) == (
            None,
            False,
            None,
        )
    stored = DBOS.retrieve_queue("kept_extras")
    assert stored is not None and (stored.priority_enabled, stored.token_limiter) == (False, None)


def test_concurrency_and_global_concurrency_are_one_setting(launched: str) -> None:
    with DBOSClient(launched) as client:
        with pytest.raises(InvalidQueueSettingsError, match="give only one of them"):
            client.register_queue("both_given", concurrency=2, global_concurrency=3)
        assert client.retrieve_queue("both_given") is None
    with pytest.raises(InvalidQueueSettingsError, match="give only one of them"):
        DBOS.register_queue("both_given", concurrency=2, global_concurrency=3)
    assert DBOS.register_queue("one_given", global_concurrency=3).concurrency == 3
    assert DBOS.register_queue("old_given", concurrency=4).concurrency == 4


def test_register_queue_on_conflict_in_a_process(launched: str) -> None:
    """DBOS.register_queue takes DBOS's `on_conflict`: its default and "always_update" store
    the settings given; "never_update" keeps a stored queue's settings."""
    with DBOSClient(launched) as client:
        client.register_queue("conflict_here", global_concurrency=7)
    kept = DBOS.register_queue("conflict_here", global_concurrency=1, on_conflict="never_update")
    assert kept.concurrency == 7
    stored = DBOS.retrieve_queue("conflict_here")
    assert stored is not None and stored.concurrency == 7
    fresh = DBOS.register_queue("conflict_new", worker_concurrency=2, on_conflict="never_update")
    assert fresh.worker_concurrency == 2
    replaced = DBOS.register_queue("conflict_here", global_concurrency=3)  # DBOS's default
    assert replaced.concurrency == 3
    stored = DBOS.retrieve_queue("conflict_here")
    assert stored is not None and stored.concurrency == 3
    with pytest.raises(InvalidQueueSettingsError, match="on_conflict must be"):
        DBOS.register_queue("conflict_here", on_conflict="sometimes")


def test_a_declaration_that_keeps_the_stored_settings_reads_them_again(launched: str) -> None:
    """This process declared the queue with its settings; a client changed them since. A
    later declaration that takes the stored settings (the name alone, or never_update) takes
    the client's, rather than storing this process's earlier ones over them."""
    Queue("changed_elsewhere", concurrency=3)
    with DBOSClient(launched) as client:
        client.register_queue("changed_elsewhere", global_concurrency=7)
    kept = DBOS.register_queue(
        "changed_elsewhere", global_concurrency=2, on_conflict="never_update"
    )
    assert kept.concurrency == 7
    assert Queue("changed_elsewhere").concurrency == 7
    stored = DBOS.retrieve_queue("changed_elsewhere")
    assert stored is not None and stored.concurrency == 7
