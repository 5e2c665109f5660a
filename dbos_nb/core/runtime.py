"""The live components of one launched DBOS instance, shared by the core modules.

`engine.py` builds a Runtime at launch and installs it as the current one; the core modules
(workflows, steps, queues, scheduler) receive it and never reach for globals themselves, except
through `get_runtime()` where a user-facing call (a decorated function, `queue.enqueue`) has no
other way to find it.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from dbos_nb.clock import Clock
from dbos_nb.core.context import RunningWorkflow
from dbos_nb.core.functions import FunctionResolver
from dbos_nb.core.handles import status_from_row
from dbos_nb.core.loop import LoopThread
from dbos_nb.core.pool import ElasticPool
from dbos_nb.core.registry import Registration, Registry
from dbos_nb.core.waiters import (
    Waiters,
    wait_for_first,
    wait_for_first_async,
    wait_for_result,
    wait_for_result_async,
)
from dbos_nb.errors import DBOSNotLaunchedError
from dbos_nb.models import ClaimedWorkflow, WorkflowStatus
from dbos_nb.storage.database import Database
from dbos_nb.storage.store import SystemStore

# Why the scheduler is woken for a queue.
WAKE_ANY = "any"  # anything may have changed
WAKE_ENQUEUED = "enqueued"  # new work was enqueued
WAKE_FREED = "freed"  # a workflow of the queue ended: a concurrency slot is free


class DirectSlot(NamedTuple):
    """A slot of this process that `DirectStarter.reserve` took for one workflow."""

    # The queue's worker_concurrency as the slot was counted against it (None: no limit): the
    # write that starts the workflow checks that the stored settings still say so.
    worker_concurrency: int | None


class DirectStarter(Protocol):
    """The scheduler, as seen by an enqueue that may start its work at once (see
    `workflows.enqueue_workflow`)."""

    def reserve(self, queue_name: str) -> DirectSlot | None:
        """Take a slot of this process for a workflow of `queue_name`, if this process serves
        that queue, the queue is known to have no limit shared between processes (at most a
        worker_concurrency, which this process counts alone) and this process has room."""

    def cancel_reservation(self, queue_name: str) -> None:
        """Give back a slot that `reserve` took and that was not used."""

    def adopt(self, item: ClaimedWorkflow, is_async: bool) -> bool:
        """Run a workflow written as already started, in the slot `reserve` took (`is_async`:
        its function is a coroutine function, as the enqueuer knows). False when the workers
        have stopped (the slot is given back; the workflow did not start here)."""


# How many workflows `Runtime._stopped_ends` remembers (a claim reads its workflow's last
# operation a moment before it runs: only the latest stops can matter).
_STOPPED_ENDS_KEPT = 10_000


@dataclass
class Runtime:
    """Everything a running workflow, step, queue or scheduler needs."""

    db: Database
    store: SystemStore
    app_db: Database
    clock: Clock
    registry: Registry
    pool: ElasticPool
    waiters: Waiters
    executor_id: str
    app_version: str
    polling_interval_sec: float
    resolver: FunctionResolver
    stopping: threading.Event = field(default_factory=threading.Event)
    _running: dict[str, RunningWorkflow] = field(default_factory=dict)
    _running_lock: threading.Lock = field(default_factory=threading.Lock)
    # Workflows whose execution here ended after being told to stop (cancelled, taken over):
    # it may have recorded an operation after a new execution's claim read the last one.
    _stopped_ends: dict[str, None] = field(default_factory=dict)
    # How many times a request to stop (a cancel, a timeout, another process's notice) found
    # no execution here for some workflow. Between the write that makes a row ours (a claim,
    # a start) and the execution's registration, such a request finds nothing to stop: an
    # execution registering after the count moved since its write reads its row once (see
    # `workflows.register`), instead of running steps for a workflow cancelled meanwhile.
    _missed_stops: int = 0
    _wake: threading.Event = field(default_factory=threading.Event)
    _stored_versions: set[str] = field(default_factory=set)
    # Queues whose state changed since the scheduler last looked (all of them at first), with
    # what changed (WAKE_*).
    _dirty: dict[str, set[str]] = field(default_factory=dict)
    _dirty_all: bool = True
    # Queues whose last claim a full concurrency limit stopped (see mark_slot_bound).
    _slot_bound: set[str] = field(default_factory=set)
    # The loop async workflows run on, and how to start one there (set by the engine, since
    # the async module sits above this one).
    aio: LoopThread = field(default_factory=LoopThread)
    run_async: Callable[[Any], concurrent.futures.Future[Any]] | None = None
    # Set while the scheduler runs (by the engine, since the scheduler sits above this module).
    direct: DirectStarter | None = None

    def now_ms(self) -> int:
        return self.clock.now_ms()

    # -- in-process executions --------------------------------------------------------------------

    def add_running(self, running: RunningWorkflow) -> RunningWorkflow | None:
        """Register an execution; None if registered, else the execution of that workflow
        that this process runs already."""
        with self._running_lock:
            other = self._running.get(running.workflow_id)
            if other is None:
                self._running[running.workflow_id] = running
        if other is None and running.deadline_ms is not None:
            # The scheduler sweeps for overdue workflows often only while some run; one
            # asleep for its polling interval must learn that this one does (a direct start
            # or a child wakes it through nothing else).
            self._wake.set()
        return other

    def remove_running(self, workflow_id: str) -> None:
        """Unregister the workflow's execution, and tell whoever waits for it to end."""
        with self._running_lock:
            running = self._running.pop(workflow_id, None)
            if running is not None and running.preempt_reason is not None:
                self._stopped_ends[workflow_id] = None
                if len(self._stopped_ends) > _STOPPED_ENDS_KEPT:  # the oldest go first
                    del self._stopped_ends[next(iter(self._stopped_ends))]
        if running is not None:
            running.ended.set()

    def ended_after_stop(self, workflow_id: str) -> bool:
        """Whether an execution of the workflow ended here after being told to stop, since the
        last time this was asked (see `_stopped_ends`)."""
        if not self._stopped_ends:  # the common case, asked at every claimed start: no lock
            return False
        with self._running_lock:
            return self._stopped_ends.pop(workflow_id, 0) is None

    def is_running(self, workflow_id: str) -> bool:
        with self._running_lock:
            return workflow_id in self._running

    def running_count(self) -> int:
        """How many executions run in this process now (no lock: a hint)."""
        return len(self._running)

    def has_running(self) -> bool:
        """Whether any execution runs in this process now (no copy, no lock: a hint)."""
        return bool(self._running)

    def running_ids(self) -> list[str]:
        with self._running_lock:
            return list(self._running)

    def running_owners(self) -> dict[str, str]:
        """Workflow id -> owner token of every execution running in this process."""
        with self._running_lock:
            return {wid: running.owner_xid for wid, running in self._running.items()}

    def preempt(self, workflow_ids: list[str], reason: str) -> None:
        """Ask local executions to stop at their next durable operation."""
        with self._running_lock:
            targets = [self._running[w] for w in workflow_ids if w in self._running]
            if len(targets) < len(workflow_ids):
                self._missed_stops += 1
        for running in targets:
            # The first reason stands: a timed-out workflow is also seen CANCELLED by the
            # sweep a moment later, and its caller must learn that it timed out.
            if running.preempt_reason is None:
                running.preempt_reason = reason
            running.interrupt.set()

    def missed_stop(self) -> None:
        """A request to stop some workflow, heard here, that found no execution of it (see
        `_missed_stops`)."""
        with self._running_lock:
            self._missed_stops += 1

    def stop_mark(self) -> int:
        """Read before a write that makes a workflow's row this process's to run, and given to
        its execution (`Execution.stop_mark`): see `_missed_stops`."""
        return self._missed_stops

    def preempt_all(self, reason: str) -> None:
        self.preempt(self.running_ids(), reason)

    def ended_elsewhere(self, workflow_ids: list[str], reason: str) -> None:
        """Workflows just cancelled (or timed out) in the store: stop their local executions at
        their next operation, and wake whoever waits on them."""
        self.preempt(workflow_ids, reason)
        for wid in workflow_ids:
            self.waiters.notify(wid)

    # -- function versions ----------------------------------------------------------------------

    def ensure_stored(self, reg: Registration) -> str:
        """Store this version of a function before the first workflow that runs it is written,
        so that any process can run exactly that version later; returns the version."""
        version = reg.version
        if version in self._stored_versions:
            return version
        version, payload = reg.payload()
        if payload is not None:
            self.store.record_function_versions(
                [(reg.name, version, reg.kind, reg.module, payload)], self.now_ms()
            )
        if not self.db.in_write():
            # Inside an open transaction the row commits only with it: it may roll back.
            self._stored_versions.add(version)
        return version

    # -- the handle backend ---------------------------------------------------------------------

    def wait_result(
        self, workflow_id: str, polling_interval_sec: float, timeout_sec: float | None
    ) -> Any:
        __tracebackhide__ = True  # IPython and pytest leave this frame out of tracebacks
        poll = min(polling_interval_sec, self.polling_interval_sec)
        return wait_for_result(self.store, self.waiters, self.clock, workflow_id, poll, timeout_sec)

    async def wait_result_async(
        self, workflow_id: str, polling_interval_sec: float, timeout_sec: float | None
    ) -> Any:
        __tracebackhide__ = True
        poll = min(polling_interval_sec, self.polling_interval_sec)
        return await wait_for_result_async(self.store, self.waiters, workflow_id, poll, timeout_sec)

    def wait_first_id(self, workflow_ids: list[str], polling_interval_sec: float) -> str:
        poll = min(polling_interval_sec, self.polling_interval_sec)
        return wait_for_first(self.store, self.waiters, workflow_ids, poll)

    async def wait_first_id_async(
        self, workflow_ids: list[str], polling_interval_sec: float
    ) -> str:
        poll = min(polling_interval_sec, self.polling_interval_sec)
        return await wait_for_first_async(self.store, self.waiters, workflow_ids, poll)

    def get_workflow_status(self, workflow_id: str) -> WorkflowStatus | None:
        row = self.store.get_workflow(workflow_id)
        return status_from_row(row) if row is not None else None

    # -- waking the scheduler ---------------------------------------------------------------------

    def wake_scheduler(self, queue_name: str | None = None, reason: str = WAKE_ANY) -> None:
        """Ask the scheduler to claim again: from one queue that changed, or from all.

        `reason` lets it skip claims that cannot succeed: work enqueued on a queue that is
        full, or a slot freed on a queue that has no concurrency limit to free."""
        with self._running_lock:
            if queue_name is None:
                self._dirty_all = True
            else:
                self._dirty.setdefault(queue_name, set()).add(reason)
        if reason == WAKE_FREED and queue_name not in self._slot_bound:
            # Recorded, but not worth waking the scheduler's thread (a GIL hand-over per
            # finished workflow): no concurrency limit stopped the queue's last claim.
            return
        self._wake.set()

    def mark_slot_bound(self, queue_name: str, bound: bool) -> None:
        """The scheduler: whether the queue's last claim stopped at a full concurrency limit,
        so that a freed slot is worth waking it for.

        Race-free with `wake_scheduler`: a waker records its reason before it reads the set,
        and the scheduler adds to the set before it reads the recorded reasons; one of them
        sees the other."""
        if not bound:
            self._slot_bound.discard(queue_name)
            return
        self._slot_bound.add(queue_name)
        with self._running_lock:
            freed = WAKE_FREED in self._dirty.get(queue_name, ())
        if freed:
            self._wake.set()

    def take_dirty(self) -> tuple[bool, dict[str, set[str]]]:
        """(all queues changed?, the queues that changed and why) since the last call."""
        with self._running_lock:
            everything, queues = self._dirty_all, self._dirty
            self._dirty_all, self._dirty = False, {}
        return everything, queues

    @property
    def wake_event(self) -> threading.Event:
        return self._wake


_current: Runtime | None = None
_current_lock = threading.Lock()


def set_runtime(runtime: Runtime | None) -> None:
    global _current
    with _current_lock:
        _current = runtime


def get_runtime() -> Runtime:
    """The launched runtime; raises a clear error when DBOS is not launched."""
    runtime = _current
    if runtime is None:
        raise DBOSNotLaunchedError(
            "DBOS is not launched: create it with DBOS(config={...}) and call DBOS.launch() first"
        )
    return runtime


def peek_runtime() -> Runtime | None:
    return _current
