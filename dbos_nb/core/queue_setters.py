"""DBOS 3.4's setters of a queue's settings (`queue.set_limiter(...)` and the others, with their
`_async` twins): each changes one setting in the stored row, for every process, whose next
claims obey it. The `Queue` class supplies `_change`; this mixin only spells DBOS's names."""

from __future__ import annotations

import asyncio
from typing import Any

from dbos_nb.core.queue_settings import limiter_of
from dbos_nb.models import QueueSettings


class QueueSetters:
    """The setters and async getters of DBOS 3.4's database-backed queues."""

    name: str

    def _change(self, setting: str, value: Any, call: str) -> None:
        raise NotImplementedError

    @property
    def concurrency(self) -> int | None:
        raise NotImplementedError

    @property
    def worker_concurrency(self) -> int | None:
        raise NotImplementedError

    @property
    def limiter(self) -> dict[str, float] | None:
        raise NotImplementedError

    @property
    def polling_interval_sec(self) -> float:
        raise NotImplementedError

    @property
    def global_concurrency(self) -> int | None:
        """DBOS 3.4's name of `concurrency`: how many of the queue's workflows may run at once
        across all processes."""
        return self.concurrency

    def set_global_concurrency(self, value: int | None) -> None:
        """How many of the queue's workflows may run at once across all processes (None: no
        limit), from every process's next claim on."""
        self._change("concurrency", value, "set_global_concurrency")

    def set_concurrency(self, value: int | None) -> None:
        """DBOS's deprecated name of `set_global_concurrency`."""
        self._change("concurrency", value, "set_concurrency")

    def set_worker_concurrency(self, value: int | None) -> None:
        """How many of the queue's workflows one process may run at once (None: no limit)."""
        self._change("worker_concurrency", value, "set_worker_concurrency")

    def set_limiter(self, value: dict[str, Any] | None) -> None:
        """The rate limit, {"limit": n, "period": seconds} (None: none)."""
        self._change("limiter", value, "set_limiter")

    def set_token_limiter(self, value: dict[str, Any] | None) -> None:
        """The token budget, {"limit": tokens, "period": seconds} (None: none)."""
        self._change("token_limiter", value, "set_token_limiter")

    def set_polling_interval_sec(self, value: float) -> None:
        """How often a process serving the queue looks for work when nothing wakes it (the
        process's own `polling_interval_sec` if shorter): a process follows its own setters
        and declarations, another one from its next launch."""
        self._change("polling_interval_sec", value, "set_polling_interval_sec")

    def set_partition_concurrency(self, value: int | None) -> None:
        """How many workflows of any one partition may run at once across all processes
        (None: no limit); setting a partition limit makes the queue partitioned."""
        self._change("partition_concurrency", value, "set_partition_concurrency")

    def set_partition_worker_concurrency(self, value: int | None) -> None:
        """How many workflows of any one partition one process may run at once."""
        self._change("partition_worker_concurrency", value, "set_partition_worker_concurrency")

    def set_partition_limiter(self, value: dict[str, Any] | None) -> None:
        """The rate limit of each partition apart, {"limit": n, "period": seconds}."""
        self._change("partition_limiter", value, "set_partition_limiter")

    async def set_partition_concurrency_async(self, value: int | None) -> None:
        await asyncio.to_thread(self.set_partition_concurrency, value)

    async def set_partition_worker_concurrency_async(self, value: int | None) -> None:
        await asyncio.to_thread(self.set_partition_worker_concurrency, value)

    async def set_partition_limiter_async(self, value: dict[str, Any] | None) -> None:
        await asyncio.to_thread(self.set_partition_limiter, value)

    async def set_global_concurrency_async(self, value: int | None) -> None:
        await asyncio.to_thread(self.set_global_concurrency, value)

    async def set_concurrency_async(self, value: int | None) -> None:
        await asyncio.to_thread(self.set_concurrency, value)

    async def set_worker_concurrency_async(self, value: int | None) -> None:
        await asyncio.to_thread(self.set_worker_concurrency, value)

    async def set_limiter_async(self, value: dict[str, Any] | None) -> None:
        await asyncio.to_thread(self.set_limiter, value)

    async def set_token_limiter_async(self, value: dict[str, Any] | None) -> None:
        await asyncio.to_thread(self.set_token_limiter, value)

    async def set_polling_interval_sec_async(self, value: float) -> None:
        await asyncio.to_thread(self.set_polling_interval_sec, value)

    # DBOS's async getters read the database: what every process obeys now, which another
    # process or a client may have changed since this object was made. (The properties show
    # this process's view: its latest declaration, or what was read.)

    def _read_stored(self) -> QueueSettings:
        raise NotImplementedError

    async def _stored_async(self) -> QueueSettings:
        return await asyncio.to_thread(self._read_stored)

    async def get_global_concurrency_async(self) -> int | None:
        return (await self._stored_async()).concurrency

    async def get_concurrency_async(self) -> int | None:
        return (await self._stored_async()).concurrency

    async def get_worker_concurrency_async(self) -> int | None:
        return (await self._stored_async()).worker_concurrency

    async def get_limiter_async(self) -> dict[str, float] | None:
        stored = await self._stored_async()
        return limiter_of(stored.limit, stored.period_ms)

    async def get_partition_concurrency_async(self) -> int | None:
        return (await self._stored_async()).partition_concurrency

    async def get_partition_worker_concurrency_async(self) -> int | None:
        return (await self._stored_async()).partition_worker_concurrency

    async def get_partition_limiter_async(self) -> dict[str, float] | None:
        stored = await self._stored_async()
        return limiter_of(stored.partition_limit, stored.partition_period_ms)

    async def get_polling_interval_sec_async(self) -> float:
        return (await self._stored_async()).polling_interval_ms / 1000
