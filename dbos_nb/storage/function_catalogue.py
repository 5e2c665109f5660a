"""The function catalogue: which functions processes registered (name, kind, module, latest
version) and the stored versions of each.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import bindparam, select

from dbos_nb.storage.rows import StoreBase
from dbos_nb.storage.schema import function_versions, functions, queues

# What an enqueue by name checks, read in one statement: whether the queue is declared, and the
# kind the name was registered as.
_ENQUEUE_TARGET = select(
    select(queues.c.name).where(queues.c.name == bindparam("b_queue")).scalar_subquery(),
    select(functions.c.kind).where(functions.c.name == bindparam("b_name")).scalar_subquery(),
)


class FunctionCatalogue(StoreBase):
    """Record and look up registered functions and their versions."""

    def record_functions(self, entries: Sequence[tuple[str, str, str, str]], now_ms: int) -> None:
        """Upsert (name, kind, module, source_hash) rows of registered functions."""
        if not entries:
            return
        rows = [
            {"name": n, "kind": k, "module": m, "source_hash": h, "updated_at": now_ms}
            for n, k, m, h in entries
        ]
        stmt = self.db.insert(functions)
        stmt = stmt.on_conflict_do_update(
            index_elements=["name"],
            set_={
                "kind": stmt.excluded.kind,
                "module": stmt.excluded.module,
                "source_hash": stmt.excluded.source_hash,
                "updated_at": stmt.excluded.updated_at,
            },
        )
        with self.db.write() as conn:
            conn.execute(stmt, rows)

    def enqueue_target(self, queue_name: str, name: str) -> tuple[bool, str | None]:
        """Whether some process declared the queue, and the kind `name` was registered as (None
        if never): a client's checks before an enqueue, in one round trip."""
        row = self.db.read_row(_ENQUEUE_TARGET, {"b_queue": queue_name, "b_name": name})
        assert row is not None  # a SELECT without FROM has its one row
        declared, kind = row
        return declared is not None, str(kind) if kind is not None else None

    def record_function_versions(
        self, entries: Sequence[tuple[str, str, str, str, bytes]], now_ms: int
    ) -> None:
        """Store (name, hash, kind, module, payload) versions; known versions are left as they
        are (a version is immutable)."""
        if not entries:
            return
        rows = [
            {"name": n, "hash": h, "kind": k, "module": m, "payload": p, "created_at": now_ms}
            for n, h, k, m, p in entries
        ]
        with self.db.write() as conn:
            conn.execute(self.db.insert(function_versions).on_conflict_do_nothing(), rows)

    def load_function_version(self, name: str, version: str) -> bytes | None:
        """The stored payload of one version of a function."""
        fv = function_versions
        with self.db.read() as conn:
            payload = conn.execute(
                select(fv.c.payload).where(fv.c.name == name, fv.c.hash == version)
            ).scalar()
        return bytes(payload) if payload is not None else None

    def list_function_versions(self) -> list[tuple[str, str, str]]:
        """(name, hash, kind) of every stored version."""
        fv = function_versions
        with self.db.read() as conn:
            rows = conn.execute(select(fv.c.name, fv.c.hash, fv.c.kind)).all()
        return [(str(n), str(h), str(k)) for n, h, k in rows]

    def function_latest_hash(self, name: str) -> str | None:
        """The version last registered under a name (what a client's enqueue pins)."""
        with self.db.read() as conn:
            value = conn.execute(
                select(functions.c.source_hash).where(functions.c.name == name)
            ).scalar()
        return str(value) if value is not None else None
