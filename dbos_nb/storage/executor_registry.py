"""Executors: each process's registration row, its heartbeat, and the function versions it
reported it cannot load (which go with its row)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.engine import Connection

from dbos_nb.storage.rows import StoreBase
from dbos_nb.storage.schema import executors, load_failures


class _Taken(Exception):
    """Another process registered the executor id during this claim (rolls the claim back)."""


class ExecutorRegistry(StoreBase):
    """Register, renew and list executors."""

    def get_executor(self, executor_id: str) -> dict[str, Any] | None:
        """The executor's registration row."""
        return self._read_one(select(executors).where(executors.c.executor_id == executor_id))

    def register_executor(
        self,
        executor_id: str,
        hostname: str,
        pid: int,
        token: str,
        now_ms: int,
        lease_ms: int | None = None,
    ) -> None:
        """Register an executor id for a process, replacing whatever row holds it (tests and
        tools plant rows with it; a launching process claims its id with `claim_executor`).

        `lease_ms` is how long it may stay silent before others take its work over: its own
        lease, which is what they judge its heartbeat by (None: by their own lease).
        """
        with self.db.write() as conn:
            forget_executor(conn, executor_id)
            conn.execute(
                executors.insert().values(
                    _executor_row(executor_id, hostname, pid, token, now_ms, lease_ms)
                )
            )

    def claim_executor(
        self,
        executor_id: str,
        hostname: str,
        pid: int,
        token: str,
        now_ms: int,
        lease_ms: int | None,
        *,
        replacing: str | None,
    ) -> bool:
        """`register_executor`, only if the id's row is still the one the caller judged: the
        row with token `replacing` (a holder found dead), or none (`replacing=None`). Returns
        False, writing nothing, when another process registered the id meanwhile: two
        processes that read the same dead holder at once cannot both take its id."""
        try:
            with self.db.write() as conn:
                if replacing is None:
                    held = select(executors.c.token).where(executors.c.executor_id == executor_id)
                    if conn.execute(held).first() is not None:
                        return False
                else:
                    dead = delete(executors).where(
                        executors.c.executor_id == executor_id, executors.c.token == replacing
                    )
                    if not conn.execute(dead).rowcount:
                        return False
                _forget_reports(conn, executor_id)
                row = _executor_row(executor_id, hostname, pid, token, now_ms, lease_ms)
                # RETURNING, not rowcount, which the PostgreSQL driver reports as -1 here.
                insert = (
                    self.db.insert(executors)
                    .values(row)
                    .on_conflict_do_nothing()
                    .returning(executors.c.executor_id)
                )
                if conn.execute(insert).first() is None:
                    # Registered by another process since the look above (on PostgreSQL, where
                    # the look could not see its uncommitted row): its row stands, and so do
                    # the reports it made, which the rollback keeps.
                    raise _Taken
        except _Taken:
            return False
        return True

    def heartbeat(self, executor_id: str, token: str, now_ms: int) -> bool:
        """Renew this process's heartbeat; False if another process took the executor id."""
        with self.db.write() as conn:
            return bool(
                conn.execute(
                    update(executors)
                    .where(executors.c.executor_id == executor_id, executors.c.token == token)
                    .values(heartbeat_at=now_ms)
                ).rowcount
            )

    def unregister_executor(self, executor_id: str, token: str) -> None:
        """Remove this process's executor row (at destroy)."""
        with self.db.write() as conn:
            gone = conn.execute(
                delete(executors).where(
                    executors.c.executor_id == executor_id, executors.c.token == token
                )
            ).rowcount
            if gone:
                _forget_reports(conn, executor_id)

    def list_executors(self) -> list[dict[str, Any]]:
        """Every registered executor with its heartbeat."""
        with self.db.read() as conn:
            return [dict(r) for r in conn.execute(select(executors)).mappings()]

    def record_load_failure(
        self,
        executor_id: str,
        token: str,
        name: str,
        version: str,
        reason: str | None,
        now_ms: int,
    ) -> None:
        """Record that this executor cannot load `version` of `name`, and why; None: it can
        now (the record goes). Only while this process (`token`) holds the registration: a
        record written for a row that is gone (taken over) or another process's would
        outlive it or speak for the wrong process. The row is read FOR SHARE, so that a
        takeover deleting it concurrently waits for this record, and deletes it too."""
        lf = load_failures
        with self.db.write() as conn:
            # The executor's row first, then its reports: the order in which a takeover or an
            # unregistration deletes them (the other order could deadlock with one).
            registered = conn.execute(
                select(executors.c.executor_id)
                .where(executors.c.executor_id == executor_id, executors.c.token == token)
                .with_for_update(read=True)
            ).first()
            if registered is None:
                return  # (nor touch the reports of a process that holds the id now)
            conn.execute(delete(lf).where(lf.c.executor_id == executor_id, lf.c.version == version))
            if reason is not None:
                conn.execute(
                    lf.insert().values(
                        executor_id=executor_id,
                        name=name,
                        version=version,
                        reason=reason,
                        recorded_at=now_ms,
                    )
                )

    def list_load_failures(self, name: str | None = None) -> list[dict[str, Any]]:
        """What registered executors reported they cannot load (of `name` only, if given),
        oldest first, each with its executor's hostname, pid, heartbeat and lease."""
        lf, ex = load_failures, executors
        stmt = (
            select(
                lf.c.executor_id,
                lf.c.name,
                lf.c.version,
                lf.c.reason,
                lf.c.recorded_at,
                ex.c.hostname,
                ex.c.pid,
                ex.c.heartbeat_at,
                ex.c.lease_ms,
            )
            .join(ex, ex.c.executor_id == lf.c.executor_id)
            .order_by(lf.c.recorded_at, lf.c.executor_id)
        )
        if name is not None:
            stmt = stmt.where(lf.c.name == name)
        with self.db.read() as conn:
            return [dict(r) for r in conn.execute(stmt).mappings()]


def _executor_row(
    executor_id: str, hostname: str, pid: int, token: str, now_ms: int, lease_ms: int | None
) -> dict[str, Any]:
    return {
        "executor_id": executor_id,
        "hostname": hostname,
        "pid": pid,
        "token": token,
        "started_at": now_ms,
        "heartbeat_at": now_ms,
        "lease_ms": lease_ms,
    }


def forget_executor(conn: Connection, executor_id: str) -> None:
    """Delete an executor's row and what it reported (in the caller's write transaction)."""
    conn.execute(delete(executors).where(executors.c.executor_id == executor_id))
    _forget_reports(conn, executor_id)


def _forget_reports(conn: Connection, executor_id: str) -> None:
    conn.execute(delete(load_failures).where(load_failures.c.executor_id == executor_id))
