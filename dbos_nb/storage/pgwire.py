"""PostgreSQL's hot statements sent through libpq's own calls (`psycopg.pq`), not a cursor.

A queue's work sends three or four short statements per workflow. Through psycopg's cursors each
costs 50-80 microseconds of Python (the cursor, query conversion, the pipeline's bookkeeping,
the result's description) that, under the GIL, every other thread of the process waits for:
more than PostgreSQL takes to run it. Here the statements of one call go to libpq directly, in
one round trip (several in one pipeline), each as a named prepared statement (prepared on a
connection the first time it is sent there), with psycopg's own adapters (`Transformer`,
compiled C in psycopg-binary) converting parameters and rows: the same values, types and
errors as through a cursor, for about a quarter of the Python.

Only what the system store's hot path needs: statements with `%(name)s` parameters (as
SQLAlchemy compiles them for psycopg), run on an autocommit connection that this thread owns,
as one transaction. A statement that fails raises psycopg's error for it, and the connection
is left idle (the transaction rolled back); a failure on the way (the connection broke, the
thread was interrupted) closes the connection, so that nothing half-sent ever commits and the
pool drops it.
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


def run(conn: psycopg.Connection[Any], statements: Sequence[Statement]) -> list[list[Row]]:
    """Run `statements` (SQL with `%(name)s` parameters, and their values) in one round trip
    and one transaction (the pipeline's implicit one: all or nothing); each one's rows (none
    for a statement without rows)."""
    try:
        return _run(conn, statements)
    except psycopg.Error as exc:
        if exc.sqlstate != _LOST_PREPARED:
            raise
    # Something (DISCARD ALL, DEALLOCATE) removed this module's statements from the session:
    # prepare them again. Nothing was written: the statement failed when it was bound.
    _session(conn).names.clear()
    return _run(conn, statements)


class _Bound(NamedTuple):
    name: bytes
    query: bytes | None  # to prepare first, under `name` (None: prepared already)
    key: tuple[bytes, tuple[int, ...]]
    buffers: Sequence[Any]
    formats: Sequence[Any] | None


def _run(conn: psycopg.Connection[Any], statements: Sequence[Statement]) -> list[list[Row]]:
    pgconn = conn.pgconn
    if not conn.autocommit or pgconn.transaction_status != _IDLE:
        raise psycopg.ProgrammingError("pgwire needs an idle connection in autocommit")
    session = _session(conn)
    # Every parameter is converted before anything is sent: a value psycopg refuses (a NUL
    # character in text) or a missing one fails here, with the connection untouched.
    bound = [_bind(session, sql, params) for sql, params in statements]
    try:
        if len(bound) == 1:
            results, error = _run_alone(conn, pgconn, session, bound[0])
        else:
            _send(pgconn, bound)
            results, error = _receive(conn, pgconn, session, bound)
    except BaseException:
        # Half sent or half read (the connection broke, the thread was interrupted): only
        # closing the connection makes sure nothing of it commits (the server rolls back the
        # pipeline's transaction, never closed by its Sync), and tells the pool to drop it.
        conn.close()
        raise
    if error is not None:
        raise error
    return results


def _bind(session: _Session, sql: str, params: dict[str, Any]) -> _Bound:
    conversion = _convert(sql)
    try:
        values = [params[name] for name in conversion.order]
    except KeyError:
        missing = [name for name in conversion.order if name not in params]
        raise ValueError(f"no value for parameters {missing} of: {sql}") from None
    transformer = session.transformer
    buffers = transformer.dump_sequence(values, conversion.formats)
    types = tuple(transformer.types or ())
    key = (conversion.query, types)
    name = session.names.get(key)
    if name is not None:
        return _Bound(name, None, key, buffers, transformer.formats)
    # Named for this session; psycopg's own are `_pg3_<n>`. Recorded as prepared only once
    # the server says so (a preparation after a failure in the pipeline is skipped).
    name = b"_dbos_nb_%d" % session.counter
    session.counter += 1
    return _Bound(name, conversion.query, key, buffers, transformer.formats)


def _run_alone(
    conn: psycopg.Connection[Any], pgconn: Any, session: _Session, statement: _Bound
) -> tuple[list[list[Row]], psycopg.Error | None]:
    """One statement, outside pipeline mode: libpq then sends it with the GIL released (a
    send on a loopback socket takes 15-20 microseconds, which the other threads can use),
    where in pipeline mode the Sync sends with the GIL held. A statement not yet prepared on
    this connection costs one more round trip, once."""
    fileno = pgconn.socket
    if statement.query is not None:
        pgconn.send_prepare(statement.name, statement.query, param_types=statement.key[1])
        _flush(pgconn, fileno)
        result = _result(pgconn, fileno)
        if result.status != _OK:
            return [[]], psycopg.errors.error_from_result(result, encoding=conn.info.encoding)
        session.names[statement.key] = statement.name
    pgconn.send_query_prepared(statement.name, statement.buffers, param_formats=statement.formats)
    _flush(pgconn, fileno)
    result = _result(pgconn, fileno)
    if result.status == _TUPLES:
        transformer = session.transformer
        transformer.set_pgresult(result)
        return [transformer.load_rows(0, result.ntuples, tuple)], None
    if result.status == _FATAL:
        return [[]], psycopg.errors.error_from_result(result, encoding=conn.info.encoding)
    return [[]], None


def _flush(pgconn: Any, fileno: int) -> None:
    """Send all that libpq holds (reading meanwhile, so that neither side's buffer fills)."""
    while pgconn.flush():
        if _wait(fileno, write=True):
            pgconn.consume_input()


def _send(pgconn: Any, bound: list[_Bound]) -> None:
    pgconn.enter_pipeline_mode()
    for statement in bound:
        if statement.query is not None:
            pgconn.send_prepare(statement.name, statement.query, param_types=statement.key[1])
        pgconn.send_query_prepared(
            statement.name, statement.buffers, param_formats=statement.formats
        )
    pgconn.pipeline_sync()
    _flush(pgconn, pgconn.socket)


def _receive(
    conn: psycopg.Connection[Any], pgconn: Any, session: _Session, bound: list[_Bound]
) -> tuple[list[list[Row]], psycopg.Error | None]:
    fileno = pgconn.socket
    transformer = session.transformer
    results: list[list[Row]] = []
    error: psycopg.Error | None = None
    for statement in bound:
        if statement.query is not None:
            prepared = _result(pgconn, fileno)
            if prepared.status == _OK:
                session.names[statement.key] = statement.name
            elif prepared.status == _FATAL and error is None:
                error = psycopg.errors.error_from_result(prepared, encoding=conn.info.encoding)
        result = _result(pgconn, fileno)
        status = result.status
        if status == _TUPLES:
            transformer.set_pgresult(result)
            results.append(transformer.load_rows(0, result.ntuples, tuple))
        else:
            if status == _FATAL and error is None:
                error = psycopg.errors.error_from_result(result, encoding=conn.info.encoding)
            results.append([])
    sync = _next_result(pgconn, fileno)
    if sync is None or sync.status != _SYNC:
        raise psycopg.InternalError("a pipeline did not end with its Sync")
    pgconn.exit_pipeline_mode()
    return results, error


def _result(pgconn: Any, fileno: int) -> Any:
    """The result of the next command in the pipeline (each command's results end with None)."""
    result = _next_result(pgconn, fileno)
    while _next_result(pgconn, fileno) is not None:
        pass
    return result


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
