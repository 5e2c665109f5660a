"""Statements compiled once and run on the driver's connection (`storage/prepared.py`), and the
driver-level transactions the group committer runs them in: the same rows and the same
SQLAlchemy errors as `Connection.execute`, on both backends."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from sqlalchemy import bindparam, insert, select, text, update
from sqlalchemy.exc import IntegrityError

from dbos_nb.storage.database import Database
from dbos_nb.storage.migrations import migrate
from dbos_nb.storage.prepared import Prepared
from dbos_nb.storage.schema import operation_outputs as oo
from dbos_nb.storage.schema import workflow_status as ws

_COLUMNS = ("workflow_uuid", "function_id", "function_name", "output")
_INSERT = (
    insert(oo).values({c: bindparam(c) for c in _COLUMNS}).returning(oo.c.function_id, oo.c.output)
)


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    migrate(database)
    yield database
    database.dispose()


def _steps(db: Database, wid: str) -> list[tuple[int, bytes | None]]:
    with db.read() as conn:
        rows = conn.execute(
            select(oo.c.function_id, oo.c.output)
            .where(oo.c.workflow_uuid == wid)
            .order_by(oo.c.function_id)
        ).all()
    return [(r[0], r[1]) for r in rows]


def test_a_prepared_statement_writes_and_returns_what_sqlalchemy_would(db: Database) -> None:
    row = db.grouped(
        _INSERT,
        {"workflow_uuid": "p1", "function_id": 3, "function_name": "s", "output": b"\x00bytes"},
    )
    assert row == (3, b"\x00bytes")
    # Values written into the statement (here 'PENDING') travel as parameters.
    stmt = (
        update(ws)
        .where(ws.c.workflow_uuid == bindparam("wid"), ws.c.status == "PENDING")
        .values(status="SUCCESS")
        .returning(ws.c.status)
    )
    assert db.grouped(stmt, {"wid": "nobody"}) is None
    assert _steps(db, "p1") == [(3, b"\x00bytes")]
    assert db.prepared(_INSERT) is db.prepared(_INSERT)  # compiled once


@pytest.mark.parametrize(
    "value", [b"\x00raw", bytearray(b"\x01array"), memoryview(b"\x02view"), None]
)
def test_bytes_like_values_and_none_are_stored_as_bytes(
    db: Database, value: bytes | bytearray | memoryview | None
) -> None:
    # On PostgreSQL these reach psycopg's own bytea adapters (no SQLAlchemy processor).
    row = db.grouped(
        _INSERT, {"workflow_uuid": "b1", "function_id": 1, "function_name": "s", "output": value}
    )
    expected = None if value is None else bytes(value)
    assert row == (1, expected)
    assert _steps(db, "b1") == [(1, expected)]


def test_all_rows_and_statements_without_rows(db: Database) -> None:
    """`all()` gives every row (claims read many); a write without RETURNING gives none, on a
    statement whose kind is known when it is compiled, and a text statement is asked."""
    for fid in (1, 2, 3):
        db.grouped(
            _INSERT,
            {"workflow_uuid": "p2", "function_id": fid, "function_name": "s", "output": b""},
        )
    query = db.prepared(
        select(oo.c.function_id)
        .where(oo.c.workflow_uuid == bindparam("wid"))
        .order_by("function_id")
    )
    plain = db.prepared(
        update(oo).where(oo.c.workflow_uuid == bindparam("wid")).values(output=b"x")
    )
    raw_select = db.prepared(text("SELECT 7"))
    assert (query._returns_rows, plain._returns_rows, raw_select._returns_rows) == (
        True,
        False,
        None,  # asks the cursor
    )
    with db.driver_write() if not db.is_postgres else db.driver_single() as conn:
        assert query.all(conn, {"wid": "p2"}) == [(1,), (2,), (3,)]
        assert plain.first(conn, {"wid": "p2"}) is None
        assert raw_select.all(conn, {}) == [(7,)]
    assert _steps(db, "p2") == [(1, b"x"), (2, b"x"), (3, b"x")]


def test_a_constraint_violation_is_sqlalchemys_integrity_error_and_nothing_is_lost(
    db: Database,
) -> None:
    params = {"workflow_uuid": "p2", "function_id": 1, "function_name": "s", "output": b"first"}
    db.grouped(_INSERT, params)
    with pytest.raises(IntegrityError):
        db.grouped(_INSERT, {**params, "output": b"second"})
    assert _steps(db, "p2") == [(1, b"first")]
    # The connection is still usable after the failed statement.
    db.grouped(_INSERT, {**params, "function_id": 2, "output": b"third"})
    assert _steps(db, "p2") == [(1, b"first"), (2, b"third")]


def test_a_missing_parameter_names_itself(db: Database) -> None:
    with pytest.raises(ValueError, match="output"):
        db.grouped(_INSERT, {"workflow_uuid": "p3", "function_id": 1, "function_name": "s"})
    assert _steps(db, "p3") == []


def test_expanding_parameters_are_refused(db: Database) -> None:
    stmt = select(oo.c.function_id).where(oo.c.workflow_uuid.in_(bindparam("ids", expanding=True)))
    with pytest.raises(ValueError, match="expanding"):
        Prepared(stmt, db.engine.dialect)


def test_a_failed_driver_transaction_writes_nothing(tmp_path: object) -> None:
    """SQLite: a batch that fails half-way rolls back as a whole (the committer then retries
    each statement alone). (PostgreSQL runs each statement in autocommit.)"""
    db = Database(f"sqlite:///{tmp_path}/rollback.sqlite")
    migrate(db)
    first = {"workflow_uuid": "p4", "function_id": 1, "function_name": "s", "output": None}
    prepared = db.prepared(_INSERT)
    with pytest.raises(IntegrityError), db.driver_write() as conn:
        prepared.first(conn, first)
        prepared.first(conn, first)  # a duplicate key: the whole transaction rolls back
    assert _steps(db, "p4") == []
    db.grouped(_INSERT, first)  # the connection is usable again
    assert _steps(db, "p4") == [(1, None)]
    db.dispose()


def test_a_forked_child_opens_its_own_connection(tmp_path: object) -> None:
    """The hot SQLite connection is per process: a child writes through a connection of its
    own, and the parent's keeps working."""
    db = Database(f"sqlite:///{tmp_path}/fork.sqlite")
    migrate(db)
    params = {"workflow_uuid": "p5", "function_id": 1, "function_name": "s", "output": None}
    db.grouped(_INSERT, params)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code
        try:
            db.grouped(_INSERT, {**params, "function_id": 2})
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    db.grouped(_INSERT, {**params, "function_id": 3})
    assert [r[0] for r in _steps(db, "p5")] == [1, 2, 3]
    db.dispose()
