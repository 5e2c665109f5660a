"""The DBOS queue tutorial's examples (examples/*.py) run as written, on SQLite and PostgreSQL.

Each example runs as a script in a subprocess against a fresh database (`db_url`); the tests check
what it prints and what it left in the database: results, order, counts, concurrency, start times,
statuses. The FastAPI example is also driven in this process with FastAPI's TestClient.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from conftest import max_overlap
from dbos_nb import DBOSClient, UnknownQueueError, UnknownWorkflowNameError
from dbos_nb.storage.store import SystemStore

EXAMPLES = Path(__file__).parent.parent / "examples"


def run_example(
    name: str, db_url: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> str:
    """Run examples/<name> with DBOS_DATABASE_URL=db_url; return its stdout (it must succeed)."""
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "DBOS_DATABASE_URL": db_url, **(env or {})},
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture
def client(db_url: str) -> Iterator[DBOSClient]:
    """A client on the example's database, to check what the example left there."""
    with DBOSClient(db_url, create=True) as c:  # before the example's first launch
        yield c


# -- Queue Example ---------------------------------------------------------------------------------


def test_queue_example(db_url: str, client: DBOSClient) -> None:
    out = run_example("queue_example.py", db_url, "8").splitlines()
    assert out[0] == "single task: task first done"
    assert out[1:9] == [f"task {i} done" for i in range(8)]  # results in the order of the tasks
    m = re.fullmatch(r"8 tasks in [\d.]+ s, at most (\d+) at once", out[9])
    assert m is not None, out
    assert int(m.group(1)) > 1  # "so all tasks are processed concurrently"

    (parent,) = client.list_workflows(name="process_tasks")
    assert parent.status == "SUCCESS"
    assert parent.output == [f"task {i} done" for i in range(8)]
    tasks = client.list_workflows(queue_name="example_queue")
    assert len(tasks) == 9 and all(t.status == "SUCCESS" for t in tasks)
    children = [t for t in tasks if t.parent_workflow_id == parent.workflow_id]
    assert sorted(t.output for t in children) == sorted(f"task {i} done" for i in range(8))
    # Started in first-in, first-out order.
    by_enqueue = sorted(children, key=lambda t: t.created_at or 0)
    assert [t.output for t in by_enqueue] == [f"task {i} done" for i in range(8)]
    starts = [t.dequeued_at or 0 for t in by_enqueue]
    assert starts == sorted(starts)


# -- Managing Concurrency --------------------------------------------------------------------------


def test_queue_concurrency(db_url: str, client: DBOSClient) -> None:
    out = run_example("queue_concurrency.py", db_url, "15").splitlines()
    assert out[0] == f"results: {[i * i for i in range(15)]}"
    m = re.fullmatch(r"15 tasks in ([\d.]+) s, at most (\d+) at once", out[1])
    assert m is not None, out
    assert int(m.group(2)) == 5  # worker_concurrency=5 in one process, and it is reached
    assert float(m.group(1)) >= 3 * 0.1 - 0.01  # 15 tasks of 0.1 s, 5 at a time

    stored = SystemStore(client._db).get_queue("example_queue")
    assert stored is not None
    assert (stored.concurrency, stored.worker_concurrency) == (10, 5)
    tasks = client.list_workflows(queue_name="example_queue")
    assert len(tasks) == 15 and all(t.status == "SUCCESS" for t in tasks)
    # What the database saw agrees. A task's end time is read just before its row is updated,
    # and the claim that takes its slot may read its start time a moment earlier: recorded times
    # can overlap by a millisecond or two, where a sixth task at once would overlap by ~100 ms.
    intervals = [(t.dequeued_at or 0, t.updated_at or 0) for t in tasks]
    assert max_overlap(intervals, slack=10) == 5


# -- Rate Limiting ---------------------------------------------------------------------------------

_STARTED = re.compile(r"task (\d+) started at \+([\d.]+) s")


def _start_offsets(out: str) -> dict[int, float]:
    return {int(m.group(1)): float(m.group(2)) for m in _STARTED.finditer(out)}


def test_rate_limit_as_in_the_tutorial(db_url: str, client: DBOSClient) -> None:
    out = run_example("queue_rate_limit.py", db_url)
    assert "limiter: {'limit': 50, 'period': 30.0}" in out
    starts = _start_offsets(out)
    assert sorted(starts) == list(range(5))
    assert max(starts.values()) < 5  # 5 tasks are well within 50 per 30 s: nothing waits
    stored = SystemStore(client._db).get_queue("example_queue")
    assert stored is not None and (stored.limit, stored.period_ms) == (50, 30_000)


def test_rate_limit_holds_back_the_51st(db_url: str) -> None:
    period = 0.5
    out = run_example(
        "queue_rate_limit.py", db_url, "60", env={"EXAMPLE_LIMITER_PERIOD": str(period)}
    )
    assert f"limiter: {{'limit': 50, 'period': {period}}}" in out
    starts = _start_offsets(out)
    assert sorted(starts) == list(range(60))
    times = sorted(starts.values())
    # At most 50 starts in any window of one period (a little slack for the time a task takes
    # from its recorded start to its first line).
    assert all(times[i + 50] - times[i] >= period - 0.05 for i in range(len(times) - 50))
    # ... and the limiter is not stricter than that: all 60 start in about two periods.
    assert times[-1] - times[0] < 4 * period


# -- Setting Timeouts ------------------------------------------------------------------------------


def test_workflow_timeout(db_url: str, client: DBOSClient) -> None:
    out = run_example("workflow_timeout.py", db_url).splitlines()
    assert out[0] == "example_workflow: SUCCESS, result None, timeout 10000 ms"
    m = re.fullmatch(
        r"expired: CANCELLED, result DBOSWorkflowTimedOutError, (\d+) of 20 steps ran", out[1]
    )
    assert m is not None, out
    assert 1 <= int(m.group(1)) <= 10  # 0.05 s steps, 0.3 s timeout: stopped early
    m = re.fullmatch(r"queued (\d+) ms then ran: SUCCESS, result 'finished'", out[2])
    assert m is not None, out
    assert int(m.group(1)) > 300  # it waited longer than its timeout, yet it was not cancelled

    (wf,) = client.list_workflows(name="example_workflow")
    assert wf.queue_name == "example-queue" and wf.status == "SUCCESS"
    assert wf.workflow_timeout_ms == 10_000
    # Start-to-completion: the deadline counts from the dequeue, not from the enqueue.
    assert wf.dequeued_at is not None and wf.workflow_deadline_epoch_ms is not None
    assert wf.workflow_deadline_epoch_ms - wf.dequeued_at == 10_000
    statuses = sorted(w.status for w in client.list_workflows(name="slow_workflow"))
    assert statuses == ["CANCELLED", "SUCCESS", "SUCCESS"]


# -- In-Order Processing (FastAPI) -----------------------------------------------------------------


def test_in_order_events_script(tmp_path: Path) -> None:
    # On SQLite only: the TestClient test below runs the same app on both backends.
    events = [f"event{i}" for i in range(8)]
    db_url = f"sqlite:///{tmp_path / 'events.sqlite'}"
    out = run_example("in_order_events.py", db_url, *events).splitlines()
    assert out == [
        f"posted:    {' '.join(events)}",
        f"processed: {' '.join(events)}",
        "at most 1 at once",
    ]


def _import_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{Path(name).stem}", EXAMPLES / name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_in_order_events_with_testclient(
    db_url: str, client: DBOSClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi.testclient import TestClient

    monkeypatch.setenv("DBOS_DATABASE_URL", db_url)
    app: Any = _import_example("in_order_events.py")
    events = [f"e{i}" for i in range(10)]
    with TestClient(app.app) as http:  # startup launches DBOS
        for event in events:
            response = http.post(f"/events/{event}")
            assert response.status_code == 200, response.text
        app.wait_until_processed(len(events))
    # shutdown destroyed DBOS; what was processed, and how, is in the module and the database
    assert app.processed == events
    assert app.max_running == 1
    done = sorted(client.list_workflows(queue_name="in_order_queue"), key=lambda w: w.created_at)
    assert [w.input for w in done] == [{"args": (e,), "kwargs": {}} for e in events]
    assert all(w.status == "SUCCESS" for w in done)
    for before, after in itertools.pairwise(done):  # one at a time, in order
        assert before.updated_at is not None and after.dequeued_at is not None
        assert after.dequeued_at >= before.updated_at


# -- Enqueue with DBOSClient -----------------------------------------------------------------------

_DONE_BY_APP = re.compile(r"task (\d+) done by the application \(workflow ([\w-]+)\)")


def test_client_enqueue(db_url: str, client: DBOSClient) -> None:
    out = run_example("client_enqueue.py", db_url)
    m = _DONE_BY_APP.fullmatch(out.strip())
    assert m is not None, out
    assert m.group(1) == "7"
    wf = client.get_workflow_status(m.group(2))
    assert wf is not None and wf.status == "SUCCESS"
    # The tutorial's swapped names, declared so by the application.
    assert (wf.queue_name, wf.name) == ("process_task", "example_queue")
    assert wf.input == {"args": (7,), "kwargs": {}}

    # Names that no process declared are refused at once rather than enqueued for nobody.
    with pytest.raises(UnknownQueueError):  # the names the tutorial meant, unswapped
        client.enqueue({"queue_name": "example_queue", "workflow_name": "process_task"}, 1)
    with pytest.raises(UnknownWorkflowNameError):
        client.enqueue({"queue_name": "process_task", "workflow_name": "process_task"}, 1)
    assert len(client.list_workflows()) == 1


def test_client_enqueue_from_other_processes(db_url: str) -> None:
    app = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "client_enqueue.py"), "app", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "DBOS_DATABASE_URL": db_url},
    )
    try:
        assert app.stdout is not None
        assert app.stdout.readline().strip() == "application ready"
        # A client process that has none of the application's code.
        out = run_example("client_enqueue.py", db_url, "client", "21")
        m = _DONE_BY_APP.fullmatch(out.strip())
        assert m is not None and m.group(1) == "21", out
        # And this test process as a client too, with the tutorial's options.
        with DBOSClient(db_url) as c:
            options: Any = {"queue_name": "process_task", "workflow_name": "example_queue"}
            handles = [c.enqueue(options, task) for task in (1, 2, 3)]
            results = [h.get_result(timeout_sec=30) for h in handles]
            assert [r.split(" done")[0] for r in results] == ["task 1", "task 2", "task 3"]
            assert {w.executor_id for w in c.list_workflows()} == {"local"}
    finally:
        app.send_signal(signal.SIGINT)  # the example stops on Ctrl-C and destroys DBOS
        started = time.monotonic()
        try:
            _, err = app.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            app.kill()
            raise
    assert app.returncode == 0, err
    assert time.monotonic() - started < 15


# -- Partitioning Queues ---------------------------------------------------------------------------


def test_partitioned_queue(db_url: str, client: DBOSClient) -> None:
    out = run_example("partitioned_queue.py", db_url, "4").splitlines()
    assert out[0] == "12 tasks done"
    assert out[1:4] == [f"{user}: at most 1 at once" for user in ("alice", "bob", "carol")]
    assert out[4] == "all users: at most 3 at once"  # the users' tasks ran side by side
    tasks = client.list_workflows(queue_name="per_user_queue")
    assert len(tasks) == 12 and all(t.status == "SUCCESS" for t in tasks)
    assert sorted({t.queue_partition_key for t in tasks}) == ["alice", "bob", "carol"]
