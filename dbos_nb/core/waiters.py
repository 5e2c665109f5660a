"""Waiting for workflow outcomes: targeted wake-ups, with polling as the fallback.

A waiter registers an Event for the workflow it waits on. A completion in this process, or a
PostgreSQL notification from another one, sets exactly that Event, so thousands of waiting handles
cost nothing until their own workflow ends. Polling with back-off covers what no notification
reaches (other processes on SQLite).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

from dbos_nb import serialization
from dbos_nb.clock import Clock
from dbos_nb.errors import (
    DBOSAwaitedWorkflowCancelledError,
    DBOSAwaitedWorkflowMaxRecoveryAttemptsExceeded,
    DBOSNonExistentWorkflowError,
    DBOSRecordedError,
    DBOSWorkflowTimedOutError,
)
from dbos_nb.models import WorkflowStatusString as S
from dbos_nb.storage.store import SystemStore


class _LoopEvent:
    """An asyncio.Event that other threads set (through its loop): what an awaiting handle
    registers, so that a completion wakes it as it wakes a blocked thread."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.event = asyncio.Event()

    def set(self) -> None:
        with suppress(RuntimeError):  # the loop has closed: nobody waits any more
            self._loop.call_soon_threadsafe(self.event.set)


class Waiters:
    """Per-workflow wake-up events."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: dict[str, list[threading.Event | _LoopEvent]] = {}
        # Waits that found their workflow unfinished: only those need other processes' finish
        # announcements (see `storage.listener`). `on_first` is called (outside the lock) when
        # the first of them starts, so that the listener starts listening for them.
        self._waiting = 0
        self.on_first: Callable[[], None] | None = None

    def active(self) -> bool:
        """Whether a wait is under way (beyond its first look at the workflow)."""
        return self._waiting > 0

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """Mark a registered waiter as waiting for its workflow to finish (see `active`)."""
        with self._lock:
            self._waiting += 1
            first = self._waiting == 1
        if first and self.on_first is not None:
            self.on_first()
        try:
            yield
        finally:
            with self._lock:
                self._waiting -= 1

    @contextmanager
    def watch(self, workflow_id: str) -> Iterator[threading.Event]:
        event = threading.Event()
        with self._registered(workflow_id, event):
            yield event

    @contextmanager
    def watch_many(self, workflow_ids: list[str]) -> Iterator[threading.Event]:
        """`watch` for several workflows at once: one event, set when any of them finishes."""
        event = threading.Event()
        with self._registered_many(workflow_ids, event):
            yield event

    @contextmanager
    def watch_many_async(self, workflow_ids: list[str]) -> Iterator[asyncio.Event]:
        """`watch_many` for a coroutine, inside a running event loop."""
        waker = _LoopEvent()
        with self._registered_many(workflow_ids, waker):
            yield waker.event

    @contextmanager
    def _registered_many(
        self, workflow_ids: list[str], event: threading.Event | _LoopEvent
    ) -> Iterator[None]:
        # One lock for all: a wait on thousands of handles registers in a few milliseconds.
        with self._lock:
            for workflow_id in workflow_ids:
                self._events.setdefault(workflow_id, []).append(event)
        try:
            yield
        finally:
            with self._lock:
                for workflow_id in workflow_ids:
                    self._unregister(workflow_id, event)

    @contextmanager
    def watch_async(self, workflow_id: str) -> Iterator[asyncio.Event]:
        """`watch` for a coroutine, inside a running event loop."""
        waker = _LoopEvent()
        with self._registered(workflow_id, waker):
            yield waker.event

    @contextmanager
    def _registered(self, workflow_id: str, event: threading.Event | _LoopEvent) -> Iterator[None]:
        with self._lock:
            self._events.setdefault(workflow_id, []).append(event)
        try:
            yield
        finally:
            with self._lock:
                self._unregister(workflow_id, event)

    def _unregister(self, workflow_id: str, event: threading.Event | _LoopEvent) -> None:
        """Remove one registration (the caller holds the lock)."""
        events = self._events.get(workflow_id)
        if events is not None:
            events.remove(event)
            if not events:
                del self._events[workflow_id]

    def notify(self, workflow_id: str) -> None:
        with self._lock:
            events = list(self._events.get(workflow_id, ()))
        for event in events:
            event.set()

    def notify_all(self) -> None:
        with self._lock:
            events = [e for group in self._events.values() for e in group]
        for event in events:
            event.set()


def outcome_of(workflow_id: str, row: dict[str, Any]) -> tuple[bool, Any]:
    """(finished, value) for a status row; raises the recorded or awaited error when finished
    badly."""
    status = row["status"]
    if status == S.SUCCESS.value:
        return True, serialization.loads(row["output"])
    if status == S.ERROR.value:
        error = serialization.load_error(row["error"])
        raise error if error is not None else DBOSRecordedError("Error", "unknown error")
    if status == S.CANCELLED.value:
        deadline = row.get("workflow_deadline_epoch_ms")
        completed = row.get("completed_at") or row.get("updated_at")
        if deadline is not None and completed is not None and completed >= deadline:
            raise DBOSWorkflowTimedOutError(workflow_id)
        raise DBOSAwaitedWorkflowCancelledError(workflow_id)
    if status == S.MAX_RECOVERY_ATTEMPTS_EXCEEDED.value:
        raise DBOSAwaitedWorkflowMaxRecoveryAttemptsExceeded(workflow_id)
    return False, None


def wait_for_result(
    store: SystemStore,
    waiters: Waiters,
    clock: Clock,
    workflow_id: str,
    polling_interval_sec: float,
    timeout_sec: float | None = None,
) -> Any:
    """Block until the workflow finishes; return its output or raise its error.

    Raises TimeoutError if `timeout_sec` passes first (the workflow keeps running).
    """
    __tracebackhide__ = True  # IPython and pytest leave this frame out of tracebacks
    poll = _Poll(store, workflow_id, polling_interval_sec, timeout_sec)
    with waiters.watch(workflow_id) as event:
        finished, value = poll.check()
        if finished:
            return value
        with waiters.waiting():
            while True:
                event.wait(poll.next_wait())
                event.clear()
                finished, value = poll.check()
                if finished:
                    return value


async def wait_for_result_async(
    store: SystemStore,
    waiters: Waiters,
    workflow_id: str,
    polling_interval_sec: float,
    timeout_sec: float | None = None,
) -> Any:
    """`wait_for_result` for a coroutine: the same wake-ups, awaited instead of blocking."""
    __tracebackhide__ = True
    poll = _Poll(store, workflow_id, polling_interval_sec, timeout_sec)
    with waiters.watch_async(workflow_id) as event:
        # In a thread: while the database is out of reach, a read is retried for a while (see
        # `reconnect`), which must not stop the event loop.
        finished, value = await asyncio.to_thread(poll.check)
        if finished:
            return value
        with waiters.waiting():
            while True:
                with suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), poll.next_wait())
                event.clear()
                finished, value = await asyncio.to_thread(poll.check)
                if finished:
                    return value


def wait_for_first(
    store: SystemStore, waiters: Waiters, workflow_ids: list[str], polling_interval_sec: float
) -> str:
    """Block until one of the workflows has ended (in any way: success, error, cancellation)
    and return its id; of several already ended, the one that ended first."""
    poll = _FirstPoll(store, workflow_ids, polling_interval_sec)
    # A first look before registering: taking results as they come, most calls find one
    # ended already, and registering thousands of handles would cost more than the read.
    found = poll.check()
    if found is not None:
        return found
    with waiters.watch_many(workflow_ids) as event:
        found = poll.check()
        if found is not None:
            return found
        with waiters.waiting():
            while True:
                event.wait(poll.next_wait())
                event.clear()
                found = poll.check()
                if found is not None:
                    return found


async def wait_for_first_async(
    store: SystemStore, waiters: Waiters, workflow_ids: list[str], polling_interval_sec: float
) -> str:
    """`wait_for_first` for a coroutine."""
    poll = _FirstPoll(store, workflow_ids, polling_interval_sec)
    found = await asyncio.to_thread(poll.check)  # (see `wait_for_first`)
    if found is not None:
        return found
    with waiters.watch_many_async(workflow_ids) as event:
        found = await asyncio.to_thread(poll.check)
        if found is not None:
            return found
        with waiters.waiting():
            while True:
                with suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), poll.next_wait())
                event.clear()
                found = await asyncio.to_thread(poll.check)
                if found is not None:
                    return found


class _Backoff:
    """The pauses between a wait's reads: a wake-up ends a pause early; the pause doubles up
    to the polling interval, for what no wake-up reaches."""

    def __init__(self, polling_interval_sec: float, timeout_sec: float | None) -> None:
        self._timeout = timeout_sec
        self._delay = 0.002
        self._cap = max(polling_interval_sec, 0.002)
        self._waited = 0.0

    def next_wait(self) -> float:
        """How long to wait before the next read."""
        step = self._delay
        if self._timeout is not None:
            step = min(step, max(self._timeout - self._waited, 0.0))
        self._waited += step
        self._delay = min(self._delay * 2, self._cap)
        return step


class _Poll(_Backoff):
    """One wait's reads of the workflow's row, and the back-off between them."""

    def __init__(
        self,
        store: SystemStore,
        workflow_id: str,
        polling_interval_sec: float,
        timeout_sec: float | None,
    ) -> None:
        super().__init__(polling_interval_sec, timeout_sec)
        self._store = store
        self._workflow_id = workflow_id

    def check(self) -> tuple[bool, Any]:
        """(finished, value); raises the workflow's error, or TimeoutError once it is due."""
        __tracebackhide__ = True
        row = self._store.get_status_and_result(self._workflow_id)
        if row is None:
            raise DBOSNonExistentWorkflowError(self._workflow_id)
        finished, value = outcome_of(self._workflow_id, row)
        if not finished and self._timeout is not None and self._waited >= self._timeout:
            raise TimeoutError(
                f"workflow {self._workflow_id!r} did not finish within {self._timeout} s"
            )
        return finished, value


# How many looks of a `wait_for_first` that found nothing go by between reads of whether each
# workflow still exists.
_EXISTENCE_EVERY = 20


class _FirstPoll(_Backoff):
    """A `wait_for_first`'s reads: the first workflow to end among all, at each look."""

    def __init__(
        self, store: SystemStore, workflow_ids: list[str], polling_interval_sec: float
    ) -> None:
        super().__init__(polling_interval_sec, None)
        self._store = store
        self._ids = workflow_ids
        self._looks_unchecked = 0

    def check(self) -> str | None:
        """The id of the workflow that ended first, if any has. A look that finds none raises
        if one of them does not exist (a handle to an id never started, or one that ended and
        was deleted between two looks), which would never be found: asked at the first such
        look, then every `_EXISTENCE_EVERY` looks (an active workflow cannot be deleted, so
        this is rare, and the extra read is not worth making at every look)."""
        found = self._store.first_ended(self._ids)
        if found is None:
            if self._looks_unchecked == 0:
                missing = self._store.first_missing(self._ids)
                if missing is not None:
                    raise DBOSNonExistentWorkflowError(missing)
            self._looks_unchecked = (self._looks_unchecked + 1) % _EXISTENCE_EVERY
        return found
