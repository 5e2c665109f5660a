"""Partitioned queues, as DBOS 3.4 has them: `partition_concurrency`,
`partition_worker_concurrency` and `partition_limiter` limit each partition of a queue apart
(`SetEnqueueOptions(queue_partition_key=...)`), while the queue's own limits hold for the
whole queue; a full or rate-limited partition does not hold up the others."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
import warnings
from collections import defaultdict
from pathlib import Path

import pytest
import sqlalchemy as sa

from conftest import config, max_overlap
from dbos_nb import (
    DBOS,
    BatchConflictError,
    DBOSClient,
    DbosNbError,
    InvalidQueueSettingsError,
    Queue,
    SetEnqueueOptions,
    SetWorkflowID,
)
from dbos_nb.storage.database import Database
from dbos_nb.storage.schema import SCHEMA_VERSION, schema_migrations

SPANS: dict[str, list[tuple[float, float, int]]] = defaultdict(list)
_LOCK = threading.Lock()


@DBOS.workflow(name="partitioned_task")
def task(key: str, i: int, seconds: float = 0.03) -> int:
    started = time.monotonic()
    time.sleep(seconds)
    with _LOCK:
        SPANS[key].append((started, time.monotonic(), i))
    return i


@DBOS.workflow(name="partitioned_single")
def single(key: str) -> str:
    return key


@pytest.fixture(autouse=True)
def _spans() -> None:
    SPANS.clear()


def _enqueue(queue: Queue, key: str | None, i: int, seconds: float = 0.03) -> object:
    if key is None:
        return queue.enqueue(task, "none", i, seconds)
    with SetEnqueueOptions(queue_partition_key=key):
        return queue.enqueue(task, key, i, seconds)


# -- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"partition_concurrency": 0}, "partition_concurrency must be a positive integer"),
        ({"partition_worker_concurrency": -1}, "partition_worker_concurrency must be a positive"),
        ({"partition_concurrency": True}, "partition_concurrency must be a positive integer"),
        (
            {"partition_concurrency": 2, "partition_worker_concurrency": 3},
            r"partition_worker_concurrency \(3\) cannot exceed partition_concurrency \(2\)",
        ),
        (
            {"concurrency": 2, "partition_concurrency": 3},
            r"partition_concurrency \(3\) cannot exceed concurrency \(2\)",
        ),
        (
            {"worker_concurrency": 1, "partition_worker_concurrency": 2},
            r"partition_worker_concurrency \(2\) cannot exceed worker_concurrency \(1\)",
        ),
        ({"partition_limiter": {"limit": 5}}, "partition_limiter needs exactly the keys"),
        ({"partition_limiter": {"limit": 5, "period": 0}}, r"partition_limiter\['period'\]"),
    ],
)
def test_bad_partition_settings_are_refused(settings: dict[str, object], problem: str) -> None:
    with pytest.raises(InvalidQueueSettingsError, match=problem):
        Queue("bad_partitions", **settings)  # type: ignore[arg-type]


def test_partition_settings_are_stored_and_changed_for_every_process(launched: str) -> None:
    Queue(
        "parts",
        concurrency=6,
        partition_concurrency=3,
        partition_worker_concurrency=2,
        partition_limiter={"limit": 10, "period": 2},
    )
    stored = DBOS.retrieve_queue("parts")
    assert stored is not None
    assert (stored.partition_concurrency, stored.partition_worker_concurrency) == (3, 2)
    assert stored.partition_limiter == {"limit": 10, "period": 2.0}
    with DBOSClient(launched) as client:
        seen = client.retrieve_queue("parts")
        assert seen is not None and seen.partition_concurrency == 3
        # A change is checked against the other settings as stored.
        with pytest.raises(InvalidQueueSettingsError, match="cannot exceed concurrency"):
            seen.set_partition_concurrency(7)
        seen.set_partition_concurrency(4)
        seen.set_partition_limiter(None)
    assert asyncio.run(stored.get_partition_concurrency_async()) == 4
    assert asyncio.run(stored.get_partition_limiter_async()) is None
    assert asyncio.run(stored.get_partition_worker_concurrency_async()) == 2
    # Partition limits removed: the queue is no longer partitioned, and work without a key
    # is welcome again.
    stored.set_partition_concurrency(None)
    stored.set_partition_worker_concurrency(None)
    assert Queue("parts").enqueue(task, "none", 1).get_result(timeout_sec=20) == 1
    # The client registers them too, as DBOS's client does.
    with DBOSClient(launched) as client:
        q = client.register_queue("by_client", partition_concurrency=1)
        assert q.partition_concurrency == 1
    again = DBOS.retrieve_queue("by_client")
    assert again is not None and again.partition_concurrency == 1


# -- enqueueing -------------------------------------------------------------------------------


def _rows(url: str) -> int:
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as conn:
            prefix = "dbos_nb." if url.startswith("postgresql") else ""
            return int(
                conn.execute(sa.text(f"SELECT count(*) FROM {prefix}workflow_status")).scalar_one()
            )
    finally:
        engine.dispose()


def test_partitioned_work_needs_a_key_and_no_deduplication(launched: str) -> None:
    queue = Queue("keyed", partition_concurrency=1)
    with pytest.raises(DbosNbError, match=r"queue 'keyed' is partitioned.*queue_partition_key"):
        queue.enqueue(task, "none", 0)
    with pytest.raises(DbosNbError, match=r"partitioned"):
        queue.enqueue_many(task, ["x"])
    with pytest.raises(DbosNbError, match="Deduplication is not supported for partitioned"):
        SetEnqueueOptions(queue_partition_key="a", deduplication_id="d")
    # The options and the block around them give the two apart: refused all the same,
    # before anything is written.
    options = {"queue_name": "keyed", "workflow_name": "partitioned_task"}
    with (
        SetEnqueueOptions(deduplication_id="d"),
        pytest.raises(DbosNbError, match="Deduplication is not supported"),
    ):
        DBOS.enqueue_workflow_with_options({**options, "queue_partition_key": "a"}, "a", 0)
    with pytest.raises(DbosNbError, match="queue_partition_key must be a non-empty string"):
        SetEnqueueOptions(queue_partition_key="")
    with (
        DBOSClient(launched) as client,
        pytest.raises(DbosNbError, match="Deduplication is not supported"),
    ):
        client.enqueue(
            {
                "queue_name": "keyed",
                "workflow_name": "partitioned_task",
                "queue_partition_key": "a",
                "deduplication_id": "d",
            },
            "a",
            0,
        )
    assert _rows(launched) == 0
    handle = _enqueue(queue, "tenant-7", 1)
    assert handle.get_result(timeout_sec=20) == 1  # type: ignore[attr-defined]
    status = handle.get_status()  # type: ignore[attr-defined]
    assert status.queue_partition_key == "tenant-7"
    listed = DBOS.list_workflows(queue_name="keyed")
    assert [s.queue_partition_key for s in listed] == ["tenant-7"]


def test_a_key_on_a_queue_without_partitions_is_stored_with_a_warning(launched: str) -> None:
    queue = Queue("plain_q")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = _enqueue(queue, "a", 1)
        _enqueue(queue, "b", 2)
    notes = [w for w in caught if "has no partition limits" in str(w.message)]
    assert len(notes) == 1  # once per declaration
    assert first.get_status().queue_partition_key == "a"  # type: ignore[attr-defined]


def test_work_without_a_key_runs_as_a_partition_of_its_own(launched: str) -> None:
    """A client that gives no key (DBOS would leave such work waiting for ever) enqueues into
    the partition of work without one, which the partition limits govern like any other."""
    Queue("keyless", partition_concurrency=1)
    with DBOSClient(launched) as client:
        handles = [
            client.enqueue(
                {"queue_name": "keyless", "workflow_name": "partitioned_task"}, "none", i
            )
            for i in range(4)
        ]
        assert [h.get_result(timeout_sec=20) for h in handles] == [0, 1, 2, 3]
    assert max_overlap([(s, e) for s, e, _ in SPANS["none"]]) == 1


# -- claims -----------------------------------------------------------------------------------


def test_each_partition_has_its_own_concurrency_and_the_queue_its_own(launched: str) -> None:
    queue = Queue("tenants", concurrency=5, partition_concurrency=2)
    # Tasks longer than the fallback poll, so that claims come while they run.
    handles = [_enqueue(queue, key, i, 0.12) for i in range(8) for key in ("a", "b", "c")]
    assert sorted(h.get_result(timeout_sec=60) for h in handles) == sorted(list(range(8)) * 3)  # type: ignore[attr-defined]
    everything = []
    for key in ("a", "b", "c"):
        spans = [(s, e) for s, e, _ in SPANS[key]]
        assert max_overlap(spans) == 2, key  # each partition's limit, and used
        everything += spans
    assert max_overlap(everything) == 5  # the queue's own limit, and used


def test_partition_concurrency_holds_while_the_queue_has_room(launched: str) -> None:
    queue = Queue("roomy", partition_concurrency=2)
    handles = [_enqueue(queue, key, i, 0.12) for i in range(6) for key in ("a", "b")]
    for h in handles:
        h.get_result(timeout_sec=30)  # type: ignore[attr-defined]
    for key in ("a", "b"):
        assert max_overlap([(s, e) for s, e, _ in SPANS[key]]) == 2, key


def test_a_full_partition_does_not_hold_up_the_others(launched: str) -> None:
    """Work of a partition enqueued behind a long backlog of another starts at once."""
    queue = Queue("hol", partition_concurrency=1)
    backlog = [_enqueue(queue, "busy", i, 0.05) for i in range(20)]
    late = [_enqueue(queue, "idle", i, 0.0) for i in range(3)]
    for h in late + backlog:
        h.get_result(timeout_sec=30)  # type: ignore[attr-defined]
    idle_done = max(e for _, e, _ in SPANS["idle"])
    busy_started = sorted(s for s, _, _ in SPANS["busy"])
    # "busy" runs its 20 tasks one by one (a second in all); "idle" was done with its own
    # before the sixth of them started, not after the backlog.
    assert idle_done < busy_started[5]
    # FIFO within each partition.
    assert [i for _, _, i in sorted(SPANS["busy"])] == list(range(20))
    assert [i for _, _, i in sorted(SPANS["idle"])] == [0, 1, 2]


def test_each_partition_has_its_own_rate_limit(launched: str) -> None:
    limit, period = 2, 0.6
    queue = Queue("metered", partition_limiter={"limit": limit, "period": period})
    handles = [_enqueue(queue, key, i, 0.0) for i in range(6) for key in ("x", "y")]
    for h in handles:
        h.get_result(timeout_sec=30)  # type: ignore[attr-defined]
    for key in ("x", "y"):
        starts = sorted(s for s, _, _ in SPANS[key])
        assert len(starts) == 6
        for i, s in enumerate(starts):
            in_window = sum(1 for t in starts[i:] if t < s + period)
            assert in_window <= limit, (key, starts)
        # The budget is used: 6 starts at 2 per period need 3 windows, not many more.
        assert starts[-1] - starts[0] < 3 * period + 1.0
    # The two partitions run side by side: both started in the first window.
    first = min(s for spans in SPANS.values() for s, _, _ in spans)
    assert all(min(s for s, _, _ in SPANS[k]) < first + period / 2 for k in ("x", "y"))


def test_partition_worker_concurrency_limits_one_process(launched: str) -> None:
    queue = Queue("per_worker", partition_worker_concurrency=1)
    handles = [_enqueue(queue, key, i, 0.12) for i in range(5) for key in ("a", "b", "c")]
    for h in handles:
        h.get_result(timeout_sec=30)  # type: ignore[attr-defined]
    for key in ("a", "b", "c"):
        assert max_overlap([(s, e) for s, e, _ in SPANS[key]]) == 1
    assert max_overlap([(s, e) for spans in SPANS.values() for s, e, _ in spans]) == 3


# -- upgrade ----------------------------------------------------------------------------------


def test_a_version_8_database_gains_partitions(tmp_path: Path) -> None:
    path = tmp_path / "v8.sqlite"
    url = f"sqlite:///{path}"
    DBOS(config=config(url))
    Queue("old_queue", concurrency=3)
    DBOS.launch()
    DBOS.destroy()
    conn = sqlite3.connect(path)
    conn.execute("DROP INDEX ix_ws_partition_fifo")
    conn.execute("ALTER TABLE workflow_status DROP COLUMN queue_partition_key")
    for column in (
        "partition_concurrency",
        "partition_worker_concurrency",
        "partition_rate_limit",
        "partition_rate_period_ms",
    ):
        conn.execute(f"ALTER TABLE queues DROP COLUMN {column}")
    conn.execute("ALTER TABLE queue_starts DROP COLUMN partition_key")
    conn.execute("DELETE FROM schema_migrations")
    conn.execute("INSERT INTO schema_migrations (version, applied_at) VALUES (8, 1)")
    conn.commit()
    conn.close()
    DBOS(config=config(url))
    DBOS.launch()
    stored = DBOS.retrieve_queue("old_queue")
    assert stored is not None and stored.concurrency == 3 and stored.partition_concurrency is None
    queue = Queue("new_queue", partition_concurrency=1)
    assert _enqueue(queue, "k", 5).get_result(timeout_sec=20) == 5  # type: ignore[attr-defined]
    db = Database(url)
    try:
        with db.read() as c:
            versions = sorted(c.execute(sa.select(schema_migrations.c.version)).scalars())
    finally:
        db.dispose()
    assert versions == list(range(8, SCHEMA_VERSION + 1)) and SCHEMA_VERSION == 9


def test_enqueue_many_puts_a_whole_batch_in_one_partition(launched: str) -> None:
    queue = Queue("batched_parts", partition_concurrency=1)
    with SetEnqueueOptions(queue_partition_key="p"):
        handles = queue.enqueue_many(task, [("p", i, 0.02) for i in range(6)], unpack=True)
    assert [h.get_result(timeout_sec=20) for h in handles] == list(range(6))
    assert {h.get_status().queue_partition_key for h in handles} == {"p"}
    assert max_overlap([(s, e) for s, e, _ in SPANS["p"]]) == 1


def test_map_needs_a_key_and_keeps_a_batch_in_its_partition(launched: str) -> None:
    queue = Queue("mapped_parts", partition_concurrency=1)
    with pytest.raises(DbosNbError, match="is partitioned"):
        queue.map(single, ["x"], batch="nokey")
    with SetEnqueueOptions(queue_partition_key="tenantA"):
        first = queue.map(single, ["tenantA"], batch="docs")
    first.wait()
    # The same items for another tenant would only attach to tenantA's batch.
    with (
        SetEnqueueOptions(queue_partition_key="tenantB"),
        pytest.raises(BatchConflictError, match=r"partition 'tenantA'.*'tenantB'"),
    ):
        queue.map(single, ["tenantA"], batch="docs")
    with SetEnqueueOptions(queue_partition_key="tenantA"):
        assert queue.map(single, ["tenantA"], batch="docs").id == "docs"  # attaches


def test_a_queue_partitioned_elsewhere_is_judged_by_its_stored_settings(launched: str) -> None:
    queue = Queue("changed_elsewhere")
    with DBOSClient(launched) as client:
        stored = client.retrieve_queue("changed_elsewhere")
        assert stored is not None
        stored.set_partition_concurrency(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "has no partition limits" warning
        handle = _enqueue(queue, "k", 3)
    assert handle.get_result(timeout_sec=20) == 3  # type: ignore[attr-defined]
    # (Work without a key is not refused here, where this process sees no partitions: the
    # check would cost a read per enqueue. It runs as the partition of keyless work.)


def test_nul_characters_are_refused_before_anything_is_written(launched: str) -> None:
    with pytest.raises(DbosNbError, match="NUL"):
        SetEnqueueOptions(queue_partition_key="a\x00b")
    queue = Queue("nul_q")
    with pytest.raises(DbosNbError, match="NUL"), SetWorkflowID("w\x00x"):
        queue.enqueue(task, "none", 1)
    assert _rows(launched) == 0


def test_a_partitioned_queue_shows_its_partition_limits() -> None:
    queue = Queue("shown", partition_concurrency=2, partition_limiter={"limit": 5, "period": 60})
    assert "partition_concurrency=2" in repr(queue)
    assert "partition_limiter={'limit': 5, 'period': 60.0}" in repr(queue)
    assert "partition" not in repr(Queue("plain_shown", concurrency=1))
