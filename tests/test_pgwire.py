"""PostgreSQL statements sent to libpq directly (`storage/pgwire.py`): the same values and the
same errors as psycopg's cursors, all or nothing as a transaction, and a connection that is
either left idle and usable or closed, never half way through a pipeline."""

from __future__ import annotations

import gc
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy.exc import OperationalError

from conftest import create_pg_database, drop_pg_database
from dbos_nb.storage import pgwire
from dbos_nb.storage.database import Database
from dbos_nb.storage.migrations import migrate
from dbos_nb.storage.reconnect import is_connection_error

_TABLE = """
CREATE TABLE items (
    id integer PRIMARY KEY, name text, data bytea, big bigint, flag boolean, ratio double precision
)
"""
_INSERT = (
    "INSERT INTO items (id, name, data, big, flag, ratio) "
    "VALUES (%(id)s, %(name)s, %(data)s, %(big)s, %(flag)s, %(ratio)s) RETURNING id"
)
_SELECT = "SELECT id, name, data, big, flag, ratio FROM items WHERE id = ANY(%(ids)s) ORDER BY id"


@pytest.fixture
def dsn(pg_server_url: str) -> Iterator[str]:
    url = create_pg_database(pg_server_url)
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(_TABLE)
        # Checked at commit: an error that comes after the statement's own answer.
        connection.execute("CREATE TABLE deferred (v integer UNIQUE DEFERRABLE INITIALLY DEFERRED)")
    try:
        yield url
    finally:
        drop_pg_database(pg_server_url, url)


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(dsn, autocommit=True) as connection:
        yield connection


def _item(i: int, **changes: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "id": i,
        "name": f"näme {i} ✓",
        "data": bytes([0, 255, i % 256]) * 3,
        "big": 2**40 + i,
        "flag": i % 2 == 0,
        "ratio": i / 3,
    }
    values.update(changes)
    return values


def _count(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT count(*) FROM items").fetchone()
    assert row is not None
    return int(row[0])


def test_values_go_and_come_back_as_through_a_cursor(conn: psycopg.Connection[Any]) -> None:
    items = [_item(1), _item(2, name=None, data=None, big=None, flag=None, ratio=None), _item(3)]
    answers = pgwire.run(conn, [(_INSERT, item) for item in items])
    assert answers == [[(1,)], [(2,)], [(3,)]]
    rows = pgwire.run(conn, [(_SELECT, {"ids": [1, 2, 3]})])[0]
    with conn.cursor() as cursor:
        cursor.execute(_SELECT, {"ids": [1, 2, 3]})
        assert rows == cursor.fetchall()
    assert rows[0] == (1, "näme 1 ✓", bytes([0, 255, 1]) * 3, 2**40 + 1, False, 1 / 3)
    assert rows[1] == (2, None, None, None, None, None)
    # Run again: the statements are prepared on this connection by now, same answers.
    assert pgwire.run(conn, [(_SELECT, {"ids": [3]})])[0] == [rows[2]]
    # A statement without rows answers an empty list; a literal percent sign survives.
    assert pgwire.run(
        conn,
        [
            ("UPDATE items SET name = %(n)s WHERE id = 1", {"n": "x"}),
            ("SELECT name || '%%' FROM items WHERE id = 1", {}),
        ],
    ) == [[], [("x%",)]]


def test_a_failing_statement_raises_its_error_and_writes_nothing_of_its_call(
    conn: psycopg.Connection[Any],
) -> None:
    pgwire.run(conn, [(_INSERT, _item(1))])
    with pytest.raises(psycopg.errors.UniqueViolation):
        pgwire.run(conn, [(_INSERT, _item(2)), (_INSERT, _item(1)), (_INSERT, _item(3))])
    assert _count(conn) == 1  # items 2 and 3 went with their transaction
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert not conn.closed
    assert pgwire.run(conn, [(_INSERT, _item(4)), (_SELECT, {"ids": [4]})])[0] == [(4,)]


def test_values_refused_before_sending_leave_the_connection_untouched(
    conn: psycopg.Connection[Any],
) -> None:
    # psycopg refuses a NUL character in text; every value is converted before anything goes.
    statements = [(_INSERT, _item(i)) for i in range(5)] + [(_INSERT, _item(9, name="a\x00b"))]
    with pytest.raises(psycopg.DataError):
        pgwire.run(conn, statements)
    with pytest.raises(ValueError, match=r"no value for parameters \['ratio'\]"):
        pgwire.run(conn, [(_INSERT, {k: v for k, v in _item(1).items() if k != "ratio"})])
    assert not conn.closed
    assert _count(conn) == 0
    assert pgwire.run(conn, [(_INSERT, _item(1))]) == [[(1,)]]


@pytest.mark.parametrize("statements", [1, 2], ids=["alone", "pipeline"])
def test_a_connection_lost_before_a_call_raises_and_is_closed(
    conn: psycopg.Connection[Any], dsn: str, statements: int
) -> None:
    """The error is an OperationalError in both paths (a lone statement goes through one
    blocking libpq call, a pipeline through psycopg's reads): the reconnecting layer takes
    it for a lost connection, not for the statement's failure."""
    pgwire.run(conn, [(_INSERT, _item(1))])
    with psycopg.connect(dsn, autocommit=True) as other:
        other.execute("SELECT pg_terminate_backend(%s)", [conn.info.backend_pid])
        with pytest.raises(psycopg.OperationalError) as raised:
            pgwire.run(conn, [(_INSERT, _item(i)) for i in range(2, 2 + statements)])
        assert is_connection_error(raised.value)
        assert conn.closed  # a pool drops it (`Database.driver_single`)
        assert _count(other) == 1


def test_a_pipeline_interrupted_before_its_sync_commits_nothing(
    conn: psycopg.Connection[Any], dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interrupted while queuing its statements: those already queued reach the server when
    the connection is closed, but without the Sync that would commit them."""
    sent: list[Any] = []
    send_one = pgwire._send_one

    def interrupted(pgconn: Any, statement: Any) -> None:
        if sent:
            raise KeyboardInterrupt
        sent.append(statement)
        send_one(pgconn, statement)

    monkeypatch.setattr(pgwire, "_send_one", interrupted)
    backend = conn.info.backend_pid
    with pytest.raises(KeyboardInterrupt):
        pgwire.run(conn, [(_INSERT, _item(1)), (_INSERT, _item(2))])
    assert conn.closed and len(sent) == 1
    with psycopg.connect(dsn, autocommit=True) as other:
        deadline = time.monotonic() + 10
        while other.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", [backend]).fetchone():
            assert time.monotonic() < deadline, "the abandoned session did not end"
            time.sleep(0.01)
        assert _count(other) == 0


@pytest.mark.parametrize(
    ("wrong", "error"),
    [
        # Refused when prepared: its Parse fails (in a pipeline, its execution is "aborted").
        (
            ("SELECT nothing FROM items WHERE id = %(id)s", {"id": 1}),
            psycopg.errors.UndefinedColumn,
        ),
        # Refused at commit, after the statement's own answer.
        (
            ("INSERT INTO deferred (v) VALUES (%(v)s), (%(v)s)", {"v": 7}),
            psycopg.errors.UniqueViolation,
        ),
    ],
    ids=["at-prepare", "at-commit"],
)
def test_an_error_is_raised_alone_or_in_a_pipeline(
    conn: psycopg.Connection[Any], wrong: Any, error: type[Exception]
) -> None:
    with pytest.raises(error):
        pgwire.run(conn, [wrong])
    with pytest.raises(error):
        pgwire.run(conn, [(_INSERT, _item(1)), wrong])
    assert _count(conn) == 0 and not conn.closed
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert pgwire.run(conn, [(_INSERT, _item(1)), (_INSERT, _item(2))]) == [[(1,)], [(2,)]]


def test_each_statement_is_prepared_once_per_connection(
    conn: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    def prepared() -> int:
        row = conn.execute(
            "SELECT count(*) FROM pg_prepared_statements WHERE name LIKE '\\_dbos\\_nb\\_%%'"
        ).fetchone()
        assert row is not None
        return int(row[0])

    pgwire.run(conn, [(_INSERT, _item(i)) for i in range(3)])  # the same statement thrice
    pgwire.run(conn, [(_INSERT, _item(3))])
    assert prepared() == 1
    # Past the limit, further statements run unnamed, with the same answers.
    monkeypatch.setattr(pgwire, "_MAX_PREPARED", 1)
    assert pgwire.run(conn, [(_SELECT, {"ids": [3]})])[0][0][0] == 3
    assert pgwire.run(conn, [(_SELECT, {"ids": [1]}), (_INSERT, _item(4))]) == [
        [pgwire.run(conn, [(_SELECT, {"ids": [1]})])[0][0]],
        [(4,)],
    ]
    assert prepared() == 1


def test_a_closed_connection_is_freed(dsn: str) -> None:
    connection = psycopg.connect(dsn, autocommit=True)
    pgwire.run(connection, [(_INSERT, _item(1))])
    ref = weakref.ref(connection)
    connection.close()
    del connection
    gc.collect()
    assert ref() is None


def test_only_an_idle_connection_in_autocommit_is_used(
    conn: psycopg.Connection[Any], dsn: str
) -> None:
    conn.execute("BEGIN")
    with pytest.raises(psycopg.ProgrammingError, match="idle connection in autocommit"):
        pgwire.run(conn, [(_INSERT, _item(1))])
    conn.execute("ROLLBACK")
    with psycopg.connect(dsn) as transactional, pytest.raises(psycopg.ProgrammingError):
        pgwire.run(transactional, [(_INSERT, _item(1))])
    assert _count(conn) == 0


def test_statements_dropped_by_the_session_are_prepared_again(
    conn: psycopg.Connection[Any],
) -> None:
    pgwire.run(conn, [(_INSERT, _item(1))])
    conn.execute("DEALLOCATE ALL")
    assert pgwire.run(conn, [(_INSERT, _item(5))]) == [[(5,)]]  # alone
    conn.execute("DEALLOCATE ALL")
    assert pgwire.run(conn, [(_INSERT, _item(2)), (_SELECT, {"ids": [2]})])[0] == [(2,)]
    assert _count(conn) == 3


def test_a_large_pipeline_neither_blocks_nor_loses_answers(conn: psycopg.Connection[Any]) -> None:
    # Megabytes each way: sending must read the answers meanwhile, or both sides' buffers fill.
    big = b"x" * 20_000
    statements = [(_INSERT, _item(i, data=big)) for i in range(600)]
    answers = pgwire.run(conn, statements)
    assert answers == [[(i,)] for i in range(600)]
    rows = pgwire.run(conn, [(_SELECT, {"ids": list(range(600))})])[0]
    assert len(rows) == 600 and all(r[2] == big for r in rows)


def test_database_drops_a_broken_connection_and_reuses_sound_ones(pg_server_url: str) -> None:
    url = create_pg_database(pg_server_url)
    db = Database(url)
    try:
        migrate(db)
        with db.driver_single() as first:
            pass
        with db.driver_single() as again:
            assert again is first  # kept between uses, not returned to SQLAlchemy's pool
        with psycopg.connect(url, autocommit=True) as other:
            other.execute("SELECT pg_terminate_backend(%s)", [first.info.backend_pid])
        with pytest.raises(OperationalError), db.driver_single() as conn:
            pgwire.run(conn, [("SELECT 1", {})])
        with db.driver_single() as fresh:
            assert fresh is not first and not fresh.closed
            assert pgwire.run(fresh, [("SELECT 1 AS one", {})]) == [[(1,)]]
    finally:
        db.dispose()
        drop_pg_database(pg_server_url, url)


def _invalidations(db: Database) -> list[int]:
    """Counts connections the pools of `db` close for good (invalidate)."""
    from sqlalchemy import event

    count = [0]

    def counted(*_args: Any) -> None:
        count[0] += 1

    for engine in db._engines:
        event.listen(engine, "invalidate", counted)
    return count


def test_which_messages_mark_a_connection_for_closing(dsn: str) -> None:
    """A large message either way marks the connection (its buffers grew): a statement's
    parameters sent, or a row of byte strings received, alone or in a pipeline. Messages that
    are each small do not, however much they add up to: many rows, many statements."""
    big = pgwire.LARGE_MESSAGE_BYTES
    half = [("SELECT length(%(v)s::bytea)", {"v": b"x" * (big // 2)})]
    many_rows = "SELECT repeat('x', 8192)::bytea FROM generate_series(1, %(n)s)"
    made = "SELECT repeat('x', %(n)s)::bytea AS a, 'small'::bytea AS b"
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert pgwire.run(conn, half * 3) == [[(big // 2,)]] * 3  # 6 MiB sent, in 3 messages
        rows = pgwire.run(conn, [(many_rows, {"n": 1000})])[0]  # 8 MB received, in 1000 rows
        assert len(rows) == 1000
        assert not pgwire.needs_recycling(conn)
    for statements in ([(made, {"n": big})], [(made, {"n": 10}), (made, {"n": big})]):
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert len(pgwire.run(conn, statements)[-1][0][0]) == big
            assert pgwire.needs_recycling(conn)
    large = ("SELECT length(%(v)s::bytea)", {"v": b"y" * big})
    for statements in ([large], [half[0], large]):
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert pgwire.run(conn, statements)[-1] == [(big,)]
            assert pgwire.needs_recycling(conn)


def _echo_workflow(name: str) -> Callable[[bytes], int]:
    """A workflow `name` that hands its bytes to a step returning them (the value goes to the
    database as the workflow's input and as the step's output); returns their length."""
    from dbos_nb import DBOS

    @DBOS.step(name=f"{name}_step")
    def echo(data: bytes) -> bytes:
        return data

    @DBOS.workflow(name=name)
    def wf(data: bytes) -> int:
        return len(echo(data))

    return wf


@pytest.mark.parametrize("limited", [False, True], ids=["started-at-enqueue", "claimed"])
def test_a_connection_that_carried_a_large_value_is_closed_not_kept(
    launched_pg: str, limited: bool
) -> None:
    """libpq keeps a connection's buffers as large as the largest message it carried: once a
    workflow's inputs or outputs pass LARGE_MESSAGE_BYTES, the connections that carried them
    (enqueue, claim through SQLAlchemy, step record, outcome, the waiter's read) are closed when
    given back, and small values close none."""
    from dbos_nb import Queue
    from dbos_nb.core.runtime import get_runtime

    rt = get_runtime()
    closed = _invalidations(rt.db)
    wf = _echo_workflow("pgw_echo")

    # With a limit, the queued row is claimed by the scheduler, through SQLAlchemy.
    queue = Queue("pgw_big", concurrency=1 if limited else None)
    assert queue.enqueue(wf, b"s" * 1000).get_result() == 1000
    assert closed == [0]
    big = pgwire.LARGE_MESSAGE_BYTES + 1
    assert queue.enqueue(wf, b"b" * big).get_result() == big
    # The enqueue's, or the claim's (then the enqueue's too: its row went to a waiting queue), and
    # the writes' of the step and the outcome.
    assert closed[0] >= (3 if limited else 2)
    idle = rt.db._idle_single
    assert not any(pgwire.needs_recycling(fairy.driver_connection) for fairy in idle)


def test_large_values_leave_no_memory_behind(launched_pg: str) -> None:
    """A 64 MB value through a workflow and its step: once done, the process holds about what
    it held before (it held some 450 MB more while the pool kept the connections that carried
    a 50 MB value)."""
    from dbos_nb import Queue

    def rss_mb() -> int:
        with open("/proc/self/status") as status:
            return int(status.read().split("VmRSS:")[1].split()[0]) // 1024

    wf = _echo_workflow("pgw_mem")
    queue = Queue("pgw_mem")
    assert queue.enqueue(wf, b"w").get_result() == 1  # warm: threads and connections exist
    gc.collect()
    before = rss_mb()
    data = b"m" * (64 * 1024 * 1024)
    assert queue.enqueue(wf, data).get_result() == len(data)
    del data
    gc.collect()
    assert rss_mb() - before < 64
