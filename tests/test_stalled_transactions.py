"""A process frozen inside a transaction (SIGSTOP, a paused VM) must not hold PostgreSQL row
locks that other processes' claims and take-overs wait on for longer than the executor lease;
application transactions, which may compute between statements, are exempt. PostgreSQL only:
on SQLite a frozen writer holds the file's write lock until it resumes (see the README)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from conftest import config, create_pg_database, drop_pg_database
from dbos_nb import DBOS, Queue
from dbos_nb.core.runtime import get_runtime

LEASE = 1.0


@pytest.fixture
def pg_url(pg_server_url: str) -> Iterator[str]:
    url = create_pg_database(pg_server_url)
    yield url
    DBOS.destroy()
    drop_pg_database(pg_server_url, url)


def test_a_transaction_left_open_does_not_hold_claims_past_the_lease(pg_url: str) -> None:
    DBOS(config=config(pg_url, executor_lease_sec=LEASE, heartbeat_interval_sec=0.2))
    held = Queue("held", concurrency=1)  # a shared limit: every claim locks the queue's row

    @DBOS.workflow()
    def double(x: int) -> int:
        return 2 * x

    DBOS.launch()
    db = get_runtime().db
    # This thread plays a process frozen in the middle of a claim: the queue's row stays locked
    # and the transaction idle. The server ends that session after the lease; the real claim
    # that waited on the lock then goes on.
    with pytest.raises(sa.exc.DBAPIError, match="idle-in-transaction"), db.write() as conn:
        assert db.lock_queue_row(conn, "held") is not None
        handle = held.enqueue(double, 21)
        assert handle.get_result(timeout_sec=30) == 42
        conn.execute(sa.text("SELECT 1"))  # the frozen session is gone
    assert held.enqueue(double, 4).get_result(timeout_sec=30) == 8  # the pool recovered


def test_an_application_transaction_may_idle_longer_than_the_lease(pg_url: str) -> None:
    DBOS(config=config(pg_url, executor_lease_sec=LEASE, heartbeat_interval_sec=0.2))

    @DBOS.transaction()
    def slow_insert(name: str) -> int:
        session = DBOS.sql_session
        session.execute(sa.text("CREATE TABLE IF NOT EXISTS items (name TEXT)"))
        session.execute(sa.text("INSERT INTO items (name) VALUES (:n)"), {"n": name})
        time.sleep(LEASE * 1.5)  # computing between statements, inside the transaction
        return int(session.execute(sa.text("SELECT COUNT(*) FROM items")).scalar_one())

    @DBOS.workflow()
    def wf() -> int:
        return slow_insert("a")

    DBOS.launch()
    assert wf() == 1


def test_application_transactions_run_with_the_servers_settings(pg_url: str) -> None:
    """dbos_nb's sessions change some planner and timeout settings for its own statements;
    `@DBOS.transaction` code runs with what the server, database or role set instead."""
    dsn = sa.make_url(pg_url).set(drivername="postgresql+psycopg")
    engine = sa.create_engine(dsn)
    with engine.begin() as conn:  # a DBA's choice for this database
        conn.execute(sa.text(f'ALTER DATABASE "{dsn.database}" SET jit = off'))
        conn.execute(sa.text(f'ALTER DATABASE "{dsn.database}" SET enable_seqscan = on'))
    engine.dispose()
    DBOS(config=config(pg_url, executor_lease_sec=LEASE, heartbeat_interval_sec=0.2))
    query = sa.text(
        "SELECT current_setting('enable_seqscan'), current_setting('jit'),"
        " current_setting('idle_in_transaction_session_timeout')"
    )

    @DBOS.transaction()
    def settings() -> tuple[str, str, str]:
        row = DBOS.sql_session.execute(query).one()
        return (str(row[0]), str(row[1]), str(row[2]))

    DBOS.launch()
    assert settings() == ("on", "off", "0")
    with get_runtime().db.read() as conn:
        own = conn.execute(query).one()
    assert (own[0], own[1]) == ("off", "off")
    assert own[2] != "0"  # the stalled-transaction limit
    assert settings() == ("on", "off", "0")  # the pooled connection again
