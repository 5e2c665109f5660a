"""External `dbos-nb worker` processes: notebook-defined functions, versions, limits across
workers, takeover of a SIGKILLed worker's work, and a graceful SIGTERM; leases (each executor
judged by its own, and leases too short for the heartbeat refused); on both backends."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from IPython.core.interactiveshell import InteractiveShell

from conftest import config, launched_shell, max_overlap, recorded_steps, wait_until
from dbos_nb import DBOS, DBOSClient, DBOSConfigError, Queue
from dbos_nb.cli import main
from dbos_nb.clock import ManualClock, SystemClock
from dbos_nb.core.runtime import get_runtime
from dbos_nb.engine import Renewals
from dbos_nb.serialization import dump_inputs
from dbos_nb.storage.database import Database, normalize_url
from dbos_nb.storage.migrations import migrate
from dbos_nb.storage.schema import PG_SCHEMA, load_failures
from dbos_nb.storage.store import NewWorkflow, SystemStore

TESTS = Path(__file__).parent
LEASE = 2.0


class WorkerPool:
    """`dbos-nb worker` subprocesses on one database."""

    def __init__(self, url: str, log: Path) -> None:
        self.url, self.log = url, log
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *extra: str, sleep: float = 0.02) -> subprocess.Popen[bytes]:
        env = dict(os.environ, WORKER_TASKS_LOG=str(self.log), WORKER_TASKS_SLEEP=str(sleep))
        cmd = [
            sys.executable,
            "-m",
            "dbos_nb.cli",
            "worker",
            "--db",
            self.url,
            "--executor-id",
            name,
            "--import",
            "worker_tasks",
            "--lease",
            str(LEASE),
            "--heartbeat",
            "0.3",
            "--poll",
            "0.05",
            *extra,
        ]
        proc = subprocess.Popen(cmd, cwd=TESTS, env=env, stderr=subprocess.PIPE)
        self.procs[name] = proc
        return proc

    def wait_registered(self, names: list[str]) -> None:
        engine = sa.create_engine(normalize_url(self.url))
        table = f"{PG_SCHEMA}.executors" if self.url.startswith("postgres") else "executors"
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline:
                try:
                    with engine.connect() as conn:
                        live = set(
                            conn.execute(sa.text(f"SELECT executor_id FROM {table}")).scalars()
                        )
                    if set(names) <= live:
                        return
                except sa.exc.OperationalError:
                    pass
                time.sleep(0.05)
        finally:
            engine.dispose()
        raise AssertionError(f"workers {names} never registered")

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def events(self) -> list[tuple[str, int, float, float, str]]:
        if not self.log.exists():
            return []
        out = []
        for line in self.log.read_text().splitlines():
            step, task, start, end, executor = line.split()
            out.append((step, int(task), float(start), float(end), executor))
        return sorted(out, key=lambda e: e[2])


@pytest.fixture
def pool(db_url: str, tmp_path: Path) -> Iterator[WorkerPool]:
    p = WorkerPool(db_url, tmp_path / "events.log")
    yield p
    p.stop_all()


@pytest.fixture
def shell(db_url: str) -> Iterator[InteractiveShell]:
    yield from launched_shell(db_url, "workers_nb", "--no-worker")


def _run(sh: InteractiveShell, code: str) -> Any:
    result = sh.run_cell(code)
    if not result.success:
        raise result.error_in_exec or result.error_before_exec  # type: ignore[misc]
    return result.result


def test_notebook_defined_functions_run_in_a_worker(
    shell: InteractiveShell, pool: WorkerPool
) -> None:
    _run(shell, "%dbos_queue remote")
    definition = (
        "import os\n"
        "from dbos_nb import DBOS\n"
        "FACTOR = {factor}\n"
        "@DBOS.step()\n"
        "def nb_scale(x):\n"
        "    return ('{tag}', x * FACTOR, os.getpid())\n"
    )
    _run(shell, definition.format(factor=10, tag="v1"))
    old = _run(shell, "remote.enqueue(nb_scale, 1)")
    _run(shell, definition.format(factor=100, tag="v2"))  # the cell is edited and run again
    new = _run(shell, "remote.enqueue(nb_scale, 2)")
    time.sleep(0.3)
    assert old.get_status().status == "ENQUEUED"  # this kernel runs no queued work
    pool.start("w-nb")
    tag_old, value_old, pid_old = old.get_result(timeout_sec=60)
    tag_new, value_new, pid_new = new.get_result(timeout_sec=60)
    assert (tag_old, value_old) == ("v1", 10)  # the old work ran the old code
    assert (tag_new, value_new) == ("v2", 200)  # the new work the new code
    assert pid_old == pid_new == pool.procs["w-nb"].pid != os.getpid()
    # The version follows what the function is pickled with: a notebook value reassigned, a
    # helper redefined, a step edited inside a durable cell. Work runs what it was enqueued
    # with; a worker never keeps a stale copy.
    _run(shell, "TEMPLATE = 'v1 {}'\ndef helper(x):\n    return x + 1\n")
    step = "@DBOS.step()\ndef templated(x):\n    return TEMPLATE.format(helper(x))\n"
    _run(shell, step)
    first = _run(shell, "remote.enqueue(templated, 1)")
    _run(shell, "TEMPLATE = 'v2 {}'")
    second = _run(shell, "remote.enqueue(templated, 1)")
    _run(shell, "def helper(x):\n    return x + 10\n")
    third = _run(shell, "remote.enqueue(templated, 1)")
    results = [h.get_result(timeout_sec=60) for h in (first, second, third)]
    assert results == ["v1 2", "v2 2", "v2 11"]
    cell = "%%dbos_workflow cell_step{rerun}\n@DBOS.step()\ndef in_cell(x):\n    return x * {k}\n"
    _run(shell, cell.format(rerun="", k=2))
    assert _run(shell, "remote.enqueue(in_cell, 5)").get_result(timeout_sec=60) == 10
    _run(shell, cell.format(rerun=" --rerun", k=3))
    assert _run(shell, "remote.enqueue(in_cell, 5)").get_result(timeout_sec=60) == 15
    # A workflow the worker loaded from the database enqueues a step the worker never
    # registered: a worker claims every stored function, so that is allowed there.
    _run(
        shell,
        "@DBOS.workflow()\n"
        "def nb_fanout(n):\n"
        "    return [h.get_result()[1] for h in [remote.enqueue(nb_scale, i) for i in range(n)]]\n",
    )
    assert _run(shell, "remote.enqueue(nb_fanout, 3)").get_result(timeout_sec=60) == [0, 100, 200]


def test_a_version_a_worker_cannot_load_stays_queued(
    db_url: str, pool: WorkerPool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = tmp_path / "only_here.py"
    module.write_text(
        "from dbos_nb import DBOS\n"
        "@DBOS.step(name='only_here_step')\n"
        "def only_here_step(x):\n"
        "    return x + 1\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        import only_here  # type: ignore[import-not-found]

        DBOS(config=config(db_url, listen_queues=[]))
        q = Queue("picky")
        DBOS.launch()
        handle = q.enqueue(only_here.only_here_step, 1)
        pool.start("w-picky")
        store = get_runtime().store
        # The worker says why in the database too, for the notebook and `dbos-nb status`.
        wait_until(lambda: bool(store.list_load_failures("only_here_step")), timeout=60)
        [failure] = store.list_load_failures()
        assert failure["executor_id"] == "w-picky" and failure["name"] == "only_here_step"
        assert failure["reason"] == "ModuleNotFoundError: No module named 'only_here'"
        time.sleep(0.5)  # a few of its claim rounds
        assert handle.get_status().status == "ENQUEUED"  # left for a process that can run it
        assert main(["status", "--db", db_url]) == 0
        out = capsys.readouterr().out
        assert "cannot load (as the executor reported; such work waits for one that can):" in out
        version = failure["version"]
        assert f"only_here_step version {version} on w-picky: ModuleNotFoundError" in out
        DBOS.destroy()
        DBOS(config=config(db_url))  # this process can: it imports the module
        Queue("picky")
        DBOS.launch()
        assert handle.get_result(timeout_sec=20) == 2
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("only_here", None)
    pool.stop_all()
    _, err = pool.procs["w-picky"].communicate(timeout=30)
    assert err.decode().count("cannot load 'only_here_step'") == 1  # said once, in its log
    db = Database(db_url)
    try:  # its report went with it
        with db.read() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(load_failures)).scalar() == 0
    finally:
        db.dispose()


def test_load_failures_go_with_their_executor(db_url: str) -> None:
    """A report lives as long as its executor's registration: gone at unregistration, at a
    takeover, and when the id is registered again (a new process); one written for an
    executor that is not registered is dropped; None withdraws it."""
    db = Database(db_url)
    migrate(db)
    store = SystemStore(db)

    def reported() -> list[tuple[str, str, str]]:
        # The table itself, not `list_load_failures` (which joins the registered executors).
        with db.read() as conn:
            rows = conn.execute(
                sa.select(
                    load_failures.c.executor_id, load_failures.c.version, load_failures.c.reason
                ).order_by(load_failures.c.recorded_at)
            )
            return [tuple(r) for r in rows]

    try:
        store.register_executor("a", "h", 1, "t-a", T0, lease_ms=3_000)
        store.register_executor("b", "h", 2, "t-b", T0, lease_ms=3_000)
        store.record_load_failure("a", "t-a", "fn", "v1", "ImportError: x", T0)
        store.record_load_failure("a", "t-a", "fn", "v1", "ImportError: y", T0 + 1)  # replaced
        store.record_load_failure("b", "t-b", "fn", "v1", "ImportError: z", T0 + 2)
        store.record_load_failure("b", "t-b", "other", "v9", "no stored copy", T0 + 3)
        store.record_load_failure("ghost", "t-g", "fn", "v1", "ImportError: w", T0)  # no row
        store.record_load_failure("a", "t-old", "fn", "v7", "ImportError: v", T0)  # not its own
        store.record_load_failure("a", "t-old", "fn", "v1", None, T0)  # nor withdraws a's
        assert reported() == [
            ("a", "v1", "ImportError: y"),
            ("b", "v1", "ImportError: z"),
            ("b", "v9", "no stored copy"),
        ]
        assert [f["executor_id"] for f in store.list_load_failures("other")] == ["b"]
        assert [(f["hostname"], f["pid"]) for f in store.list_load_failures("fn")] == [
            ("h", 1),
            ("h", 2),
        ]
        store.record_load_failure("b", "t-b", "other", "v9", None, T0 + 4)  # it loads now
        store.unregister_executor("a", "not-its-token")  # another process's: kept
        assert len(reported()) == 2
        store.unregister_executor("a", "t-a")
        assert reported() == [("b", "v1", "ImportError: z")]
        store.register_executor("a", "h", 3, "t-a2", T0 + 5, lease_ms=3_000)
        store.record_load_failure("a", "t-a2", "fn", "v2", "ImportError: q", T0 + 5)
        store.register_executor("a", "h", 4, "t-a3", T0 + 6, lease_ms=3_000)  # a new process
        assert reported() == [("b", "v1", "ImportError: z")]
        assert store.take_over_expired(T0 + 10_000, 3_000, keep="a") == {"b": []}
        assert reported() == []
    finally:
        db.dispose()


def test_limits_hold_across_three_workers(db_url: str, pool: WorkerPool) -> None:
    with DBOSClient(db_url, create=True):
        pass
    DBOS(config=config(db_url, listen_queues=[]))
    Queue("shared", concurrency=4, worker_concurrency=2, limiter={"limit": 30, "period": 1.0})
    DBOS.launch()
    names = ["w1", "w2", "w3"]
    for name in names:
        pool.start(name, sleep=0.05)
    pool.wait_registered(names)
    with DBOSClient(db_url) as client:
        handles = [
            client.enqueue({"queue_name": "shared", "workflow_name": "wt_work"}, i)
            for i in range(90)
        ]
        assert [h.get_result(timeout_sec=120) for h in handles] == list(range(90))
    events = pool.events()
    spans = [(e[2], e[3]) for e in events]
    assert max_overlap(spans) <= 4
    for name in names:
        mine = [(e[2], e[3]) for e in events if e[4] == name]
        assert mine and max_overlap(mine) <= 2
    starts = [e[2] for e in events]
    for i, s in enumerate(starts):
        assert sum(1 for t in starts[i:] if t < s + 1.0) <= 30


def test_sigkill_one_of_three_workers(db_url: str, pool: WorkerPool) -> None:
    DBOS(config=config(db_url, listen_queues=[]))
    Queue("batchq", concurrency=6, worker_concurrency=2)
    DBOS.launch()
    names = ["k1", "k2", "k3"]
    for name in names:
        pool.start(name, sleep=0.02)
    pool.wait_registered(names)
    with DBOSClient(db_url) as client:
        ids = [
            client.enqueue(
                {"queue_name": "batchq", "workflow_name": "wt_two_steps", "workflow_id": f"t{i}"}, i
            ).workflow_id
            for i in range(300)
        ]
    deadline = time.monotonic() + 120
    while len([e for e in pool.events() if e[0] == "second"]) < 60:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(pool.procs["k2"].pid, signal.SIGKILL)
    pool.procs["k2"].wait(30)
    killed_at = time.monotonic()
    checkpointed = recorded_steps(db_url)
    runs_at_kill = Counter((e[0], e[1]) for e in pool.events())
    with DBOSClient(db_url) as client:
        results = [client.retrieve_workflow(w).get_result(timeout_sec=120) for w in ids]
    finished_after = time.monotonic() - killed_at
    assert results == [2 * i for i in range(300)]  # every task, once, from the caller's view
    assert finished_after < LEASE + 20
    runs = Counter((e[0], e[1]) for e in pool.events())
    index = {"first": 1, "second": 2}
    for (step, task), count in runs.items():
        if (f"t{task}", index[step]) in checkpointed:
            assert count == runs_at_kill[(step, task)] == 1, (step, task)
        else:
            assert count <= 2, (step, task)
    k2_did = [e for e in pool.events() if e[4] == "k2"]
    assert k2_did, "the killed worker should have done part of the batch"


def test_sigterm_stops_gracefully_and_releases_work(db_url: str, pool: WorkerPool) -> None:
    DBOS(config=config(db_url, listen_queues=[]))
    Queue("slowq", worker_concurrency=2)
    DBOS.launch()
    proc = pool.start("graceful", "--grace", "0.2", sleep=1.5)
    pool.wait_registered(["graceful"])
    with DBOSClient(db_url) as client:
        handles = [
            client.enqueue({"queue_name": "slowq", "workflow_name": "wt_two_steps"}, i)
            for i in range(4)
        ]
        deadline = time.monotonic() + 30
        while sum(h.get_status().status == "PENDING" for h in handles) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
        assert "stopping: no new work" in err.decode()
        statuses = [h.get_status().status for h in handles]
        assert "PENDING" not in statuses  # released, not left to a lease
        pool.start("successor")
        assert [h.get_result(timeout_sec=60) for h in handles] == [0, 2, 4, 6]


def test_a_frozen_worker_that_comes_back_is_refused(db_url: str, pool: WorkerPool) -> None:
    """A worker frozen past its lease loses its work to another; thawed, its writes are refused."""
    DBOS(config=config(db_url, listen_queues=[]))
    Queue("zq", worker_concurrency=2)
    DBOS.launch()
    zombie = pool.start("zombie", sleep=3.0)
    pool.wait_registered(["zombie"])
    with DBOSClient(db_url) as client:
        handles = [
            client.enqueue({"queue_name": "zq", "workflow_name": "wt_two_steps"}, i)
            for i in range(2)
        ]
        deadline = time.monotonic() + 30
        while not all(h.get_status().status == "PENDING" for h in handles):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(zombie.pid, signal.SIGSTOP)  # frozen in the middle of its first steps
        try:
            pool.start("heir", sleep=0.1)
            assert [h.get_result(timeout_sec=60) for h in handles] == [0, 2]
        finally:
            os.kill(zombie.pid, signal.SIGCONT)
        time.sleep(3.0)  # the zombie's steps finish now; their writes must be refused
        for h in handles:
            status = h.get_status()
            assert (status.status, status.executor_id, status.output) == (
                "SUCCESS",
                "heir",
                2 * h.get_status().input["args"][0],
            )
            steps = client.list_workflow_steps(h.workflow_id)
            assert [s.function_name for s in steps] == ["wt_first", "wt_second"]
    pool.stop_all()
    _, err = zombie.communicate(timeout=30)
    assert "missed its lease" in err.decode()


# -- leases ------------------------------------------------------------------------------------

T0 = 1_700_000_000_000


def _running_on(store: SystemStore, workflow_id: str, executor_id: str, now_ms: int) -> None:
    """A workflow PENDING on `executor_id`, in a queue that no process of the test serves."""
    store.insert_workflow(
        NewWorkflow(
            workflow_id=workflow_id,
            name="elsewhere_wf",
            inputs=dump_inputs("elsewhere_wf", (), {}),
            status="PENDING",
            created_at=now_ms,
            executor_id=executor_id,
            owner_xid=f"xid-{workflow_id}",
            queue_name="elsewhere",
        )
    )


def _owner(store: SystemStore, workflow_id: str) -> tuple[str, str | None]:
    row = store.get_workflow(workflow_id)
    assert row is not None
    return row["status"], row["executor_id"]


def test_each_executor_is_judged_by_its_own_lease(db_url: str) -> None:
    """A judge with a short lease leaves a live executor with a longer lease alone between its
    heartbeats, and takes its work once it is silent past its own lease; an executor
    registered without a lease (before the column) is judged by the judge's."""
    db = Database(db_url)
    migrate(db)
    store = SystemStore(db)
    try:
        store.register_executor("judge", "h", 1, "t-judge", T0, lease_ms=3_000)
        store.register_executor("slow", "h", 2, "t-slow", T0, lease_ms=30_000)
        store.register_executor("old", "h", 3, "t-old", T0)  # no lease recorded
        _running_on(store, "paid", "slow", T0)
        _running_on(store, "legacy", "old", T0)
        # 10 s without a heartbeat: past the judge's lease, within the slow one's own.
        assert store.take_over_expired(T0 + 10_000, 3_000, keep="judge") == {"old": ["legacy"]}
        assert _owner(store, "paid") == ("PENDING", "slow")
        assert store.take_over_expired(T0 + 30_000, 3_000, keep="judge") == {}  # not past it
        assert store.take_over_expired(T0 + 30_001, 3_000, keep="judge") == {"slow": ["paid"]}
        assert _owner(store, "paid") == ("ENQUEUED", None)
        assert [e["executor_id"] for e in store.list_executors()] == ["judge"]
    finally:
        db.dispose()


def test_a_short_lease_process_does_not_take_over_a_live_executor(db_url: str) -> None:
    """The reproduction of the bug, through a launched engine on an injected clock: this process
    (lease 1 s) judges another (registered as a worker with the defaults: lease 30 s) that last
    beat 10 s ago, and leaves its running workflow alone until that one's own lease runs out.
    The engine registers its own lease too, for the others to judge it by."""
    clock = ManualClock(T0)
    DBOS(
        config=config(
            db_url,
            executor_lease_sec=1.0,
            heartbeat_interval_sec=0.2,
            listen_queues=[],
        ),
        clock=clock,
    )
    DBOS.launch()
    rt = get_runtime()
    store = rt.store
    me = store.get_executor(rt.executor_id)
    assert me is not None and me["lease_ms"] == 1_000
    store.register_executor("worker-a", "h", 2, "t-a", T0, lease_ms=30_000)
    _running_on(store, "paid", "worker-a", T0)

    def judged_at(now_ms: int) -> None:
        """Move the clock to `now_ms` and wait for this process to judge the others then (the
        heartbeat after the one at `now_ms` comes after that one's takeover pass)."""
        clock.advance((now_ms - clock.now_ms()) / 1000)
        wait_until(lambda: _heartbeat_of(store, rt.executor_id) == now_ms)
        clock.advance(0.2)
        wait_until(lambda: _heartbeat_of(store, rt.executor_id) == now_ms + 200)

    judged_at(T0 + 10_000)
    assert _owner(store, "paid") == ("PENDING", "worker-a")
    judged_at(T0 + 30_001)
    assert _owner(store, "paid") == ("ENQUEUED", None)
    assert store.get_executor("worker-a") is None


def _heartbeat_of(store: SystemStore, executor_id: str) -> int | None:
    row = store.get_executor(executor_id)
    return None if row is None else int(row["heartbeat_at"])


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        # Identical short leases everywhere, the heartbeat left at its 5 s default.
        ({"executor_lease_sec": 2, "heartbeat_interval_sec": 5}, r"\(2 s\) must be at least"),
        ({"executor_lease_sec": 0.99, "heartbeat_interval_sec": 0.5}, r"that is 1 s"),
        ({"heartbeat_interval_sec": 20}, r"twice 'heartbeat_interval_sec' \(20 s\)"),
    ],
)
def test_a_lease_too_short_for_the_heartbeat_is_refused(
    db_url: str, cfg: dict[str, Any], message: str
) -> None:
    """`config` sets a 0.5 s heartbeat (and the lease is 30 s by default)."""
    with pytest.raises(DBOSConfigError, match=message):
        DBOS(config=config(db_url, **cfg))
    # At the bound, it is accepted.
    DBOS(config=config(db_url, executor_lease_sec=0.3, heartbeat_interval_sec=0.15))
    DBOS.launch()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lease", "2"], r"--lease \(2 s\) must be at least twice --heartbeat \(5 s\)"),
        (["--lease", "1.5", "--heartbeat", "1"], r"--heartbeat \(1 s\), that is 2 s"),
    ],
)
def test_the_worker_refuses_a_lease_too_short_for_its_heartbeat(
    db_url: str, flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused before anything happens: the module to import does not exist, and a worker that
    got past the check would fail on it (or run until stopped)."""
    argv = ["worker", "--db", db_url, "--import", "no_such_module_here", *flags]
    assert main(argv) == 2
    assert re.search(message, capsys.readouterr().err)


def test_work_claimed_after_a_take_over_goes_back_when_the_executor_rejoins(db_url: str) -> None:
    """An executor whose row another process removed (its lease had run out) and that claimed
    work before its next heartbeat: when that heartbeat finds the row gone and the executor
    joins again, the work goes back to its queue instead of staying PENDING under it."""
    clock = ManualClock(T0)
    DBOS(config=config(db_url, heartbeat_interval_sec=0.2, listen_queues=[]), clock=clock)
    DBOS.launch()
    rt = get_runtime()
    store = rt.store
    wait_until(lambda: _heartbeat_of(store, rt.executor_id) == T0)
    store.take_over_expired(T0 + 60_000, 30_000, keep="judge")  # another process's verdict
    assert store.get_executor(rt.executor_id) is None
    _running_on(store, "late", rt.executor_id, T0)  # claimed by it just after
    clock.advance(0.2)
    wait_until(lambda: _heartbeat_of(store, rt.executor_id) == T0 + 200)
    wait_until(lambda: _owner(store, "late") == ("ENQUEUED", None))


def test_a_clock_set_back_does_not_stop_the_heartbeat(db_url: str) -> None:
    """NTP correcting a clock that ran a minute ahead sets it back: the heartbeat goes on at
    once, stamped with the corrected time, rather than waiting a minute for the clock to come
    back to its last beat (by then, with a 30 s lease, others would have taken its work)."""
    clock = ManualClock(T0)
    DBOS(config=config(db_url, heartbeat_interval_sec=0.2, listen_queues=[]), clock=clock)
    DBOS.launch()
    rt = get_runtime()
    wait_until(lambda: _heartbeat_of(rt.store, rt.executor_id) == T0)
    clock.advance(-60)
    wait_until(lambda: _heartbeat_of(rt.store, rt.executor_id) == T0 - 60_000)
    clock.advance(0.2)  # and the interval counts from the corrected time
    wait_until(lambda: _heartbeat_of(rt.store, rt.executor_id) == T0 - 59_800)


class _Monotonic:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_renewals_count_a_sleep_of_the_machine_as_everyones_silence() -> None:
    """The monotonic clock stops while the machine sleeps, the wall clock does not: a jump of
    the real clock past the time this process ran gives the others a whole lease; a clock
    that a test moves by hand (no sleep) does not, nor does a clock set back."""
    mono = _Monotonic()
    real = Renewals(0.5, real_clock=True, monotonic=mono)
    real.renewed(T0)
    mono.now += 0.5
    real.renewed(T0 + 500)
    assert real.silent_since == 0  # an ordinary heartbeat
    mono.now += 0.5
    real.renewed(T0 + 600_000)  # ten minutes on the wall clock, half a second run
    assert real.silent_since == T0 + 600_000
    mono.now += 0.5
    real.renewed(T0 + 540_000)  # set back a minute
    assert real.silent_since == T0 + 600_000
    mono.now += 5
    real.renewed(T0 + 545_000)  # a real wait shows on both clocks
    assert real.silent_since == T0 + 545_000

    manual = Renewals(0.5, monotonic=mono)
    manual.renewed(T0)
    mono.now += 0.5
    manual.renewed(T0 + 600_000)
    assert manual.silent_since == 0


class _JumpingClock(SystemClock):
    """The real clock, plus a jump: a machine that slept, or a clock set forward."""

    def __init__(self) -> None:
        self.jump_ms = 0

    def now_ms(self) -> int:
        return super().now_ms() + self.jump_ms


def test_after_the_machine_slept_the_first_to_wake_takes_no_ones_work(db_url: str) -> None:
    """A laptop closed on a notebook and its workers: on waking, the others' heartbeats are as
    old as the sleep. The first process to renew gives them a whole lease before judging them,
    and takes the work only of one that stays silent past it."""
    clock = _JumpingClock()
    DBOS(
        config=config(db_url, heartbeat_interval_sec=0.1, executor_lease_sec=2, listen_queues=[]),
        clock=clock,
    )
    DBOS.launch()
    rt = get_runtime()
    store = rt.store
    now = clock.now_ms()
    store.register_executor("asleep", "h", 2, "t-asleep", now, lease_ms=1_000)
    _running_on(store, "mid-call", "asleep", now)
    beat = _heartbeat_of(store, rt.executor_id) or 0
    wait_until(lambda: (_heartbeat_of(store, rt.executor_id) or 0) > beat)
    clock.jump_ms = 600_000  # ten minutes asleep
    woke = clock.now_ms()
    wait_until(lambda: (_heartbeat_of(store, rt.executor_id) or 0) > woke + 300)
    assert _owner(store, "mid-call") == ("PENDING", "asleep")  # judged after a whole lease only
    # The other never renews: once its whole lease from the wake-up has passed, its work goes.
    wait_until(lambda: _owner(store, "mid-call") == ("ENQUEUED", None), timeout=20)
    assert clock.now_ms() - woke >= 1_000


def test_a_long_transaction_on_sqlite_gives_no_live_workers_work_away(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLite has one write lock for the whole file. A transaction that holds it longer than
    the lease stops every process's heartbeat; when it ends, this process (the judge) must not
    take the work of a worker that is alive and was only waiting for the lock: that worker's
    finished steps would run again. (PostgreSQL locks rows: a long transaction blocks no
    heartbeat there.)"""
    url = f"sqlite:///{tmp_path / 'system.sqlite'}"
    pool = WorkerPool(url, tmp_path / "events.log")
    try:
        # This process only judges: the worker alone runs the queue's work.
        DBOS(
            config=config(
                url, heartbeat_interval_sec=0.3, executor_lease_sec=LEASE, listen_queues=[]
            )
        )
        Queue("holdq", worker_concurrency=2)

        @DBOS.transaction()
        def hold_the_lock(seconds: float) -> None:
            DBOS.sql_session.execute(sa.text("CREATE TABLE IF NOT EXISTS held (x INTEGER)"))
            time.sleep(seconds)

        DBOS.launch()
        worker = pool.start("busy", "--queue", "holdq", sleep=1.0)
        pool.wait_registered(["busy"])
        with DBOSClient(url) as client:
            handles = [
                client.enqueue(
                    {"queue_name": "holdq", "workflow_name": "wt_work", "workflow_id": f"h{i}"},
                    i,
                )
                for i in range(2)
            ]
            wait_until(lambda: all(h.get_status().executor_id == "busy" for h in handles))
            with caplog.at_level("INFO", logger="dbos_nb"):
                hold_the_lock(2 * LEASE)  # the worker's steps end meanwhile, unrecorded
                assert [h.get_result(timeout_sec=60) for h in handles] == [0, 1]
                time.sleep(LEASE + 0.5)  # this process judges the others a few times more
        assert "sent no heartbeat within its lease" not in caplog.text
        assert "could not renew its lease" in caplog.text
        assert Counter((e[0], e[1]) for e in pool.events()) == {("only", 0): 1, ("only", 1): 1}
        assert {e[4] for e in pool.events()} == {"busy"}
    finally:
        DBOS.destroy()
        pool.stop_all()
    _, err = worker.communicate(timeout=30)
    assert "missed its lease" not in err.decode()


def test_an_executor_whose_id_another_process_took_goes_on_under_a_new_one(db_url: str) -> None:
    """A process that could not renew its lease comes back to find its executor id registered
    by another live process (which took it over as a dead one's). It must not take the id back:
    that would delete the other's registration and put the other's running work back in the
    queues, and the other would do the same in turn, for ever. It goes on under a new id."""
    clock = ManualClock(T0)
    DBOS(
        config=config(
            db_url,
            executor_id="nb",
            heartbeat_interval_sec=0.2,
            executor_lease_sec=1.0,
            listen_queues=[],
        ),
        clock=clock,
    )
    DBOS.launch()
    rt = get_runtime()
    store = rt.store
    wait_until(lambda: _heartbeat_of(store, "nb") == T0)
    # The other process: it registered "nb" and runs a workflow of its own under it.
    store.register_executor("nb", "other-host", 4242, "t-other", T0, lease_ms=30_000)
    _running_on(store, "theirs", "nb", T0)
    clock.advance(0.2)
    wait_until(lambda: rt.executor_id != "nb")
    assert rt.executor_id.startswith("nb-") and DBOS.executor_id == rt.executor_id
    other = store.get_executor("nb")
    assert other is not None and other["token"] == "t-other"
    assert _owner(store, "theirs") == ("PENDING", "nb")
    assert store.get_executor(rt.executor_id) is not None
    clock.advance(0.2)  # and it keeps renewing under its new id
    wait_until(lambda: _heartbeat_of(store, rt.executor_id) == T0 + 400)
    assert _owner(store, "theirs") == ("PENDING", "nb")
    # Taken over again: the next id comes from the configured one, not from the last.
    first = rt.executor_id
    store.register_executor(first, "other-host", 4243, "t-other-2", T0, lease_ms=30_000)
    clock.advance(0.2)
    wait_until(lambda: rt.executor_id != first)
    assert rt.executor_id.startswith("nb-") and len(rt.executor_id) == len(first)


def test_the_resolver_reports_what_it_cannot_load_once(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each version this process cannot load is reported once, with why; a version stored
    after it was first missed withdraws its report when it loads."""
    import pickle

    import worker_tasks

    from dbos_nb.core import functions
    from dbos_nb.core.registry import Registry

    monkeypatch.setattr(functions, "MISSING_RETRY_SEC", 0.0)
    db = Database(db_url)
    migrate(db)
    store = SystemStore(db)
    told: list[tuple[str, str, str | None]] = []
    resolver = functions.FunctionResolver(
        store, Registry(), run_stored=True, report=lambda *said: told.append(said)
    )
    try:
        store.record_function_versions([("broken", "v-bad", "step", "m", b"not a pickle")], T0)
        for _ in range(2):
            assert resolver.resolve("late", "v-late") is None  # not stored (yet)
            assert resolver.resolve("broken", "v-bad") is None
        assert told == [
            ("late", "v-late", functions.NOT_STORED),
            ("broken", "v-bad", "UnpicklingError: invalid load key, 'n'."),
        ]
        assert "v-bad" in resolver.excluded_versions()  # for good (v-late: retried)
        payload = pickle.dumps(worker_tasks.wt_work)
        store.record_function_versions([("late", "v-late", "step", "m", payload)], T0)
        reg = resolver.resolve("late", "v-late")
        assert reg is not None and reg.name == "wt_work"
        assert told[2:] == [("late", "v-late", None)]
        assert resolver.excluded_versions() == {"v-bad"}
        # Registered again (its reports went with its old row): the standing ones, again.
        del told[:]
        resolver.report_again()
        assert told == [("broken", "v-bad", "UnpicklingError: invalid load key, 'n'.")]
    finally:
        db.dispose()


def test_a_report_that_could_not_be_written_is_written_at_the_next_refresh(db_url: str) -> None:
    from dbos_nb.core import functions
    from dbos_nb.core.registry import Registry

    db = Database(db_url)
    migrate(db)
    store = SystemStore(db)
    told: list[tuple[str, str, str | None]] = []
    down = [True]

    def report(*said: Any) -> None:
        if down[0]:
            raise OSError("the database is unreachable")
        told.append(said)

    resolver = functions.FunctionResolver(store, Registry(), run_stored=True, report=report)
    try:
        store.record_function_versions([("broken", "v-bad", "step", "m", b"not a pickle")], T0)
        resolver.refresh()  # loads every stored version: fails, and cannot say so
        assert told == []
        down[0] = False
        resolver.refresh()
        assert told == [("broken", "v-bad", "UnpicklingError: invalid load key, 'n'.")]
        resolver.refresh()
        assert len(told) == 1  # written once
    finally:
        db.dispose()
