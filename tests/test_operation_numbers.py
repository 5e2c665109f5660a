"""Operations are numbered from 1, as in DBOS: step ids, child ids, `fork_workflow`'s start step;
and a database written by an older dbos_nb (numbered from 0) is renumbered at launch."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
import sqlalchemy as sa

from conftest import config
from dbos_nb import DBOS, DBOSConfigError, Queue, SetWorkflowID
from dbos_nb.storage.database import Database
from dbos_nb.storage.schema import (
    APP_SCHEMA_VERSION,
    SCHEMA_VERSION,
    app_schema_migrations,
    executors,
    schema_migrations,
)

CALLS: list[str] = []


@DBOS.step()
def double(x: int) -> int:
    CALLS.append(f"double({x}) as step {DBOS.step_id}")
    return 2 * x


@DBOS.transaction()
def add_one(x: int) -> int:
    CALLS.append(f"add_one({x}) as step {DBOS.step_id}")
    return x + 1


@DBOS.workflow()
def child(x: int) -> int:
    return x * 10


@DBOS.workflow()
def pipeline(x: int) -> list[int]:
    a = double(x)
    b = add_one(a)
    c = double(b)
    return [a, b, c]


@DBOS.workflow()
def parent(x: int) -> list[object]:
    first = double(x)
    direct = child(x)  # operation 2: the child's id is "<parent id>-2"
    queued = Queue("numbers").enqueue(child, x + 1)  # operation 3
    return [first, direct, queued.workflow_id, queued.get_result()]


def test_the_first_operation_is_number_1_as_in_dbos(db_url: str) -> None:
    """The numbers DBOS gives: `DBOS.step_id` and `list_workflow_steps` count from 1, and a
    child's id is its parent's id and the number of the operation that started it."""
    DBOS(config=config(db_url))
    Queue("numbers")
    DBOS.launch()
    CALLS.clear()
    with SetWorkflowID("numbered"):
        assert pipeline(5) == [10, 11, 22]
    assert CALLS == ["double(5) as step 1", "add_one(10) as step 2", "double(11) as step 3"]
    steps = DBOS.list_workflow_steps("numbered")
    assert [(s.function_id, s.function_name) for s in steps] == [
        (1, double.__qualname__),
        (2, add_one.__qualname__),
        (3, double.__qualname__),
    ]

    with SetWorkflowID("family"):
        assert parent(3) == [6, 30, "family-3", 40]
    assert DBOS.retrieve_workflow("family-2").get_result() == 30
    assert [s.child_workflow_id for s in DBOS.list_workflow_steps("family")][1:] == [
        "family-2",
        "family-3",
        "family-3",  # the wait on the queued child, recorded as DBOS.getResult
    ]


def test_fork_from_step_n_runs_step_n_again(db_url: str) -> None:
    """`fork_workflow(id, n)` keeps the operations before step n and runs n and the rest, with
    n counted as DBOS counts it (the second step is 2)."""
    DBOS(config=config(db_url))
    DBOS.launch()
    with SetWorkflowID("to-fork"):
        pipeline(1)
    CALLS.clear()
    assert DBOS.fork_workflow("to-fork", 2).get_result() == [2, 3, 6]
    assert CALLS == ["add_one(2) as step 2", "double(3) as step 3"]
    CALLS.clear()
    assert DBOS.fork_workflow("to-fork", 1).get_result() == [2, 3, 6]
    assert CALLS == ["double(1) as step 1", "add_one(2) as step 2", "double(3) as step 3"]


def _renumber_from_zero(conn: sa.Connection, table: str) -> None:
    """Subtract 1 from every operation number (through negatives: the key is checked row by
    row)."""
    conn.execute(sa.text(f"UPDATE {table} SET function_id = -function_id"))
    conn.execute(sa.text(f"UPDATE {table} SET function_id = -function_id - 1"))


@pytest.mark.parametrize("app_db", ["shared", "separate"])
def test_a_version_7_database_is_renumbered_and_its_running_workflow_resumes(
    db_url: str, new_db_url: Callable[[], str], app_db: str
) -> None:
    """A workflow that an older dbos_nb left running (operations numbered from 0) resumes after
    the upgrade against its renumbered records: its completed step does not run again, nor does
    its transaction whose checkpoint only the application database's table holds (the process
    died between the transaction's commit and its record in the system database). The
    application database may be the system database or another one: each is upgraded."""
    app_url = db_url if app_db == "shared" else new_db_url()
    settings = config(db_url, application_database_url=app_url)
    DBOS(config=settings)
    DBOS.launch()
    with SetWorkflowID("old-run"):
        assert pipeline(5) == [10, 11, 22]
    DBOS.destroy()

    system, app = Database(db_url), Database(app_url)
    prefix = "dbos_nb." if system.is_postgres else ""
    with system.write() as conn:  # as dbos_nb's schema version 7 left it, mid-run
        _renumber_from_zero(conn, prefix + "operation_outputs")
        conn.execute(
            sa.text(
                f"DELETE FROM {prefix}operation_outputs "
                "WHERE workflow_uuid = 'old-run' AND function_id >= 1"
            )
        )
        conn.execute(
            sa.text(
                f"UPDATE {prefix}workflow_status SET status = 'PENDING', output = NULL, "
                "completed_at = NULL WHERE workflow_uuid = 'old-run'"
            )
        )
        conn.execute(sa.delete(schema_migrations))
        conn.execute(schema_migrations.insert().values(version=7, applied_at=1))
    with app.write() as conn:  # its table was not versioned then
        _renumber_from_zero(conn, prefix + "transaction_outputs")
        conn.execute(sa.text(f"DROP TABLE {prefix}app_schema_migrations"))
    system.dispose()
    app.dispose()

    CALLS.clear()
    DBOS(config=settings)
    DBOS.launch()  # upgrades both tables, then recovers the workflow
    assert DBOS.retrieve_workflow("old-run").get_result(timeout_sec=20) == [10, 11, 22]
    assert CALLS == ["double(11) as step 3"]
    steps = DBOS.list_workflow_steps("old-run")
    # The transaction's record too, written on the way from its checkpoint.
    assert [(s.function_id, s.output) for s in steps] == [(1, 10), (2, 11), (3, 22)]
    DBOS.destroy()

    system = Database(db_url)
    with system.read() as conn:
        versions = sorted(conn.execute(sa.select(schema_migrations.c.version)).scalars())
    system.dispose()
    assert versions == list(range(7, SCHEMA_VERSION + 1)) == [7, 8, 9]
    assert _application_tables(app_url) == ([APP_SCHEMA_VERSION], [2]) == ([2], [2])


def _application_tables(url: str) -> tuple[list[int], list[int]]:
    """The versions stamped in an application database, and its checkpoints' numbers."""
    db = Database(url)
    prefix = "dbos_nb." if db.is_postgres else ""
    with db.read() as conn:
        versions = list(conn.execute(sa.select(app_schema_migrations.c.version)).scalars())
        numbers = sa.text(f"SELECT function_id FROM {prefix}transaction_outputs")
        checkpoints = list(conn.execute(numbers).scalars())
    db.dispose()
    return versions, checkpoints


def test_an_application_database_of_a_newer_dbos_nb_is_refused(db_url: str) -> None:
    """As a system database of a newer schema is: its checkpoints may mean something else."""
    DBOS(config=config(db_url))
    DBOS.launch()
    DBOS.destroy()
    db = Database(db_url)
    with db.write() as conn:
        conn.execute(app_schema_migrations.insert().values(version=99, applied_at=1))
    db.dispose()
    DBOS(config=config(db_url))
    with pytest.raises(DBOSConfigError, match="application database has dbos_nb schema version 99"):
        DBOS.launch()


def test_a_new_application_database_is_stamped_and_not_renumbered(db_url: str) -> None:
    """A fresh application database gets the current version at once: launching again never
    renumbers checkpoints written under the current numbering."""
    DBOS(config=config(db_url))
    DBOS.launch()
    with SetWorkflowID("fresh"):
        pipeline(2)
    DBOS.destroy()
    DBOS(config=config(db_url))
    DBOS.launch()
    DBOS.destroy()
    assert _application_tables(db_url) == ([APP_SCHEMA_VERSION], [2])


def test_the_upgrade_waits_until_the_older_version_stops(db_url: str) -> None:
    """Processes of the older dbos_nb still running would go on numbering from 0 and write
    over the renumbered records: the upgrade is refused, changing nothing, while one of them
    is live (a heartbeat within its lease, and not known dead); a process that died on this
    machine, or one whose lease ran out, does not hold it back."""
    DBOS(config=config(db_url))
    DBOS.launch()
    DBOS.destroy()
    db = Database(db_url)
    prefix = "dbos_nb." if db.is_postgres else ""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    # A pid no process here has: another machine's process is judged by its heartbeat alone.
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], text=True, capture_output=True
    )
    dead_pid = int(gone.stdout)
    now = int(time.time() * 1000)

    def as_version_7_with(executor: str, host: str, pid: int, heartbeat_ms: int) -> None:
        with db.write() as conn:
            conn.execute(sa.delete(schema_migrations))
            conn.execute(schema_migrations.insert().values(version=7, applied_at=1))
            conn.execute(sa.delete(executors))
            conn.execute(
                executors.insert().values(
                    executor_id=executor,
                    hostname=host,
                    pid=pid,
                    token="t",
                    started_at=heartbeat_ms,
                    heartbeat_at=heartbeat_ms,
                    lease_ms=10_000,
                )
            )
            conn.execute(sa.text(f"DELETE FROM {prefix}operation_outputs"))
            conn.execute(
                sa.text(
                    f"INSERT INTO {prefix}operation_outputs (workflow_uuid, function_id, "
                    "function_name) VALUES ('w', 0, 'first')"
                )
            )

    def upgraded() -> tuple[int, int]:
        with db.read() as conn:
            version = conn.execute(sa.select(sa.func.max(schema_migrations.c.version))).scalar()
            fid = conn.execute(sa.text(f"SELECT function_id FROM {prefix}operation_outputs"))
            return int(version or 0), int(fid.scalar_one())

    try:
        for executor, host, pid in (
            ("old-here", socket.gethostname(), sleeper.pid),
            ("old-elsewhere", "another-host", dead_pid),
        ):
            as_version_7_with(executor, host, pid, now)
            DBOS(config=config(db_url))
            with pytest.raises(DBOSConfigError, match=f"still run on it: '{executor}' \\(process"):
                DBOS.launch()
            DBOS.destroy()
            assert upgraded() == (7, 0)  # nothing changed
        sleeper.kill()
        sleeper.wait()
        for executor, host, pid, heartbeat in (
            ("dead-here", socket.gethostname(), sleeper.pid, now),
            ("silent-elsewhere", "another-host", 1, now - 11_000),  # its lease ran out
        ):
            as_version_7_with(executor, host, pid, heartbeat)
            DBOS(config=config(db_url))
            DBOS.launch()
            DBOS.destroy()
            assert upgraded() == (SCHEMA_VERSION, 1)
    finally:
        sleeper.kill()
        sleeper.wait()
        db.dispose()
