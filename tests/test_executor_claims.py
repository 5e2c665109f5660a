"""Claiming an executor id: a process takes a dead holder's id only if the row is still the one
it judged, so two processes launching with the same id at the same moment cannot both hold it
(each would put the other's running work back in the queues at every heartbeat)."""

from __future__ import annotations

import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import config, wait_until
from dbos_nb import DBOS, DBOSExecutorIdInUseError
from dbos_nb.clock import ManualClock
from dbos_nb.core.runtime import get_runtime
from dbos_nb.storage.database import Database
from dbos_nb.storage.store import SystemStore

T0 = 1_000_000


@pytest.fixture
def store(db_url: str) -> Iterator[SystemStore]:
    DBOS(config=config(db_url))
    DBOS.launch()  # creates the schema
    DBOS.destroy()
    db = Database(db_url)
    try:
        yield SystemStore(db)
    finally:
        db.dispose()


def _dead_pid() -> int:
    """A pid that no process here has any more."""
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], text=True, capture_output=True
    )
    return int(gone.stdout)


def test_a_claim_replaces_only_the_row_it_judged(store: SystemStore) -> None:
    assert store.claim_executor("w", "h", 1, "t-1", T0, 3_000, replacing=None)
    # A second claim of a free id finds it taken: the first row stands.
    assert not store.claim_executor("w", "h", 2, "t-2", T0, 3_000, replacing=None)
    store.record_load_failure("w", "t-1", "fn", "v1", "ImportError: x", T0)
    # Two processes judged the holder t-1 dead: the first replaces it, the second finds
    # another row than the one it judged and writes nothing.
    assert store.claim_executor("w", "h", 3, "t-3", T0 + 1, 3_000, replacing="t-1")
    store.record_load_failure("w", "t-3", "fn", "v2", "ImportError: y", T0 + 1)
    assert not store.claim_executor("w", "h", 4, "t-4", T0 + 2, 3_000, replacing="t-1")
    row = store.get_executor("w")
    assert row is not None
    assert (row["token"], row["pid"], row["heartbeat_at"]) == ("t-3", 3, T0 + 1)
    # The winner's reports stay; the replaced holder's went with its row.
    assert [(f["executor_id"], f["version"]) for f in store.list_load_failures("fn")] == [
        ("w", "v2")
    ]


def test_a_launch_that_loses_the_race_for_a_dead_holders_id_is_refused(
    db_url: str, store: SystemStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between this launch's look at the dead holder and its claim, another live process
    registers the id: the launch judges that one in turn and is refused, naming it."""
    store.register_executor("raced", socket.gethostname(), _dead_pid(), "t-dead", T0)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    looks = 0
    original = SystemStore.get_executor

    def look_then_lose_the_race(self: SystemStore, executor_id: str) -> dict[str, Any] | None:
        nonlocal looks
        looks += 1
        row = original(self, executor_id)
        if executor_id == "raced" and looks == 1:
            # The other process's claim lands just after this look.
            now = int(time.time() * 1000)
            host = socket.gethostname()
            store.claim_executor(
                "raced", host, sleeper.pid, "t-other", now, 60_000, replacing="t-dead"
            )
        return row

    try:
        monkeypatch.setattr(SystemStore, "get_executor", look_then_lose_the_race)
        DBOS(config=config(db_url, executor_id="raced"))
        with pytest.raises(DBOSExecutorIdInUseError, match=f"in use by process {sleeper.pid}"):
            DBOS.launch()
        DBOS.destroy()
        row = store.get_executor("raced")
        assert row is not None and (row["token"], row["pid"]) == ("t-other", sleeper.pid)
    finally:
        sleeper.kill()
        sleeper.wait()


def _first_line(process: subprocess.Popen[str], timeout: float) -> str:
    """The process's first line of output; fails the test rather than hang on a silent one."""
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    assert ready, f"process {process.pid} said nothing in {timeout} s"
    return process.stdout.readline().strip()


LAUNCHER = """
import sys, time
from dbos_nb import DBOS, DBOSExecutorIdInUseError
from dbos_nb.clock import ManualClock
from dbos_nb.core.runtime import get_runtime
url, start_at = sys.argv[1], float(sys.argv[2])
DBOS(config={"name": "racer", "system_database_url": url, "executor_id": "contested",
             "heartbeat_interval_sec": 0.2})
time.sleep(max(0.0, start_at - time.time()))
try:
    DBOS.launch()
except DBOSExecutorIdInUseError:
    print("refused", flush=True)
    sys.exit(0)
print("launched", flush=True)
sys.stdin.read()  # hold the id until the test closes stdin
DBOS.destroy()
"""


def test_processes_launching_with_one_id_at_once_are_all_refused_but_one(
    db_url: str, store: SystemStore, tmp_path: Path
) -> None:
    """Four processes launch with the same executor id at the same moment, over a dead
    holder's row: exactly one holds it."""
    store.register_executor("contested", socket.gethostname(), _dead_pid(), "t-dead", T0)
    start_at = time.time() + 4.0  # after every interpreter has imported dbos_nb
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, db_url, str(start_at)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    try:
        said = [_first_line(racer, timeout=60) for racer in racers]
        assert sorted(said) == ["launched", "refused", "refused", "refused"]
        winner = racers[said.index("launched")]
        row = store.get_executor("contested")
        assert row is not None and row["pid"] == winner.pid
    finally:
        for racer in racers:
            if racer.stdin is not None:
                racer.stdin.close()
        for racer in racers:
            racer.wait(30)


def test_a_heartbeat_that_loses_its_id_to_another_process_goes_on_under_a_new_one(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its row was taken over (its lease ran out); its heartbeat finds the id free, but
    another process registers it before this one claims it again: this one does not delete
    that registration, it goes on under a new id."""
    clock = ManualClock(T0)
    DBOS(
        config=config(db_url, heartbeat_interval_sec=0.2, listen_queues=[], executor_id="hb"),
        clock=clock,
    )
    DBOS.launch()
    rt = get_runtime()
    store = rt.store

    def heartbeat_of(executor_id: str) -> int | None:
        row = store.get_executor(executor_id)
        return None if row is None else int(row["heartbeat_at"])

    wait_until(lambda: heartbeat_of("hb") == T0)
    store.take_over_expired(T0 + 60_000, 30_000, keep="judge")  # another process's verdict
    original = SystemStore.get_executor

    def look_then_lose_the_race(self: SystemStore, executor_id: str) -> dict[str, Any] | None:
        row = original(self, executor_id)
        if executor_id == "hb" and row is None:
            store.claim_executor("hb", "elsewhere", 1, "t-other", T0, 600_000, replacing=None)
        return row

    monkeypatch.setattr(SystemStore, "get_executor", look_then_lose_the_race)
    clock.advance(0.2)
    wait_until(lambda: rt.executor_id != "hb")
    monkeypatch.undo()
    assert rt.executor_id.startswith("hb-")
    other = store.get_executor("hb")
    assert other is not None and (other["token"], other["hostname"]) == ("t-other", "elsewhere")
    mine = store.get_executor(rt.executor_id)
    assert mine is not None and mine["hostname"] == socket.gethostname()


def test_a_claim_that_finds_the_id_free_loses_to_a_registration_landing_meanwhile(
    store: SystemStore, db_url: str
) -> None:
    """Another process's registration of the id is under way (not committed) when this claim
    looks: the look sees no row, and the claim's own insert then meets the other's. It must
    lose, not take the id too (on PostgreSQL the insert's row count said -1, and both
    processes held the id)."""
    import sqlalchemy as sa

    from dbos_nb.storage.schema import executors

    other = Database(db_url)
    answer: list[bool] = []
    try:
        with other.write() as conn:
            conn.execute(
                sa.insert(executors).values(
                    executor_id="landing",
                    hostname="elsewhere",
                    pid=1,
                    token="t-other",
                    started_at=T0,
                    heartbeat_at=T0,
                    lease_ms=60_000,
                )
            )
            claim = threading.Thread(
                target=lambda: answer.append(
                    store.claim_executor("landing", "h", 2, "t-mine", T0, 60_000, replacing=None)
                )
            )
            claim.start()
            claim.join(1.0)  # it waits for the other's transaction (a lock, or the key)
            assert claim.is_alive()
        claim.join(30)
    finally:
        other.dispose()
    assert answer == [False]
    row = store.get_executor("landing")
    assert row is not None and row["token"] == "t-other"


def test_an_idle_process_that_polls_slowly_still_beats_on_time(db_url: str) -> None:
    """The scheduler's loop slept for its polling interval when idle, and renewed its lease only
    then: each late renewal read as a lapse of its own, which gave every other executor a new
    lease, so that a survivor polling every 5 s never took over a dead worker's work."""
    DBOS(config=config(db_url, polling_interval_sec=5, heartbeat_interval_sec=0.2))
    DBOS.launch()
    store = get_runtime().store
    executor_id = get_runtime().executor_id
    seen: set[int] = set()
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        row = store.get_executor(executor_id)
        assert row is not None
        seen.add(int(row["heartbeat_at"]))
        time.sleep(0.05)
    assert len(seen) >= 4  # about ten beats in 2 s; a beat per poll gave one or two
