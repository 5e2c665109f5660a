"""Sessions lost to PostgreSQL (a server restart, a failover, `pg_terminate_backend`) while
workflows run: checkpoints are retried on new connections, so no workflow records the lost
connection as its outcome or is left PENDING, and clients read on (PostgreSQL only: a SQLite
file has no sessions to lose)."""

from __future__ import annotations

import os
import socket
import stat
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy.engine import make_url

from conftest import config, create_pg_database, drop_pg_database, libpq_dsn, wait_until
from dbos_nb import DBOS, DBOSClient, Queue, SetWorkflowID, WorkflowPreempted


@pytest.fixture
def pg_url(pg_server_url: str) -> Iterator[str]:
    url = create_pg_database(pg_server_url)
    try:
        yield url
    finally:
        DBOS.destroy()
        drop_pg_database(pg_server_url, url)


def _admin(url: str) -> psycopg.Connection[Any]:
    """A connection to the server's `postgres` database, beside the test's database."""
    return psycopg.connect(libpq_dsn(url).rsplit("/", 1)[0] + "/postgres", autocommit=True)


def _end_every_session(url: str) -> int:
    """End every session of the database, as a server restart would."""
    with _admin(url) as admin:
        ended = admin.execute(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = %s",
            (make_url(url).database,),
        ).fetchone()
    return int(ended[0]) if ended else 0


def test_workflows_ride_out_lost_sessions(pg_url: str) -> None:
    gate = threading.Event()
    calls: list[int] = []

    @DBOS.step(name="rideout_work")
    def work(x: int) -> int:
        calls.append(x)
        gate.wait(20)
        return x * 2

    @DBOS.step(name="rideout_after")
    def after(x: int) -> int:
        return x + 1

    @DBOS.workflow(name="rideout_wf")
    def flow(x: int) -> int:
        return after(work(x))

    DBOS(config=config(pg_url))
    DBOS.launch()
    handles = [Queue("rideout_q").enqueue(flow, i) for i in range(4)]
    wait_until(lambda: len(calls) == 4)
    assert _end_every_session(pg_url) > 0  # the pool's, the listener's, the hot path's
    gate.set()
    assert [h.get_result(timeout_sec=30) for h in handles] == [1, 3, 5, 7]
    assert sorted(calls) == [0, 1, 2, 3]  # no step ran again
    statuses = {w.status for w in DBOS.list_workflows(name="rideout_wf")}
    assert statuses == {"SUCCESS"}

    # A client whose idle connection the server ended reads on.
    with DBOSClient(pg_url) as client:
        assert client.retrieve_workflow(handles[0].workflow_id).get_result() == 1
        _end_every_session(pg_url)
        assert client.retrieve_workflow(handles[1].workflow_id).get_result() == 3
        status = client.get_workflow_status(handles[2].workflow_id)
        assert status is not None and status.output == 5


def _allow_connections(url: str, allowed: bool) -> None:
    with _admin(url) as admin:
        admin.execute(
            f'ALTER DATABASE "{make_url(url).database}" ALLOW_CONNECTIONS {str(allowed).lower()}'
        )


def test_an_outage_longer_than_the_retries_hands_the_workflow_back(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database refuses every connection for longer than checkpoints are retried: the lost
    checkpoint is not the workflow's outcome. Once the database answers again, the workflow
    goes back to its queue and runs again from its last completed step (only the step whose
    record was lost runs again)."""
    from dbos_nb.core.runtime import get_runtime
    from dbos_nb.storage import reconnect

    monkeypatch.setattr(reconnect, "RECONNECT_WINDOW_SEC", 0.2)
    gate = threading.Event()
    calls: list[str] = []

    @DBOS.step(name="handed_first")
    def first(x: int) -> int:
        calls.append("first")
        return x

    @DBOS.step(name="handed_work")
    def work(x: int) -> int:
        calls.append("work")
        gate.wait(20)
        return x * 2

    @DBOS.workflow(name="handed_wf")
    def flow(x: int) -> int:
        return work(first(x))

    DBOS(config=config(pg_url))
    DBOS.launch()
    handle = Queue("handed_q").enqueue(flow, 5)
    wait_until(lambda: "work" in calls)
    _allow_connections(pg_url, False)
    try:
        _end_every_session(pg_url)
        gate.set()
        rt = get_runtime()
        wait_until(lambda: handle.workflow_id not in rt.running_ids())  # gave up, unrecorded
    finally:
        _allow_connections(pg_url, True)
    with DBOSClient(pg_url) as client:
        assert client.retrieve_workflow(handle.workflow_id).get_result() == 10
        status = client.get_workflow_status(handle.workflow_id)
    assert calls == ["first", "work", "work"]
    assert status is not None and status.status == "SUCCESS" and status.queue_name == "handed_q"


def test_a_direct_caller_learns_that_the_outage_stopped_its_workflow(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Called directly, a workflow whose checkpoint cannot reach the database tells its caller
    so (it is not failed), and runs to its end in the background once the database is back."""
    from dbos_nb.storage import reconnect

    monkeypatch.setattr(reconnect, "RECONNECT_WINDOW_SEC", 0.2)
    gate = threading.Event()
    calls: list[int] = []

    @DBOS.step(name="direct_lost_step")
    def work(x: int) -> int:
        calls.append(x)
        gate.wait(20)
        return x * 3

    @DBOS.workflow(name="direct_lost_wf")
    def flow(x: int) -> int:
        return work(x)

    DBOS(config=config(pg_url))
    DBOS.launch()
    outcome: list[BaseException | int] = []

    def call() -> None:
        try:
            with SetWorkflowID("direct-lost"):
                outcome.append(flow(4))
        except BaseException as exc:
            outcome.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    wait_until(lambda: calls == [4])
    _allow_connections(pg_url, False)
    try:
        _end_every_session(pg_url)
        gate.set()
        caller.join(20)
    finally:
        _allow_connections(pg_url, True)
    (stopped,) = outcome
    assert isinstance(stopped, WorkflowPreempted) and "system database" in str(stopped)
    with DBOSClient(pg_url) as client:
        assert client.retrieve_workflow("direct-lost").get_result() == 12
    assert calls == [4, 4]


def test_a_direct_start_run_again_after_its_commit_is_recognised(pg_url: str) -> None:
    """An enqueue that starts its workflow at once, retried after a lost reply although its
    first attempt had committed, finds its own row (the owner token it drew) and runs it; a
    row of another owner under the same id is left alone."""
    from dataclasses import replace

    from dbos_nb.core.runtime import get_runtime
    from dbos_nb.storage.rows import NewWorkflow

    DBOS(config=config(pg_url))
    DBOS.launch()
    Queue("direct_again_q")
    store = get_runtime().store
    row = NewWorkflow(
        workflow_id="direct-again",
        name="direct_again_wf",
        inputs=b"",
        status="PENDING",
        created_at=1,
        owner_xid="token-1",
        queue_name="direct_again_q",
    )
    assert store.insert_started_if_unshared(row, 1)
    assert store.insert_started_if_unshared(row, 1)  # the same write, run again
    assert not store.insert_started_if_unshared(replace(row, owner_xid="token-2"), 1)
    written = store.get_workflow("direct-again")
    assert written is not None and written["owner_xid"] == "token-1"


def _sockets_to_database(url: str) -> list[socket.socket]:
    """This process's TCP connections to the test's database (each fd duplicated): the
    sockets whose local port the server lists for a session of that database."""
    with _admin(url) as admin:
        rows = admin.execute(
            "SELECT client_port FROM pg_stat_activity WHERE datname = %s",
            (make_url(url).database,),
        ).fetchall()
    ports = {row[0] for row in rows}
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if not stat.S_ISSOCK(os.fstat(int(name)).st_mode):
                continue
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue  # closed meanwhile (the listing's own descriptor, say)
        try:
            inet = sock.family in (socket.AF_INET, socket.AF_INET6)
            if inet and sock.getsockname()[1] in ports:
                found.append(sock)
                continue
        except OSError:
            pass
        sock.close()
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and TCP_* options")
@pytest.mark.parametrize("given", [None, 45], ids=["default", "from-url"])
def test_every_connection_gives_up_on_a_silent_server_within_a_minute(
    pg_url: str, given: int | None
) -> None:
    """A statement waits for its answer in one blocking libpq call, which an interrupt does
    not cut short: each connection (the pools', the hot path's, the listener's, a client's)
    has TCP keepalives and a user timeout that end it after about a minute of a vanished
    host's silence, or the URL's own setting."""
    url = pg_url
    if given is not None:
        url = make_url(pg_url).update_query_dict({"keepalives_idle": str(given)})
        url = url.render_as_string(hide_password=False)
    DBOS(config=config(url))

    @DBOS.workflow(name="keepalive_wf")
    def wf(x: int) -> int:
        return x + 1

    DBOS.launch()
    queue = Queue("keepalive_q")
    client = DBOSClient(url)
    sockets: list[socket.socket] = []
    try:
        assert queue.enqueue(wf, 1).get_result() == 2
        assert client.retrieve_workflow(queue.enqueue(wf, 2).workflow_id).get_result() == 3
        sockets = _sockets_to_database(pg_url)
        assert len(sockets) >= 4  # at least a pool's, the hot path's, the listener's, the client's
        for sock in sockets:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == (given or 30)
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 10
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 60_000
    finally:
        client.destroy()
        for sock in sockets:
            sock.close()


def test_a_cancel_sent_while_the_listener_reconnects_still_stops_the_workflow(
    pg_url: str,
) -> None:
    """The cancel's notification is lost while this process's listening session is away; the
    process looks for it itself (as on SQLite) until it listens again, and then once more. It
    heard nothing, and the cancelled workflow ran all its steps."""
    steps_run: list[int] = []

    @DBOS.step(name="relisten_step")
    def step(i: int) -> int:
        steps_run.append(i)
        time.sleep(0.04)
        return i

    @DBOS.workflow(name="relisten_wf")
    def long_flow(n: int) -> int:
        return sum(step(i) for i in range(n))

    DBOS(config=config(pg_url))
    DBOS.launch()
    handle = Queue("relisten_q").enqueue(long_flow, 100)
    wait_until(lambda: len(steps_run) >= 3)
    with _admin(pg_url) as admin:
        ended = admin.execute(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = %s AND query LIKE 'LISTEN%%'",
            (make_url(pg_url).database,),
        ).fetchone()
    assert ended is not None and ended[0] == 1
    with DBOSClient(pg_url) as client:
        client.cancel_workflow(handle.workflow_id)
    at_cancel = len(steps_run)
    time.sleep(1.0)
    settled = len(steps_run)
    time.sleep(0.5)
    assert len(steps_run) == settled  # stopped
    assert settled - at_cancel <= 5  # within a sweep or two of the cancel, not 100 steps
    assert handle.get_status().status == "CANCELLED"
