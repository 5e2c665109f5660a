"""The notification listener (PostgreSQL): finishes are heard only while something waits, and a
finish wakes other processes' schedulers only for a queue with a global concurrency limit.

"Another process" is a second `Database`: its own origin, so its notifications are not dropped
as this process's own. Whether a notification was *not* delivered is decided with a marker
sent after it on the always-heard channel: one listening session receives notifications in
commit order, so once the marker is heard, anything sent before it would have been too.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import cast

import pytest

from conftest import create_pg_database, drop_pg_database, insert_pending, wait_until
from dbos_nb import serialization
from dbos_nb.core.runtime import get_runtime
from dbos_nb.core.scheduler import Scheduler
from dbos_nb.models import QueueSettings
from dbos_nb.storage.database import Database
from dbos_nb.storage.listener import Listener
from dbos_nb.storage.migrations import migrate
from dbos_nb.storage.store import SystemStore


@pytest.fixture
def pg_url(pg_server_url: str) -> Iterator[str]:
    url = create_pg_database(pg_server_url)
    db = Database(url)
    migrate(db)
    db.dispose()
    yield url
    drop_pg_database(pg_server_url, url)


@contextmanager
def _listening(listener: Listener) -> Iterator[None]:
    stop = threading.Event()
    thread = threading.Thread(target=listener.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)


class _Other:
    """Another process's store: it writes workflows, finishes them and sends markers."""

    def __init__(self, url: str) -> None:
        self.db = Database(url)
        self.store = SystemStore(self.db)

    def pending(self, queue_name: str | None = None) -> str:
        wid = f"lst-{uuid.uuid4().hex[:12]}"
        insert_pending(self.store, wid, "owner", queue_name)
        return wid

    def finish(self, wid: str) -> None:
        output = serialization.dumps("finished elsewhere")
        assert self.store.finish_workflow(wid, "owner", "SUCCESS", output, None, 5)[0]

    def marker(self, heard: list[str], kind: str = "q:") -> None:
        """Send a marker on the always-heard channel until `heard` holds it (the first ones
        may go out before the listener's LISTEN): `q:<marker>` is heard as itself, and a
        `done:<marker>` (what a cancel sends) reaches the engine's waiters as `<marker>`."""
        marker = f"marker-{uuid.uuid4().hex[:8]}"
        text = kind + marker

        def sent_and_heard() -> bool:
            with self.db.write() as conn:
                self.db.notify(conn, text)
            time.sleep(0.05)
            return (text if kind == "q:" else marker) in heard

        wait_until(sent_and_heard)


def test_finishes_are_heard_only_while_something_waits(pg_url: str) -> None:
    heard: list[str] = []
    wanted = False
    subscribed = threading.Event()
    listener = Listener(
        Database(pg_url),
        heard.append,
        wants_dones=lambda: wanted,
        on_dones_heard=subscribed.set,
        linger_sec=0.05,
    )
    other = _Other(pg_url)
    try:
        with _listening(listener):
            other.marker(heard)  # listening on the events channel
            nobody = other.pending()
            other.finish(nobody)
            other.marker(heard)
            assert f"done:{nobody}" not in heard
            assert not listener.hears_dones

            wanted = True
            listener.want_dones()
            wait_until(subscribed.is_set)  # the waiters are told to look again once it listens
            assert listener.hears_dones
            awaited = other.pending()
            other.finish(awaited)
            wait_until(lambda: f"done:{awaited}" in heard)

            wanted = False
            wait_until(lambda: not listener.hears_dones)  # after its linger
            later = other.pending()
            other.finish(later)
            other.marker(heard)
            assert f"done:{later}" not in heard
    finally:
        other.db.dispose()
        listener._db.dispose()


@pytest.mark.parametrize(
    ("settings", "wakes"),
    [
        (QueueSettings("lst-global", concurrency=3), True),
        (QueueSettings("lst-local", worker_concurrency=3), False),
        (QueueSettings("lst-free"), False),
        (None, False),  # a queue no process declared
    ],
    ids=["concurrency", "worker-concurrency", "no-limits", "undeclared"],
)
def test_a_finish_wakes_other_schedulers_only_for_a_global_concurrency_limit(
    pg_url: str, settings: QueueSettings | None, wakes: bool
) -> None:
    """Only a global limit can keep another process's scheduler waiting for a slot; its own
    `worker_concurrency` slots are freed by its own finishes, which wake it directly."""
    heard: list[str] = []
    listener = Listener(Database(pg_url), heard.append)
    other = _Other(pg_url)
    queue = settings.name if settings is not None else "lst-undeclared"
    if settings is not None:
        other.store.upsert_queue(settings, 1)
    try:
        with _listening(listener):
            other.marker(heard)
            wid = other.pending(queue)
            other.finish(wid)
            wait_until(lambda: f"done:{wid}" in heard)  # heard on the dones channel
            other.marker(heard)
            assert (f"q:{queue}" in heard) == wakes
    finally:
        other.db.dispose()
        listener._db.dispose()


def test_a_waiting_handle_is_woken_by_another_process_finish(launched_pg: str) -> None:
    """Wired into the engine: while a handle waits, the process hears other processes'
    finishes and hands them to its waiters; while nothing waits, it does not hear them."""
    rt = get_runtime()
    listener = cast(Scheduler, rt.direct).listener
    assert listener is not None
    woken: list[str] = []
    notify: Callable[[str], None] = rt.waiters.notify

    def spy(workflow_id: str) -> None:
        woken.append(workflow_id)
        notify(workflow_id)

    rt.waiters.notify = spy  # type: ignore[method-assign]
    other = _Other(launched_pg)
    try:
        other.marker(woken, kind="done:")  # the engine's listener is listening
        idle = other.pending()
        other.finish(idle)
        other.marker(woken, kind="done:")
        assert idle not in woken  # finished while nothing waited: not heard
        awaited = other.pending()
        result: list[object] = []
        waiter = threading.Thread(
            target=lambda: result.append(
                rt.wait_result(awaited, polling_interval_sec=3600, timeout_sec=60)
            )
        )
        waiter.start()
        wait_until(lambda: listener.hears_dones)
        other.finish(awaited)
        waiter.join(30)
        assert result == ["finished elsewhere"]
        # The notification reaches the waiters; the waiter itself may have returned just before
        # it, woken by the read-again that follows the LISTEN (if the finish came in between).
        wait_until(lambda: awaited in woken)
    finally:
        rt.waiters.notify = notify  # type: ignore[method-assign]
        other.db.dispose()


def test_a_usage_report_wakes_other_schedulers(pg_url: str) -> None:
    """Tokens reported below a workflow's estimate free budget in its queue's token window:
    other processes' schedulers, stopped by that window, are woken to claim again (a finish
    no longer wakes them for a queue without a global concurrency limit)."""
    heard: list[str] = []
    listener = Listener(Database(pg_url), heard.append)
    other = _Other(pg_url)
    other.store.upsert_queue(
        QueueSettings("lst-tokens", token_limit=1000, token_period_ms=60_000), 1
    )
    try:
        with _listening(listener):
            other.marker(heard)
            wid = other.pending("lst-tokens")
            other.store.report_usage(wid, 10, None, replace_estimate=True)
            other.marker(heard)
            assert "q:lst-tokens" in heard
    finally:
        other.db.dispose()
        listener._db.dispose()


def test_a_failing_handler_does_not_end_the_listener(pg_url: str) -> None:
    """The engine's handler reads the database for some notifications; if that read fails (the
    database away), the listener goes on and hears the next ones."""
    heard: list[str] = []

    def handle(message: str) -> None:
        if message.startswith("q:fail"):
            raise RuntimeError("the database went away")
        heard.append(message)

    listener = Listener(Database(pg_url), handle)
    other = _Other(pg_url)
    try:
        with _listening(listener):
            other.marker(heard)
            with other.db.write() as conn:
                other.db.notify(conn, "q:fail-once")
            other.marker(heard)  # heard after the failure
    finally:
        other.db.dispose()
        listener._db.dispose()


def test_a_cancel_wakes_other_schedulers_of_its_queue(pg_url: str) -> None:
    """Cancelling a running workflow frees a slot of its queue: other processes' schedulers,
    which may wait for it, hear of the queue as well as of the workflow."""
    heard: list[str] = []
    listener = Listener(Database(pg_url), heard.append)
    other = _Other(pg_url)
    other.store.upsert_queue(QueueSettings("lst-cancel", concurrency=1), 1)
    try:
        with _listening(listener):
            other.marker(heard)
            wid = other.pending("lst-cancel")
            assert other.store.cancel_workflows([wid], 5, cancel_children=False) == [wid]
            other.marker(heard)
            assert f"done:{wid}" in heard and "q:lst-cancel" in heard
    finally:
        other.db.dispose()
        listener._db.dispose()
