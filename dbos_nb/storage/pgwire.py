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
thread was interrupted) drops the connection (see `_abandon`), and the pool with it.
"""

from __future__ import annotations

import re
import select
import threading
from collections.abc import Iterable, Sequence
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
_BAD = pq.ConnStatus.BAD
_BYTEA = 17  # the type's OID
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
    """What this module keeps per connection: the names it prepared there and an adapter.
    Kept on the connection itself (the adapter refers to the connection, so a weak mapping
    from connections would keep every one alive)."""

    __slots__ = ("bloated", "counter", "names", "transformer")

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.transformer = Transformer(conn)
        self.bloated = False  # carried a large message (see `needs_recycling`)
        # (query, parameter types) -> statement name; psycopg's own are named `_pg3_<n>`.
        self.names: dict[tuple[bytes, tuple[int, ...]], bytes] = {}
        self.counter = 0


_SESSION = "_dbos_nb_pgwire"
# Parameter types are part of a prepared statement (psycopg sends a small integer as int2, a
# large one as int8, None untyped), so a statement may be prepared in a few variants; past
# this many on one connection, further ones run unnamed (parsed at each run).
_MAX_PREPARED = 500


def _session(conn: psycopg.Connection[Any]) -> _Session:
    session: _Session | None = getattr(conn, _SESSION, None)
    if session is None:
        session = _Session(conn)
        setattr(conn, _SESSION, session)
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
    name: bytes  # b"": the unnamed statement, parsed with this run
    prepare: bool  # to prepare under `name` first
    query: bytes
    types: tuple[int, ...]
    buffers: Sequence[Any]
    formats: Sequence[Any] | None


def _run(conn: psycopg.Connection[Any], statements: Sequence[Statement]) -> list[list[Row]]:
    pgconn = conn.pgconn
    if not conn.autocommit or pgconn.transaction_status != _IDLE:
        raise psycopg.ProgrammingError("pgwire needs an idle connection in autocommit")
    session = _session(conn)
    # Every parameter is converted before anything is sent: a value psycopg refuses (a NUL
    # character in text) or a missing one fails here, with the connection untouched.
    preparing: dict[tuple[bytes, tuple[int, ...]], bytes] = {}
    bound = [_bind(session, preparing, sql, params) for sql, params in statements]
    try:
        if len(bound) == 1:
            results, error = _run_alone(conn, pgconn, session, bound[0])
        else:
            _send(pgconn, bound)
            results, error = _receive(conn, pgconn, session, bound)
    except BaseException:
        _abandon(conn)
        raise
    # Each statement's parameters went out in one message.
    _note_sizes(session, (sum(map(len, filter(None, b.buffers))) for b in bound))
    if error is not None:
        raise error
    return results


# libpq grows a connection's buffers to the largest message it sent or received and keeps them
# for the connection's life: a workflow that passed a 50 MB frame left each connection that
# carried it (the enqueue's, the step record's, the outcome's, the waiter's) holding 64-128 MB,
# 450 MB in all, for as long as the pool kept them. A connection that carried a message this
# large is closed when it is given back (see `needs_recycling`), which frees them. Many small
# messages in one pipeline do not count: libpq sends them as its buffer fills.
LARGE_MESSAGE_BYTES = 4 * 1024 * 1024


def _note_sizes(session: _Session, sizes: Iterable[int]) -> None:
    """Messages of these sizes went through the session's connection: a large one means its
    buffers grew (see LARGE_MESSAGE_BYTES)."""
    if any(size >= LARGE_MESSAGE_BYTES for size in sizes):
        session.bloated = True


def note_received(conn: psycopg.Connection[Any], values: Sequence[bytes | None]) -> None:
    """Byte strings read on `conn` through a cursor, each in a row of its own."""
    _note_sizes(_session(conn), (len(v) for v in values if v is not None))


def needs_recycling(conn: psycopg.Connection[Any]) -> bool:
    """Whether the connection carried a large message (see LARGE_MESSAGE_BYTES): close it
    rather than keep it idle."""
    session: _Session | None = getattr(conn, _SESSION, None)
    return session is not None and session.bloated


def _abandon(conn: psycopg.Connection[Any]) -> None:
    """Drop a connection left half way (broken, or its thread interrupted). Before the
    pipeline's Sync is queued nothing can commit: the server rolls back a transaction whose
    connection ends without one. Once the Sync is queued (libpq sends it at once), the outcome
    is the server's, as when a connection breaks at commit: the caller only knows that it
    failed, and a statement run again finds its own earlier write."""
    conn.close()


def _bind(
    session: _Session,
    preparing: dict[tuple[bytes, tuple[int, ...]], bytes],
    sql: str,
    params: dict[str, Any],
) -> _Bound:
    conversion = _convert(sql)
    try:
        values = [params[name] for name in conversion.order]
    except KeyError:
        missing = [name for name in conversion.order if name not in params]
        raise ValueError(f"no value for parameters {missing} of: {sql}") from None
    transformer = session.transformer
    buffers = transformer.dump_sequence(values, conversion.formats)
    types = tuple(transformer.types or ())
    formats = transformer.formats
    key = (conversion.query, types)
    name = session.names.get(key) or preparing.get(key)
    if name is not None:
        return _Bound(name, False, conversion.query, types, buffers, formats)
    if len(session.names) + len(preparing) >= _MAX_PREPARED:
        return _Bound(b"", False, conversion.query, types, buffers, formats)
    # Named for this session; psycopg's own are `_pg3_<n>`. Recorded as prepared only once
    # the server says so (a preparation after a failure in the pipeline is skipped).
    name = b"_dbos_nb_%d" % session.counter
    session.counter += 1
    preparing[key] = name
    return _Bound(name, True, conversion.query, types, buffers, formats)


def _send_one(pgconn: Any, statement: _Bound) -> None:
    if not statement.name:
        pgconn.send_query_params(
            statement.query,
            statement.buffers,
            param_types=statement.types,
            param_formats=statement.formats,
        )
        return
    if statement.prepare:
        pgconn.send_prepare(statement.name, statement.query, param_types=statement.types)
    pgconn.send_query_prepared(statement.name, statement.buffers, param_formats=statement.formats)


def _run_alone(
    conn: psycopg.Connection[Any], pgconn: Any, session: _Session, statement: _Bound
) -> tuple[list[list[Row]], psycopg.Error | None]:
    """One statement, outside pipeline mode, in one blocking libpq call (`PQexecPrepared`)
    that releases the GIL once, from the send to the whole answer. Sent, then waited for in
    Python (`poll`), it released the GIL twice: after the send's system call, and again after
    the wait; under load each time another thread's turn ran before the lock came back, and on
    the enqueuing thread (which paces a loop of enqueues) that cost a tenth of the throughput
    (benchmarks/README.md). The price: an interrupt (Ctrl-C, a notebook's interrupt button)
    takes effect when the server has answered, not during the wait. A statement not yet
    prepared on this connection costs one more round trip, once."""
    if statement.prepare:
        prepared = _blocking(
            pgconn, pgconn.prepare, statement.name, statement.query, statement.types
        )
        error = _failure(conn, prepared)
        if error is not None:
            return [[]], error
        session.names[(statement.query, statement.types)] = statement.name
    if statement.name:
        result = _blocking(
            pgconn, pgconn.exec_prepared, statement.name, statement.buffers, statement.formats
        )
    else:
        result = _blocking(
            pgconn,
            pgconn.exec_params,
            statement.query,
            statement.buffers,
            statement.types,
            statement.formats,
        )
    # A statement that succeeds and then fails at its commit (autocommit) answers with its
    # rows and then the error: libpq returns the last result, the error.
    return [_rows(session, result)], _failure(conn, result)


def _blocking(pgconn: Any, call: Any, *args: Any) -> Any:
    """A blocking libpq call's result. A connection that broke on the way is an
    OperationalError, as psycopg's own calls report it (the reconnecting layer looks for it):
    libpq then answers either no result at all (which psycopg reports as an OperationalError,
    or, in releases before 3.3, as MemoryError) or one without a SQLSTATE (which psycopg would
    call a DatabaseError)."""
    try:
        result = call(*args)
    except MemoryError:
        if pgconn.status != _BAD:
            raise
        result = None
    if pgconn.status == _BAD:
        detail = pgconn.error_message.decode(errors="replace").strip()
        raise psycopg.OperationalError(f"the connection to the server was lost: {detail}")
    return result


def _failure(conn: psycopg.Connection[Any], result: Any) -> psycopg.Error | None:
    """The error a blocking call's result reports, if any."""
    if result.status == _FATAL:
        return psycopg.errors.error_from_result(result, encoding=conn.info.encoding)
    return None


def _flush(pgconn: Any, fileno: int) -> None:
    """Send all that libpq holds (reading meanwhile, so that neither side's buffer fills)."""
    while pgconn.flush():
        if _wait(fileno, write=True):
            pgconn.consume_input()


def _first_input(pgconn: Any, fileno: int) -> None:
    """Wait for the server's first bytes after a send. Asking libpq first whether the answer
    is complete could only say no, and `is_busy` releases and retakes the GIL: under load
    each such hand-over waits for another thread's whole turn."""
    _wait(fileno, write=False)
    pgconn.consume_input()


def _send(pgconn: Any, bound: list[_Bound]) -> None:
    pgconn.enter_pipeline_mode()
    for statement in bound:
        _send_one(pgconn, statement)
    pgconn.pipeline_sync()
    _flush(pgconn, pgconn.socket)
    _first_input(pgconn, pgconn.socket)


def _receive(
    conn: psycopg.Connection[Any], pgconn: Any, session: _Session, bound: list[_Bound]
) -> tuple[list[list[Row]], psycopg.Error | None]:
    fileno = pgconn.socket
    results: list[list[Row]] = []
    error: psycopg.Error | None = None
    for statement in bound:
        if statement.prepare:
            _, failed = _command(conn, pgconn, fileno)
            if failed is None:
                session.names[(statement.query, statement.types)] = statement.name
            error = error or failed
        result, failed = _command(conn, pgconn, fileno)
        results.append(_rows(session, result))
        error = error or failed
    # What the Sync answers: the commit, which can fail too (a deferred constraint, a full
    # notification queue), and then the Sync itself.
    empty = 0
    while True:
        result = _next_result(pgconn, fileno)
        if result is None:
            empty += 1
            if empty > 2:  # libpq answers None for ever once nothing more is coming
                raise psycopg.InternalError("a pipeline ended without its Sync")
            continue
        if result.status == _SYNC:
            break
        error = error or _failure(conn, result)
    pgconn.exit_pipeline_mode()
    return results, error


def _command(
    conn: psycopg.Connection[Any], pgconn: Any, fileno: int
) -> tuple[Any, psycopg.Error | None]:
    """The next command's result, and its error: each command's results end with None, and
    outside a pipeline an autocommit statement's commit comes after its rows, as an error
    if it fails."""
    first = _next_result(pgconn, fileno)
    if first is None:
        raise psycopg.OperationalError("the server sent no result")
    error: psycopg.Error | None = None
    result = first
    while result is not None:
        error = error or _failure(conn, result)
        result = _next_result(pgconn, fileno)
    return first, error


def _rows(session: _Session, result: Any) -> list[Row]:
    if result.status != _TUPLES:
        return []
    transformer = session.transformer
    transformer.set_pgresult(result)
    rows: list[Row] = transformer.load_rows(0, result.ntuples, tuple)
    # Each row came in one message: a large one grew the connection's buffers. Only results
    # with byte strings are looked at (the hot statements return ids and counts).
    if rows and _BYTEA in [result.ftype(i) for i in range(result.nfields)]:
        _note_sizes(session, (sum(len(v) for v in row if type(v) is bytes) for row in rows))
    return rows


def _next_result(pgconn: Any, fileno: int) -> Any:
    while pgconn.is_busy():
        _wait(fileno, write=False)
        pgconn.consume_input()
    return pgconn.get_result()


def _wait(fileno: int, write: bool, timeout: float | None = None) -> bool:
    """Block until the socket can be read (or, with `write`, written), at most `timeout`
    seconds if given; whether it can be read. poll() where there is one: select() refuses
    descriptors from 1024 on."""
    if _HAS_POLL:
        poller = select.poll()
        poller.register(fileno, select.POLLIN | select.POLLOUT if write else select.POLLIN)
        events = poller.poll(None if timeout is None else timeout * 1000)
        return any(mask & (select.POLLIN | select.POLLERR | select.POLLHUP) for _, mask in events)
    readable, _, _ = select.select([fileno], [fileno] if write else [], [], timeout)
    return bool(readable)


_HAS_POLL = hasattr(select, "poll")
