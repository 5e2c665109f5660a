"""Hot statements compiled once and run on the driver's own connection.

A queue's work writes three statements per workflow (the enqueue, the step record, the
outcome). Through `Connection.execute`, even with SQLAlchemy's compiled cache, each of them costs
about 100 microseconds of Python (pool checkout, execution context, events, bind and result
processing): more than SQLite takes to run it, and, with the GIL, time that the enqueuing
thread and the workers take from one another. A `Prepared` statement is compiled once, by
SQLAlchemy, into the driver's SQL text and parameter order; running it is one `cursor.execute`
(SQLite), or one message to libpq (PostgreSQL: `pgwire.py`).

Driver errors are re-raised as SQLAlchemy's exception classes (`IntegrityError`,
`OperationalError`, ...), so callers catch the same errors either way. Only statements whose
parameters and results are plain values (text, integers, bytes, None) belong here: results are
returned as the driver gives them, without SQLAlchemy's result processing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from sqlalchemy import Dialect, Executable, LargeBinary
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.dml import UpdateBase
from sqlalchemy.sql.selectable import SelectBase

from dbos_nb.storage import pgwire


class Prepared:
    """One statement compiled for one dialect; `first()` and `all()` run it on a DBAPI
    connection."""

    __slots__ = (
        "_defaults",
        "_dialect",
        "_error",
        "_names",
        "_positional",
        "_processors",
        "_returns_rows",
        "_wire",
        "sql",
    )

    def __init__(
        self,
        statement: Executable,
        dialect: Dialect,
        schema_translate_map: dict[str | None, str] | None = None,
    ) -> None:
        assert isinstance(statement, ClauseElement)
        compiled = statement.compile(
            dialect=dialect,
            schema_translate_map=schema_translate_map,
            render_schema_translate=schema_translate_map is not None,
        )
        assert isinstance(compiled, SQLCompiler)
        self.sql = compiled.string
        if "POSTCOMPILE" in self.sql:  # expanding IN (...) needs SQLAlchemy at each execution
            raise ValueError("a prepared statement cannot hold expanding parameters")
        self._dialect = dialect
        self._error: type[Exception] = dialect.loaded_dbapi.Error
        # PostgreSQL through psycopg: sent by `pgwire`, without a cursor.
        self._wire = dialect.driver == "psycopg" and pgwire.supported()
        # Whether it gives rows, known here for a SELECT and for a write with or without
        # RETURNING: asking the cursor each time makes psycopg build a description of every
        # column. None (any other statement): ask the cursor.
        self._returns_rows: bool | None = None
        if isinstance(statement, SelectBase):
            self._returns_rows = True
        elif isinstance(statement, UpdateBase):
            self._returns_rows = len(statement.exported_columns) > 0
        self._positional = compiled.positional
        binds = compiled.binds
        # Parameters in the driver's order (qmark) or by name (pyformat).
        self._names: list[str] = (
            list(compiled.positiontup or []) if compiled.positional else list(binds)
        )
        # Values written into the statement (e.g. `status == 'ENQUEUED'`) are parameters too.
        self._defaults = {name: bind.value for name, bind in binds.items() if not bind.required}
        self._processors: dict[str, Callable[[Any], Any]] = {}
        for name, bind in binds.items():
            if self._wire and type(bind.type) is LargeBinary:
                # psycopg's adapters (which `pgwire` uses) dump bytes, bytearray and memoryview
                # as bytea already; SQLAlchemy's processor would only wrap each value in a
                # `psycopg.Binary`, an object and a Python-level dump per value.
                continue
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                self._processors[name] = processor

    def arguments(self, params: dict[str, Any]) -> Any:
        """The driver's parameters for `params` (a sequence for qmark, a dict for pyformat)."""
        values = {**self._defaults, **params} if self._defaults else params
        try:
            if self._processors:
                values = dict(values)
                for name, processor in self._processors.items():
                    values[name] = processor(values[name])
            if self._positional:
                return [values[name] for name in self._names]
            return {name: values[name] for name in self._names}
        except KeyError:
            missing = [name for name in self._names if name not in values]
            raise ValueError(f"no value for parameters {missing} of: {self.sql}") from None

    def first(self, dbapi_connection: Any, params: dict[str, Any]) -> tuple[Any, ...] | None:
        """Run the statement; its first result row (None if it returns none)."""
        rows = self.all(dbapi_connection, params)
        return rows[0] if rows else None

    def all(self, dbapi_connection: Any, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        """Run the statement; all its result rows."""
        args = self.arguments(params)
        if self._wire:
            try:
                return pgwire.run(dbapi_connection, [(self.sql, args)])[0]
            except self._error as exc:
                raise translate(exc, self._dialect, self.sql, args) from exc
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(self.sql, args)
            returns_rows = self._returns_rows
            if returns_rows is None:
                returns_rows = cursor.description is not None
            # All rows: SQLite cannot commit while a statement still has rows to give.
            rows = cursor.fetchall() if returns_rows else []
        except self._error as exc:
            raise translate(exc, self._dialect, self.sql, args) from exc
        finally:
            cursor.close()
        return [tuple(row) for row in rows]


class Statement(Protocol):
    """What the group committer runs: a prepared statement, or a guarded one."""

    def first(self, dbapi_connection: Any, params: dict[str, Any]) -> tuple[Any, ...] | None: ...


class Guarded:
    """A statement that runs only when its guard query returns a row, both on the caller's
    connection and so in its transaction (SQLite's BEGIN IMMEDIATE makes the pair atomic)."""

    __slots__ = ("guard", "statement")

    def __init__(self, guard: Prepared, statement: Prepared) -> None:
        self.guard = guard
        self.statement = statement

    def first(self, dbapi_connection: Any, params: dict[str, Any]) -> tuple[Any, ...] | None:
        if self.guard.first(dbapi_connection, params) is None:
            return None
        return self.statement.first(dbapi_connection, params)


class Chained:
    """A statement, then a second one with the same parameters when the first returned a row,
    both on the caller's connection and so in its transaction (SQLite: a child workflow's row
    and its parent's record of it); the first one's row."""

    __slots__ = ("statement", "then")

    def __init__(self, statement: Statement, then: Prepared) -> None:
        self.statement = statement
        self.then = then

    def first(self, dbapi_connection: Any, params: dict[str, Any]) -> tuple[Any, ...] | None:
        row = self.statement.first(dbapi_connection, params)
        if row is not None:
            self.then.all(dbapi_connection, params)
        return row


class Each:
    """One statement run for each parameter dict in `params["batch"]`, on the caller's
    connection and so in its transaction (SQLite: several records of one workflow written
    together); a row of their first rows."""

    __slots__ = ("statement",)

    def __init__(self, statement: Prepared) -> None:
        self.statement = statement

    def first(self, dbapi_connection: Any, params: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(self.statement.first(dbapi_connection, p) for p in params["batch"])


def translate(
    exc: Exception,
    dialect: Dialect,
    sql: str | None = None,
    args: Any = None,
    *,
    connection_invalidated: bool = False,
) -> BaseException:
    """The SQLAlchemy exception (IntegrityError, OperationalError, ...) for a driver error."""
    error = dialect.loaded_dbapi.Error
    if not isinstance(exc, error):
        return exc
    return DBAPIError.instance(
        sql, args, exc, error, dialect=dialect, connection_invalidated=connection_invalidated
    )
