"""Shared fixtures: one behavioural suite runs on SQLite files and on a real PostgreSQL server.

PostgreSQL comes from DBOS_NB_TEST_PG_URL (a server URL; each test gets a fresh database on it) or,
when that is unset, from a throwaway server started for the session. The PostgreSQL tests never
skip: if no server can be had, they fail.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).parent))

import pgserver

from dbos_nb import DBOS
from dbos_nb.core import queue as queue_module
from dbos_nb.core.registry import REGISTRY

BACKENDS = ["sqlite", "postgres"]


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    url = os.environ.get("DBOS_NB_TEST_PG_URL")
    if url:
        yield url
        return
    server = pgserver.start()
    try:
        yield server.url
    finally:
        server.stop()


def libpq_dsn(url: str) -> str:
    """A SQLAlchemy URL of a PostgreSQL database as psycopg's own connection string."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def create_pg_database(server_url: str) -> str:
    """A fresh database on the test server; returns its URL."""
    name = "t_" + uuid.uuid4().hex[:16]
    with psycopg.connect(libpq_dsn(server_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def drop_pg_database(server_url: str, url: str) -> None:
    name = make_url(url).database
    with psycopg.connect(libpq_dsn(server_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, empty system database URL on the parametrised backend."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'system.sqlite'}"
        return
    server = request.getfixturevalue("pg_server_url")
    url = create_pg_database(server)
    try:
        yield url
    finally:
        DBOS.destroy()
        drop_pg_database(server, url)


@pytest.fixture
def new_db_url(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[[], str]]:
    """A factory of further fresh databases on the same backend (for app databases)."""
    made: list[str] = []

    def make() -> str:
        if backend == "sqlite":
            return f"sqlite:///{tmp_path / ('extra_' + uuid.uuid4().hex[:8] + '.sqlite')}"
        url = create_pg_database(request.getfixturevalue("pg_server_url"))
        made.append(url)
        return url

    yield make
    if made:
        DBOS.destroy()
        server = request.getfixturevalue("pg_server_url")
        for url in made:
            drop_pg_database(server, url)


@pytest.fixture(autouse=True)
def _clean_state() -> Iterator[None]:
    """Every test starts without a DBOS instance or declared queues, and ends the same way.

    Functions that test modules register at import survive a test that destroys the registry
    (`DBOS.destroy(destroy_registry=True)`, a kernel restart): without them a later test's
    queued work would wait forever for a process that knows its function.
    """
    DBOS.destroy()
    queue_module.QUEUES.clear()
    registered = REGISTRY.all()
    yield
    DBOS.destroy()
    queue_module.QUEUES.clear()
    for reg in registered:
        if REGISTRY.get(reg.name) is None:
            REGISTRY.register(reg)


def recorded_steps(url: str) -> set[tuple[str, int]]:
    """(workflow id, operation number) of every checkpoint in the database, read directly."""
    import sqlalchemy as sa

    from dbos_nb.storage.database import normalize_url
    from dbos_nb.storage.schema import PG_SCHEMA

    engine = sa.create_engine(normalize_url(url))
    table = f"{PG_SCHEMA}.operation_outputs" if url.startswith("postgres") else "operation_outputs"
    with engine.connect() as conn:
        rows = conn.execute(sa.text(f"SELECT workflow_uuid, function_id FROM {table}")).all()
    engine.dispose()
    return {(str(r[0]), int(r[1])) for r in rows}


def max_overlap(intervals: Sequence[tuple[float, float]], slack: float = 0) -> int:
    """The most intervals [start, end - slack) that hold at one instant: how many tasks ran
    at once, from their recorded start and end times (`slack` forgives a clock's skew)."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e - slack, -1) for _, e in intervals])
    running = most = 0
    for _, delta in events:
        running += delta
        most = max(most, running)
    return most


def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    """Poll `condition` until it holds; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def config(url: str, **extra: Any) -> dict[str, Any]:
    """A test configuration: short polling so cross-process tests need no long waits."""
    base: dict[str, Any] = {
        "name": "test_app",
        "system_database_url": url,
        "polling_interval_sec": 0.05,
        "heartbeat_interval_sec": 0.5,
    }
    base.update(extra)
    return base


@pytest.fixture
def launched(db_url: str) -> Iterator[str]:
    """DBOS created on the parametrised backend and launched; yields the database URL."""
    DBOS(config=config(db_url))
    DBOS.launch()
    yield db_url
    DBOS.destroy()


def insert_pending(store: Any, workflow_id: str, owner: str, queue_name: str | None = None) -> None:
    """A PENDING workflow row owned by `owner`, written straight to a `SystemStore` (as if
    some execution ran it), for tests of the storage layer."""
    from dbos_nb.storage.store import NewWorkflow

    store.insert_workflow(
        NewWorkflow(
            workflow_id=workflow_id,
            name="wf",
            inputs=b"",
            status="PENDING",
            created_at=1,
            owner_xid=owner,
            executor_id="test",
            queue_name=queue_name,
        )
    )


@pytest.fixture
def launched_pg(pg_server_url: str) -> Iterator[str]:
    """DBOS launched on a fresh PostgreSQL database; yields its URL."""
    url = create_pg_database(pg_server_url)
    DBOS(config=config(url))
    DBOS.launch()
    yield url
    DBOS.destroy()
    drop_pg_database(pg_server_url, url)


def new_shell() -> Any:
    """A fresh IPython shell with the extension loaded (IPython's one instance, reset)."""
    from IPython.core.interactiveshell import InteractiveShell

    sh = InteractiveShell.instance()
    sh.reset(new_session=True)
    sh.run_line_magic("load_ext", "dbos_nb")
    return sh


def launched_shell(db_url: str, name: str, *options: str) -> Iterator[Any]:
    """A fresh shell that ran `%dbos_launch --db <db_url> --name <name> <options>`; destroys
    DBOS when the test is done (the body of the notebook test files' `shell` fixtures)."""
    sh = new_shell()
    run_cell(sh, " ".join(["%dbos_launch", "--db", db_url, "--name", name, *options]))
    yield sh
    DBOS.destroy()


# A notebook step that records its call in RUNS and holds until the test's `gate` opens.
HELD_STEP = """
from dbos_nb import DBOS
@DBOS.step()
def held(i):
    RUNS.append(i)
    gate.wait(20)
    return i
"""


def append_effect(workdir: str, line: str) -> None:
    """Append a line to WORKDIR/effects.log, durably: what a crash test's paid call leaves, so
    that the test can count how often it ran across a SIGKILL."""
    with open(os.path.join(workdir, "effects.log"), "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def kill_when_ready(argv: list[str], workdir: Path) -> None:
    """Start `argv`, wait until it creates WORKDIR/ready (its crash point), then SIGKILL it."""
    import signal
    import subprocess

    proc = subprocess.Popen(argv)
    try:
        deadline = time.monotonic() + 60
        while not (workdir / "ready").exists():
            assert proc.poll() is None, "the crash child exited before reaching the crash point"
            assert time.monotonic() < deadline, "the crash child never reached the crash point"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL


def cli_command(*argv: str) -> list[str]:
    """`python -m dbos_nb.cli ARGV` in a subprocess: the command as a shell runs it."""
    return [sys.executable, "-m", "dbos_nb.cli", *argv]


def start_cli_worker(*argv: str, cwd: Path | None = None) -> tuple[Any, list[str]]:
    """A `dbos-nb worker` subprocess (short heartbeat, lease and poll), read up to its first
    progress line (it is running then); returns it with its log so far."""
    import subprocess

    proc = subprocess.Popen(
        cli_command("worker", *argv, "--heartbeat", "0.3", "--lease", "2", "--poll", "0.05"),
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
    )
    assert proc.stderr is not None
    log: list[str] = []
    for line in proc.stderr:
        log.append(line)
        if "running 0, done 0" in line:
            break
    return proc, log


def run_cell(sh: Any, code: str) -> Any:
    """Run a cell in an IPython shell as a notebook would; raise what it raised; its result."""
    result = sh.run_cell(code, store_history=False)
    if result.error_before_exec is not None:
        raise result.error_before_exec
    if result.error_in_exec is not None:
        raise result.error_in_exec
    return result.result
