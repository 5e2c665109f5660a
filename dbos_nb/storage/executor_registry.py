"""Executors: each process's registration row and its heartbeat."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select, update

from dbos_nb.storage.rows import StoreBase
from dbos_nb.storage.schema import executors


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
        """Claim an executor id for this process (replacing a dead holder's row).

        `lease_ms` is how long it may stay silent before others take its work over: its own
        lease, which is what they judge its heartbeat by (None: by their own lease).
        """
        with self.db.write() as conn:
            conn.execute(delete(executors).where(executors.c.executor_id == executor_id))
            conn.execute(
                executors.insert().values(
                    executor_id=executor_id,
                    hostname=hostname,
                    pid=pid,
                    token=token,
                    started_at=now_ms,
                    heartbeat_at=now_ms,
                    lease_ms=lease_ms,
                )
            )

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
            conn.execute(
                delete(executors).where(
                    executors.c.executor_id == executor_id, executors.c.token == token
                )
            )

    def list_executors(self) -> list[dict[str, Any]]:
        """Every registered executor with its heartbeat."""
        with self.db.read() as conn:
            return [dict(r) for r in conn.execute(select(executors)).mappings()]
