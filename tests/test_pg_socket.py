"""PostgreSQL through its Unix socket: a URL whose `host` is the socket directory works throughout.

A server on the same machine is reached faster through its socket than through TCP on loopback
(README, "Speed"); these tests make sure that every connection dbos_nb opens honours such a URL:
the pool, the hot path's driver connections, the notification listener and DBOSClient.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy.engine import make_url

from conftest import config, create_pg_database, drop_pg_database, libpq_dsn, wait_until
from dbos_nb import DBOS, DBOSClient, EnqueueOptions, Queue


def _socket_url(tcp_url: str) -> str:
    """The same database, addressed through the server's Unix socket (`?host=<dir>&port=`)."""
    with psycopg.connect(libpq_dsn(tcp_url)) as conn:
        directories = conn.execute("SHOW unix_socket_directories").fetchone()
        port = conn.execute("SHOW port").fetchone()
    assert directories and directories[0], "the test server listens on no Unix socket"
    assert port is not None
    directory = str(directories[0]).split(",")[0].strip()
    url = make_url(tcp_url).set(host=None, port=None, query={"host": directory, "port": port[0]})
    return url.render_as_string(hide_password=False)


@pytest.fixture
def socket_url(pg_server_url: str) -> Iterator[str]:
    tcp_url = create_pg_database(pg_server_url)
    try:
        yield _socket_url(tcp_url)
    finally:
        DBOS.destroy()
        drop_pg_database(pg_server_url, tcp_url)


@DBOS.workflow(name="socket_square")
def socket_square(x: int) -> int:
    return socket_step(x)


@DBOS.step(name="socket_step")
def socket_step(x: int) -> int:
    return x * x


def test_the_url_really_goes_through_the_socket(socket_url: str) -> None:
    with psycopg.connect(libpq_dsn(socket_url)) as conn:
        # A Unix-socket session has no client address.
        assert conn.execute("SELECT inet_client_addr()").fetchone() == (None,)
        assert conn.info.host.startswith("/")


def test_queued_workflows_run_over_the_socket(socket_url: str) -> None:
    DBOS(config=config(socket_url))
    DBOS.launch()
    queue = Queue("socket_q")
    handles = [queue.enqueue(socket_square, i) for i in range(20)]
    assert [h.get_result(timeout_sec=20) for h in handles] == [i * i for i in range(20)]
    steps = DBOS.list_workflow_steps(handles[3].workflow_id)
    assert [(s.function_name, s.output) for s in steps] == [("socket_step", 9)]


def test_another_process_wakes_the_worker_over_the_socket(socket_url: str) -> None:
    """With a 30 s fallback poll, work a client enqueues only starts at once if the worker's
    listener, connected through the socket, receives the client's notification."""
    DBOS(config=config(socket_url, polling_interval_sec=30))
    DBOS.launch()
    Queue("socket_wake_q")
    time.sleep(0.3)  # the first poll is behind us: the next one is 30 s away
    client = DBOSClient(socket_url)
    try:
        wid = f"socket-{uuid.uuid4().hex[:8]}"
        handle = client.enqueue(
            EnqueueOptions(
                queue_name="socket_wake_q", workflow_name="socket_square", workflow_id=wid
            ),
            7,
        )
        wait_until(lambda: handle.get_status().status == "SUCCESS")
        assert handle.get_result() == 49
    finally:
        client.destroy()
