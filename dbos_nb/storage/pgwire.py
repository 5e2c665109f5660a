"""PostgreSQL's hot statements sent through libpq's own calls (`psycopg.pq`), not a cursor.

A queue's work sends three or four short statements per workflow. Through psycopg's cursors each
costs 50-80 microseconds of Python (the cursor, query conversion, the pipeline's bookkeeping,
the result's description) that, under the GIL, every other thread of the process waits for:
more than PostgreSQL takes to run it. Here the statements of one call go to libpq directly, in
one pipeline (one round trip), each as a named prepared statement (prepared on a connection the
first time it is sent there), with psycopg's own adapters (`Transformer`, compiled C in
psycopg-binary) converting parameters and rows: the same values, types and errors as through a
cursor, for about a quarter of the Python.

Only what the system store's hot path needs: statements with `%(name)s` parameters (as
SQLAlchemy compiles them for psycopg), run on an autocommit connection that this thread owns,
alone or as one transaction. A statement that fails raises psycopg's error for it, and the
connection is left idle (the transaction rolled back); any other failure on the way (the
connection broke, the thread was interrupted) closes the connection, so that nothing half-sent
is ever committed and the pool drops it.
"""

from __future__ import annotations

import re
import select
import threading
import weakref
from collections.abc import Sequence
from typing import Any, NamedTuple

import psycopg
from psycopg import pq
from psycopg.adapt import PyFormat, Transformer

Row = tuple[Any, ...]
Statement = tuple[str, dict[str, Any]]

_OK = pq.ExecStatus.COMMAND_OK
_TUPLES = pq.ExecStatus.TUPLES_OK
_SYNC = pq.ExecStatus.PIPELINE_SYNC
_FATAL = pq.ExecStatus.FATAL_ERROR
_IDLE = pq.TransactionStatus.IDLE
# "prepared statement does not exist": the session lost what this module prepared on it.
_LOST_PREPARED = "26000"

_PLACEHOLDER = re.compile(r"%\((\w+)\)s|%%")


def supported() -> bool:
    """Whether libpq has pipeline mode (libpq 14 and later)."""
    return psycopg.Pipeline.is_supported()


class _Conversion(NamedTuple):
    query: bytes  # with $1, $2, ... placeholders
    order: tuple[str, ...]  # parameter names in placeholder order
    formats: list[PyFormat]


_conversions: dict[str, _Conversion] = {}
_conversions_lock = threading.Lock()


def _convert(sql: str) -> _Conversion:
    """`sql` with psycopg's `%(name)s` placeholders as PostgreSQL's `$n` (cached: statements
    are constants of the code)."""
    found = _conversions.get(sql)
    if found is not None:
        return found
    order: list[str] = []

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:  # `%%`: a literal percent sign
            return "%"
        if name not in order:
            order.append(name)
        return f"${order.index(name) + 1}"

    query = _PLACEHOLDER.sub(number, sql)
    found = _Conversion(query.encode(), tuple(order), [PyFormat.AUTO] * len(order))
    with _conversions_lock:
        if len(_conversions) > 10_000:  # only constants belong here; never grow without end
            _conversions.clear()
        _conversions[sql] = found
    return found


class _Session:
    """What this module keeps per connection: the names it prepared there and an adapter."""

    __slots__ = ("counter", "names", "transformer")

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.transformer = Transformer(conn)
        # (query, parameter types) -> statement name; psycopg's own are named `_pg3_<n>`.
        self.names: dict[tuple[bytes, tuple[int, ...]], bytes] = {}
        self.counter = 0


_sessions: weakref.WeakKeyDictionary[psycopg.Connection[Any], _Session] = (
    weakref.WeakKeyDictionary()
)
_sessions_lock = threading.Lock()


def _session(conn: psycopg.Connection[Any]) -> _Session:
    session = _sessions.get(conn)
    if session is None:
        session = _Session(conn)
        with _sessions_lock:
            _sessions[conn] = session
    return session


def run(
    conn: psycopg.Connection[Any], statements: Sequence[Statement], *, transaction: bool
) -> list[list[Row]]:
    """Run `statements` (SQL with `%(name)s` parameters, and their values) in one round trip;
    each one's rows (none for a statement without rows). With `transaction`, between BEGIN and
    COMMIT: all or nothing. Without, each commits on its own (autocommit)."""
    try:
        return _run(conn, statements, transaction)
    except psycopg.Error as exc:
        if exc.sqlstate != _LOST_PREPARED:
            raise
    # Something (DISCARD ALL, DEALLOCATE) removed this module's statements from the session:
    # prepare them again. Nothing was written: the statement failed when it was bound.
    _session(conn).names.clear()
    return _run(conn, statements, transaction)


def _run(
    conn: psycopg.Connection[Any], statements: Sequence[Statement], transaction: bool
) -> list[list[Row]]:
    pgconn = conn.pgconn
    if pgconn.transaction_status != _IDLE:
        raise psycopg.ProgrammingError("pgwire needs an idle connection in autocommit")
    session = _session(conn)
    try:
        pending = _send(pgconn, session, statements, transaction)
        results, error = _receive(conn, pgconn, session, pending, len(statements))
    except BaseException:
        # Half sent or half read: only closing the connection makes sure nothing of it is
        # committed (the server rolls back what it had), and tells the pool to drop it.
        conn.close()
        raise
    if error is not None:
        if pgconn.transaction_status != _IDLE:
            conn.rollback()
        raise error
    return results


# What each result of the pipeline answers: a statement's rows (its index), the preparation of
# a statement (its key and name), or a BEGIN/COMMIT (None).
_Expected = int | tuple[tuple[bytes, tuple[int, ...]], bytes] | None


def _send(
    pgconn: Any, session: _Session, statements: Sequence[Statement], transaction: bool
) -> list[_Expected]:
    transformer = session.transformer
    pending: list[_Expected] = []
    pgconn.enter_pipeline_mode()
    if transaction:
        pgconn.send_query_params(b"BEGIN", None)
        pending.append(None)
    for index, (sql, params) in enumerate(statements):
        conversion = _convert(sql)
        try:
            values = [params[name] for name in conversion.order]
        except KeyError:
            missing = [name for name in conversion.order if name not in params]
            raise ValueError(f"no value for parameters {missing} of: {sql}") from None
        buffers = transformer.dump_sequence(values, conversion.formats)
        types = tuple(transformer.types or ())
        key = (conversion.query, types)
        name = session.names.get(key)
        if name is None:
            name = b"_dbos_nb_%d" % session.counter
            session.counter += 1
            pgconn.send_prepare(name, conversion.query, param_types=types)
            pending.append((key, name))
        pgconn.send_query_prepared(name, buffers, param_formats=transformer.formats)
        pending.append(index)
    if transaction:
        pgconn.send_query_params(b"COMMIT", None)
        pending.append(None)
    pgconn.pipeline_sync()
    return pending


def _receive(
    conn: psycopg.Connection[Any],
    pgconn: Any,
    session: _Session,
    pending: list[_Expected],
    count: int,
) -> tuple[list[list[Row]], psycopg.Error | None]:
    fileno = pgconn.socket
    while pgconn.flush():  # send all (reading meanwhile, so that neither side's buffer fills)
        if _wait(fileno, write=True):
            pgconn.consume_input()
    transformer = session.transformer
    results: list[list[Row]] = [[] for _ in range(count)]
    error: psycopg.Error | None = None
    encoding = conn.info.encoding
    for expected in pending:
        result = _next_result(pgconn, fileno)
        while _next_result(pgconn, fileno) is not None:  # each command's results end with None
            pass
        status = result.status
        if status == _FATAL:
            if error is None:
                error = psycopg.errors.error_from_result(result, encoding=encoding)
        elif isinstance(expected, int):
            if status == _TUPLES:
                transformer.set_pgresult(result)
                results[expected] = transformer.load_rows(0, result.ntuples, tuple)
        elif expected is not None and status == _OK:
            key, name = expected
            session.names[key] = name
    sync = _next_result(pgconn, fileno)
    if sync.status != _SYNC:
        raise psycopg.InternalError(f"unexpected result at the end of a pipeline: {sync.status}")
    pgconn.exit_pipeline_mode()
    return results, error


def _next_result(pgconn: Any, fileno: int) -> Any:
    while pgconn.is_busy():
        _wait(fileno, write=False)
        pgconn.consume_input()
    return pgconn.get_result()


def _wait(fileno: int, write: bool) -> bool:
    """Block until the socket can be read (or, with `write`, written); whether it can be read.
    poll() where there is one: select() refuses descriptors from 1024 on."""
    if _HAS_POLL:
        poller = select.poll()
        poller.register(fileno, select.POLLIN | select.POLLOUT if write else select.POLLIN)
        events = poller.poll()
        return any(mask & (select.POLLIN | select.POLLERR | select.POLLHUP) for _, mask in events)
    readable, _, _ = select.select([fileno], [fileno] if write else [], [])
    return bool(readable)


_HAS_POLL = hasattr(select, "poll")
