"""`Queue`: a named queue with global and per-process concurrency and a global rate limit.

Declaring a queue validates its settings and stores them in the database (at once if DBOS is
launched, else at launch), so every process and every client sees the same limits. Declaring the
same name again with the same settings is normal notebook use; new settings replace the old ones
with a warning. A declaration that gives only the name (`Queue("llm")`) takes the settings already
stored for that queue, so that a notebook which only enqueues cannot lift the limits another
process declared; giving any setting, even `concurrency=None`, declares the whole set.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from dbos_nb.core.context import current
from dbos_nb.core.handles import WorkflowHandle, WorkflowHandleAsync
from dbos_nb.core.queue_setters import QueueSetters
from dbos_nb.core.queue_settings import MAX_COUNT, build_settings, changed_settings, limiter_of
from dbos_nb.core.registry import resolve
from dbos_nb.core.runtime import Runtime, get_runtime, peek_runtime
from dbos_nb.core.workflows import (
    cycle_collector_paused,
    enqueue_many,
    enqueue_workflow,
    replaying_a_recorded_operation,
)
from dbos_nb.errors import DbosNbError, InvalidQueueSettingsError, UnknownQueueError
from dbos_nb.models import INTERNAL_QUEUE, QueueSettings
from dbos_nb.storage.queue_records import QueueRecords

logger = logging.getLogger(__name__)

R = TypeVar("R")


class _Unset:
    """The default of a `Queue` setting the caller did not give (told apart from an explicit
    None, which removes a limit)."""

    def __repr__(self) -> str:
        return "<stored or default>"


UNSET: Any = _Unset()


class QueueRegistry:
    """The queues declared in this process, by name."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: dict[str, Queue] = {}
        self._listeners: list[Callable[[Queue], None]] = []
        # Names whose queue this process deleted, until declared again: a `Queue` object kept
        # from before must not enqueue onto a queue that nobody serves any more.
        self._deleted: set[str] = set()

    def declare(self, queue: Queue) -> None:
        with self._lock:
            old = self._queues.get(queue.name)
            listeners = list(self._listeners)
            if queue.adopts_stored and old is not None:
                # The earlier declaration's settings, until the stored ones are read. Before a
                # launch nothing is read: whether they are stored at launch is the earlier
                # declaration's choice. Once launched, the stored ones apply (the listener
                # reads them), which another process or a client may have changed since.
                queue.settings = old.settings
                if not listeners:
                    queue.adopts_stored = old.adopts_stored
            # A launched process stores the settings, and says there what they replaced (also
            # when another process had declared them): one warning, not two. A declaration
            # of the name alone replaced nothing.
            if (
                old is not None
                and not listeners
                and not old.adopts_stored
                and old.settings != queue.settings
            ):
                logger.warning(
                    "queue %r declared again with new limits: %s (were %s); the new ones apply",
                    queue.name,
                    queue.settings.limits(),
                    old.settings.limits(),
                )
            self._queues[queue.name] = queue
            self._deleted.discard(queue.name)
        try:
            for listener in listeners:
                listener(queue)
        except BaseException:
            # Not stored (the database refused it, or is unreachable): not declared either,
            # so that nothing is enqueued onto a queue no other process can see.
            with self._lock:
                if self._queues.get(queue.name) is queue:
                    if old is None:
                        del self._queues[queue.name]
                    else:
                        self._queues[queue.name] = old
            raise

    def get(self, name: str) -> Queue | None:
        with self._lock:
            return self._queues.get(name)

    def names(self) -> list[str]:
        with self._lock:
            return list(self._queues)

    def all(self) -> list[Queue]:
        with self._lock:
            return list(self._queues.values())

    def forget(self, name: str) -> None:
        """Forget the declaration of `name` (its queue was deleted): not served here, and not
        enqueued onto through the `Queue` objects that declared it."""
        with self._lock:
            self._queues.pop(name, None)
            self._deleted.add(name)

    def deleted(self, name: str) -> bool:
        """Whether this process deleted the queue `name` and has not declared it since."""
        with self._lock:
            return name in self._deleted

    def add_listener(self, listener: Callable[[Queue], None]) -> None:
        with self._lock:
            self._listeners.append(listener)

    def clear(self) -> None:
        """Forget every declaration (tests; the stored settings stay in the database)."""
        with self._lock:
            self._queues.clear()
            self._deleted.clear()

    def remove_listener(self, listener: Callable[[Queue], None]) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)


QUEUES = QueueRegistry()


class Queue(QueueSetters):
    """A queue of workflows, shared by every process using the database.

    Settings not given default to no limit, no priority and a 1 s polling interval; with no
    setting given at all, the queue takes the settings stored for its name, if any.
    """

    def __init__(
        self,
        name: str,
        concurrency: int | None = UNSET,
        limiter: dict[str, Any] | None = UNSET,
        *,
        worker_concurrency: int | None = UNSET,
        priority_enabled: bool = UNSET,
        polling_interval_sec: float = UNSET,
        token_limiter: dict[str, Any] | None = UNSET,
        partition_concurrency: int | None = UNSET,
        partition_worker_concurrency: int | None = UNSET,
        partition_limiter: dict[str, Any] | None = UNSET,
        _keep_stored: bool = False,
    ) -> None:
        given = (
            concurrency,
            limiter,
            worker_concurrency,
            priority_enabled,
            polling_interval_sec,
            token_limiter,
            partition_concurrency,
            partition_worker_concurrency,
            partition_limiter,
        )
        # Whether the stored settings (or an earlier declaration's here) apply instead of the
        # defaults: see the module's docstring. `_keep_stored`: those given apply only to a new
        # queue (`register_queue(on_conflict="never_update")`).
        self.adopts_stored = _keep_stored or all(value is UNSET for value in given)
        self.settings = build_settings(
            name,
            _or(concurrency, None),
            _or(worker_concurrency, None),
            _or(limiter, None),
            _or(priority_enabled, False),
            _or(polling_interval_sec, 1.0),
            _or(token_limiter, None),
            _or(partition_concurrency, None),
            _or(partition_worker_concurrency, None),
            _or(partition_limiter, None),
        )
        self.name = name
        self.priority_noted = False  # told once that a priority here orders nothing
        self.partition_noted = False  # the same for a partition key
        QUEUES.declare(self)

    # Whether this object shows the settings stored in the database when it was read
    # (`as_stored`) rather than a declaration of this process; and, when a `DBOSClient` read
    # it, the client's store (whose database may not be this process's).
    _read_from_database = False
    _client_store: QueueRecords | None = None

    @property
    def _read_by_client(self) -> bool:
        return self._client_store is not None

    @classmethod
    def as_stored(
        cls, settings: QueueSettings, *, client_store: QueueRecords | None = None
    ) -> Queue:
        """The queue as the database holds it (`retrieve_queue`, `list_queues`): not a
        declaration, so this process does not start serving it and stores nothing. Work
        enqueued through it waits for a process that serves the queue; one read by a client
        enqueues nothing (see `_check_enqueue`), though its setters change the settings in
        the client's database."""
        queue = cls.__new__(cls)
        queue.settings = settings
        queue.name = settings.name
        queue.adopts_stored = True
        queue.priority_noted = False
        queue.partition_noted = False
        queue._read_from_database = True
        queue._client_store = client_store
        return queue

    def _change(self, setting: str, value: Any, call: str) -> None:
        """Change one setting in the stored row (DBOS's setters, see `QueueSetters`), checked
        against the others as stored; this process's declaration of the queue follows, so a
        later launch stores the changed settings again, not the old ones."""
        store, rt = self._store_and_runtime()
        if store is None:
            raise DbosNbError(
                f"queue {self.name!r}: {call}() changes the settings stored in the "
                "database: launch DBOS first (or declare the queue with its new settings)"
            )
        now_ms = rt.now_ms() if rt is not None else round(time.time() * 1000)
        new = store.change_queue(
            self.name, lambda old: changed_settings(old, setting, value), now_ms
        )
        self.settings = new
        declared = QUEUES.get(self.name) if self._client_store is None else None
        if declared is not None:
            declared.settings = new
        if rt is not None:  # a loosened limit may let waiting work start now
            rt.wake_scheduler(self.name)

    def _store_and_runtime(self) -> tuple[QueueRecords | None, Runtime | None]:
        """Where this queue's settings are stored: the client's store for a queue a client
        read, else the launched runtime's (None, None before a launch)."""
        if self._client_store is not None:
            return self._client_store, None
        rt = peek_runtime()
        return (rt.store, rt) if rt is not None else (None, None)

    def _read_stored(self) -> QueueSettings:
        """The settings stored now (DBOS's async getters read the database), or this
        process's view before a launch. A queue no longer stored raises UnknownQueueError."""
        store, _ = self._store_and_runtime()
        if store is None:
            return self._latest()
        stored = store.get_queue(self.name)
        if stored is None:
            raise UnknownQueueError(self.name)
        return stored

    def _check_enqueue(self) -> None:
        """A queue read through a `DBOSClient` describes the client's database, which this
        process's runtime (if any) may not use: enqueueing through it would write elsewhere."""
        if self._read_by_client:
            raise DbosNbError(
                f"queue {self.name!r} was read through a DBOSClient, which enqueues by name: "
                f"use client.enqueue({{'queue_name': {self.name!r}, 'workflow_name': ...}}, ...)"
            )
        if QUEUES.deleted(self.name):
            rt = get_runtime()
            if rt.store.get_queue(self.name) is not None:
                # Declared again since by another process (or a client): this process takes
                # the stored settings and serves the queue again.
                self.adopts_stored = True
                QUEUES.declare(self)
            elif not replaying_a_recorded_operation(rt):
                raise UnknownQueueError(self.name, deleted=True)

    def _latest(self) -> QueueSettings:
        """The settings of this queue's latest declaration in this process: this object's, or
        a later one's of the same name (a `Queue` kept from an earlier cell then shows, and
        warns by, what this process declared last, which it also stored; another process's
        later declaration is not seen here). A queue read from the database shows what it
        read."""
        if self._read_from_database:
            return self.settings
        latest = QUEUES.get(self.name)
        return self.settings if latest is None or latest is self else latest.settings

    @property
    def concurrency(self) -> int | None:
        return self._latest().concurrency

    @property
    def worker_concurrency(self) -> int | None:
        return self._latest().worker_concurrency

    @property
    def limiter(self) -> dict[str, float] | None:
        s = self._latest()
        return limiter_of(s.limit, s.period_ms)

    @property
    def token_limiter(self) -> dict[str, float] | None:
        s = self._latest()
        return limiter_of(s.token_limit, s.token_period_ms)

    @property
    def priority_enabled(self) -> bool:
        return self._latest().priority_enabled

    @property
    def partition_concurrency(self) -> int | None:
        return self._latest().partition_concurrency

    @property
    def partition_worker_concurrency(self) -> int | None:
        return self._latest().partition_worker_concurrency

    @property
    def partition_limiter(self) -> dict[str, float] | None:
        s = self._latest()
        return limiter_of(s.partition_limit, s.partition_period_ms)

    @property
    def polling_interval_sec(self) -> float:
        return self._latest().polling_interval_ms / 1000

    def enqueue(self, func: Callable[..., R], *args: Any, **kwargs: Any) -> WorkflowHandle[R]:
        """Enqueue a workflow, step or transaction; returns its handle at once."""
        self._check_enqueue()
        _note_ignored_priority(self)
        check_partition(self)
        reg, call_args = resolve(func, args)
        rt = get_runtime()
        wid = enqueue_workflow(rt, self.name, reg, call_args, kwargs)
        return WorkflowHandle(rt, wid)

    async def enqueue_async(
        self, func: Callable[..., R], *args: Any, **kwargs: Any
    ) -> WorkflowHandleAsync[R]:
        """`enqueue` for async callers (one short database write); the handle's `get_result()`
        and `get_status()` are awaited."""
        handle = self.enqueue(func, *args, **kwargs)
        return WorkflowHandleAsync(get_runtime(), handle.workflow_id)

    def enqueue_many(
        self,
        func: Callable[..., R],
        items: Iterable[Any],
        *,
        batch_id: str | None = None,
        unpack: bool = False,
        tokens: int | Callable[[Any], int] | None = None,
    ) -> list[WorkflowHandle[R]]:
        """Enqueue one call per item in a single transaction; returns the handles in order.

        Each item is passed as the single argument, or with `unpack=True` a tuple is spread as
        positional arguments and a dict as keyword arguments. With `batch_id`, the workflows get
        the ids `<batch_id>/<index>` and enqueueing the same batch again writes nothing twice.
        `tokens` is each item's token estimate for a `token_limiter`: a number, or a function
        of the item.
        """
        self._check_enqueue()
        _note_ignored_priority(self)
        check_partition(self)
        reg, bound = resolve(func, ())
        rt = get_runtime()
        with cycle_collector_paused():
            listed = list(items)
            if unpack or bound:
                calls = [_call_of(item, unpack, bound) for item in listed]
            else:  # the common case, without a call per item; the empty kwargs are only read
                no_kwargs: dict[str, Any] = {}
                calls = [((item,), no_kwargs) for item in listed]
            estimates = token_estimates(tokens, listed)
            ids = enqueue_many(rt, self.name, reg, calls, batch_id, estimates)
            return [WorkflowHandle(rt, wid) for wid in ids]

    def __repr__(self) -> str:
        s = self._latest()
        partitions = ""
        if s.partitioned:
            partitions = (
                f", partition_concurrency={s.partition_concurrency}, "
                f"partition_worker_concurrency={s.partition_worker_concurrency}, "
                f"partition_limiter={self.partition_limiter}"
            )
        return (
            f"Queue({s.name!r}, concurrency={s.concurrency}, worker_concurrency="
            f"{s.worker_concurrency}, limiter={self.limiter}, token_limiter={self.token_limiter}"
            f"{partitions})"
        )


# The class of the queues that `DBOS.register_queue`, `retrieve_queue` and `list_queues` make:
# the `Queue` that dbos_nb exports (with the notebook layer's `map()`) once the notebook layer
# has registered it, which importing `dbos_nb` does. Core code cannot import that layer.
_queue_class: type[Queue] = Queue


def use_queue_class(cls: type[Queue]) -> None:
    """Make `cls` (a subclass of Queue) the class of the queues dbos_nb makes for its users."""
    global _queue_class
    if not (isinstance(cls, type) and issubclass(cls, Queue)):
        raise TypeError(f"the queue class must be a subclass of Queue, got {cls!r}")
    _queue_class = cls


def queue_class() -> type[Queue]:
    """The class `use_queue_class` set (the core Queue if none was)."""
    return _queue_class


def stored_queue(store: QueueRecords, name: str, *, by_client: bool = False) -> Queue | None:
    """`retrieve_queue`: the queue `name` as stored, or None if no process declared it (as
    dbos_nb's internal queue, which runs `start_workflow`'s recovered work, is nobody's
    declaration)."""
    if not isinstance(name, str) or not name:
        raise InvalidQueueSettingsError(f"a queue name must be a non-empty string, got {name!r}")
    settings = store.get_queue(name) if name != INTERNAL_QUEUE else None
    if settings is None:
        return None
    return _queue_class.as_stored(settings, client_store=store if by_client else None)


def store_settings(store: QueueRecords, settings: QueueSettings, now_ms: int) -> None:
    """Store a declaration's settings for every process, saying so when they replace others."""
    previous = store.upsert_queue(settings, now_ms)
    if previous is not None and previous != settings:
        logger.warning(
            "queue %r declared again with new limits: %s (were %s); the new ones apply",
            settings.name,
            settings.limits(),
            previous.limits(),
        )


def register_by_client(
    store: QueueRecords,
    settings: QueueSettings,
    now_ms: int,
    on_conflict: str,
    *,
    keep_priority: bool = False,
    keep_tokens: bool = False,
) -> Queue:
    """`DBOSClient.register_queue`: store the settings (`on_conflict="never_update"`: only for
    a new queue) and return the queue as stored. `keep_priority` / `keep_tokens`: the caller
    gave no `priority_enabled` / `token_limiter` (DBOS's client has neither), so a stored
    queue keeps its own."""
    if on_conflict == "always_update":
        previous = store.get_queue(settings.name) if keep_priority or keep_tokens else None
        if previous is not None:
            if keep_priority:
                settings = dataclasses.replace(settings, priority_enabled=previous.priority_enabled)
            if keep_tokens:
                settings = dataclasses.replace(
                    settings,
                    token_limit=previous.token_limit,
                    token_period_ms=previous.token_period_ms,
                )
        store_settings(store, settings, now_ms)
        stored = settings
    elif on_conflict == "never_update":
        stored = store.adopt_queue(settings, now_ms)
    elif on_conflict == "update_if_latest_version":
        # As DBOS's client says: the choice needs an application version, which it has not.
        raise DbosNbError(
            "DBOSClient.register_queue does not support on_conflict='update_if_latest_version': "
            "a client has no application version; use 'always_update' or 'never_update'"
        )
    else:
        raise InvalidQueueSettingsError(
            f"queue {settings.name!r}: on_conflict must be 'always_update' or 'never_update', "
            f"got {on_conflict!r}"
        )
    return _queue_class.as_stored(stored, client_store=store)


def one_concurrency(concurrency: Any, global_concurrency: Any, name: str) -> Any:
    """DBOS's `concurrency` (deprecated) and `global_concurrency` are one setting: the one
    given (UNSET or None count as not given); both raise, as in DBOS."""
    given = [v for v in (concurrency, global_concurrency) if v is not UNSET and v is not None]
    if len(given) > 1:
        raise InvalidQueueSettingsError(
            f"queue {name!r}: concurrency is DBOS's deprecated name of global_concurrency; "
            "give only one of them"
        )
    if given:
        return given[0]
    return concurrency if concurrency is not UNSET else global_concurrency


def stored_queues(store: QueueRecords, *, by_client: bool = False) -> list[Queue]:
    """`list_queues`: every queue some process declared, by name (not the internal one)."""
    return [
        _queue_class.as_stored(s, client_store=store if by_client else None)
        for s in store.list_queues()
        if s.name != INTERNAL_QUEUE
    ]


def _or(value: Any, default: Any) -> Any:
    return default if value is UNSET else value


def _note_ignored_priority(queue: Queue) -> None:
    """A priority given for a queue without `priority_enabled` is stored but does not order
    anything (as in DBOS): say so, once per declaration, rather than let it pass unnoticed."""
    settings = queue._latest()
    if settings.priority_enabled or current().priority is None:
        return
    if not queue.priority_noted:
        queue.priority_noted = True
        warnings.warn(
            f"queue {settings.name!r} does not have priority_enabled=True: the priority given "
            "is stored but its work starts in enqueue order",
            UserWarning,
            stacklevel=3,
        )


def check_partition(queue: Queue) -> None:
    """Work enqueued on a partitioned queue names its partition (DBOS says it must, though it
    does not check: there such work would never start). A key given for a queue that is not
    partitioned is stored but limits nothing: said once, as for a priority.

    Judged by this process's view of the queue, and, before it refuses or warns, by the
    stored settings (another process or a client may have changed them since): one read, on
    a path that is rare by nature."""
    key = current().queue_partition_key
    settings = queue._latest()
    if settings.partitioned == (key is not None) or (key is not None and queue.partition_noted):
        return
    store, _ = queue._store_and_runtime()
    stored = store.get_queue(queue.name) if store is not None else None
    if stored is not None:
        settings = stored
    if settings.partitioned and key is None:
        raise DbosNbError(
            f"queue {settings.name!r} is partitioned ({settings.limits()}): enqueue inside "
            "SetEnqueueOptions(queue_partition_key=...) to say which partition the work is in"
        )
    if not settings.partitioned and key is not None and not queue.partition_noted:
        queue.partition_noted = True
        warnings.warn(
            f"queue {settings.name!r} has no partition limits: the queue_partition_key given "
            "is stored but limits nothing",
            UserWarning,
            stacklevel=3,
        )


def _call_of(
    item: Any, unpack: bool, bound: tuple[Any, ...]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if not unpack:
        return (*bound, item), {}
    if isinstance(item, tuple):
        return (*bound, *item), {}
    if isinstance(item, dict):
        return bound, dict(item)
    raise DbosNbError(f"with unpack=True each item must be a tuple or a dict, got {item!r}")


def token_estimates(
    tokens: int | Callable[[Any], int] | None, items: list[Any]
) -> list[int | None] | None:
    """Per-item token estimates from a number or a function of the item (validated)."""
    if tokens is None:
        return None
    values = [tokens(item) if callable(tokens) else tokens for item in items]
    estimates: list[int | None] = []
    for value in values:
        # Any integer type (numpy's from a DataFrame column too), not a bool or a float.
        number = None if isinstance(value, bool) else _as_int(value)
        if number is None or not 0 <= number <= MAX_COUNT:
            raise DbosNbError(
                f"token estimates must be non-negative integers up to 2**31-1, got {value!r}"
            )
        estimates.append(number)
    return estimates


def _as_int(value: Any) -> int | None:
    try:
        return operator.index(value)
    except TypeError:
        return None
