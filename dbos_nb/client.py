"""DBOSClient: enqueue and manage workflows from a process that never imported the app's code.

It talks to the system database through the store only and starts no threads. Workflows are named
by their registered name; the queue and the name must have been declared by some process that uses
the database (their settings and names are stored there), unless `allow_unregistered` is set.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Any

from dbos_nb import serialization
from dbos_nb.clock import Clock, SystemClock
from dbos_nb.core import management
from dbos_nb.core.enqueue_options import EnqueueOptions, check_target, row_name, validate_options
from dbos_nb.core.handles import (
    WorkflowHandle,
    WorkflowHandleAsync,
    wait_first_handle,
    wait_first_handle_async,
)
from dbos_nb.core.queue import (
    UNSET,
    Queue,
    one_concurrency,
    register_by_client,
    stored_queue,
    stored_queues,
)
from dbos_nb.core.queue_settings import build_settings
from dbos_nb.core.waiters import (
    Waiters,
    wait_for_first,
    wait_for_first_async,
    wait_for_result,
    wait_for_result_async,
)
from dbos_nb.errors import (
    DBOSConfigError,
    DBOSConflictingWorkflowError,
    DbosNbError,
)
from dbos_nb.ids import new_workflow_id
from dbos_nb.models import StepInfo, WorkflowStatus, WorkflowStatusString
from dbos_nb.storage.database import Database, sqlite_file
from dbos_nb.storage.migrations import migrate
from dbos_nb.storage.store import NewWorkflow, SystemStore
from dbos_nb.unsupported import refuse

# A client's transactions are a few statements long; one open this long is a frozen process's
# (on PostgreSQL the server then ends it, releasing its locks). Workers use their lease.
STALLED_TRANSACTION_SEC = 30.0
# How long a client trusts that a queue is declared and a name registered as a given kind, once
# it has read so: a loop of enqueues then costs one round trip each, not three. Only facts that
# let an enqueue go on are kept (a queue declared a moment after a refusal is seen at once);
# a name registered anew as another kind is seen within this time.
TARGET_TTL_SEC = 5.0


class DBOSClient:
    """A connection to a dbos_nb system database for enqueueing and managing workflows."""

    def __init__(
        self,
        system_database_url: str | None = None,
        *,
        database_url: str | None = None,
        polling_interval_sec: float = 0.5,
        clock: Clock | None = None,
        create: bool = False,
    ) -> None:
        """Connect to an application's system database. A SQLite file that does not exist is
        refused (a mistyped path would otherwise give a new, empty database that no worker
        reads) unless `create=True`, for a client that enqueues before any worker launched."""
        url = system_database_url or database_url
        if not url:
            raise DbosNbError("DBOSClient needs the system database URL")
        path = sqlite_file(url)
        if path is not None and not create and not os.path.isfile(path):
            raise DBOSConfigError(
                f"no database at {path}: check the path (the application creates it when it "
                "launches), or pass create=True to start an empty one"
            )
        self._db = Database(
            url,
            pool_size=2,
            max_overflow=8,
            stalled_transaction_timeout_sec=STALLED_TRANSACTION_SEC,
            system_tables=True,
        )
        migrate(self._db)
        self._store = SystemStore(self._db)
        self._clock: Clock = clock or SystemClock()
        self._waiters = Waiters()
        self._poll = polling_interval_sec
        # (queue, name) -> (the name's kind, when it was read), see TARGET_TTL_SEC.
        self._targets: dict[tuple[str, str], tuple[str, int]] = {}

    # -- enqueue --------------------------------------------------------------------------------

    def enqueue(self, options: EnqueueOptions, *args: Any, **kwargs: Any) -> WorkflowHandle[Any]:
        """Enqueue a workflow by name; returns its handle (idempotent by `workflow_id`)."""
        opts = validate_options(options)
        queue_name = opts["queue_name"]
        name = opts["workflow_name"]
        allow = bool(opts.get("allow_unregistered", False))
        now_ms = self._clock.now_ms()
        kind = self._target_kind(queue_name, name, allow, now_ms)
        name_in_row = row_name(name, kind)
        timeout = opts.get("workflow_timeout")
        wid = opts.get("workflow_id") or new_workflow_id()
        row = NewWorkflow(
            workflow_id=wid,
            name=name_in_row,
            inputs=serialization.dump_inputs(name, args, kwargs),
            status=WorkflowStatusString.ENQUEUED.value,
            created_at=now_ms,
            application_version=opts.get("app_version"),
            queue_name=queue_name,
            priority=int(opts.get("priority") or 0),
            deduplication_id=opts.get("deduplication_id"),
            workflow_timeout_ms=round(timeout * 1000) if timeout is not None else None,
            queue_partition_key=opts.get("queue_partition_key"),
        )
        existing = self._store.insert_workflow(row)
        if existing is not None and existing["name"] != name_in_row:
            raise DBOSConflictingWorkflowError(
                wid, f"it belongs to workflow {existing['name']!r}, not {name_in_row!r}"
            )
        return WorkflowHandle(self, wid)

    def _target_kind(self, queue_name: str, name: str, allow: bool, now_ms: int) -> str | None:
        """The kind `name` was registered as; raises if the queue or the name is unknown (unless
        `allow`). Read from the database, or remembered for TARGET_TTL_SEC."""
        key = (queue_name, name)
        known = self._targets.get(key)
        if known is not None and 0 <= now_ms - known[1] < TARGET_TTL_SEC * 1000:
            return known[0]
        declared, kind = self._store.enqueue_target(queue_name, name)
        kind = check_target(queue_name, name, declared, kind, allow)
        if declared and kind is not None:
            if len(self._targets) >= 1024:  # names of a long-lived client's past: forget them
                self._targets.clear()
            self._targets[key] = (kind, now_ms)
        return kind

    async def enqueue_async(
        self, options: EnqueueOptions, *args: Any, **kwargs: Any
    ) -> WorkflowHandleAsync[Any]:
        """`enqueue` for async callers (the write runs in a thread); the handle is awaited."""
        handle = await asyncio.to_thread(self.enqueue, options, *args, **kwargs)
        return WorkflowHandleAsync(self, handle.workflow_id)

    # -- handles --------------------------------------------------------------------------------

    def wait_result(
        self, workflow_id: str, polling_interval_sec: float, timeout_sec: float | None
    ) -> Any:
        poll = min(polling_interval_sec, self._poll)
        return wait_for_result(
            self._store, self._waiters, self._clock, workflow_id, poll, timeout_sec
        )

    async def wait_result_async(
        self, workflow_id: str, polling_interval_sec: float, timeout_sec: float | None
    ) -> Any:
        poll = min(polling_interval_sec, self._poll)
        return await wait_for_result_async(
            self._store, self._waiters, workflow_id, poll, timeout_sec
        )

    def wait_first_id(self, workflow_ids: list[str], polling_interval_sec: float) -> str:
        poll = min(polling_interval_sec, self._poll)
        return wait_for_first(self._store, self._waiters, workflow_ids, poll)

    async def wait_first_id_async(
        self, workflow_ids: list[str], polling_interval_sec: float
    ) -> str:
        poll = min(polling_interval_sec, self._poll)
        return await wait_for_first_async(self._store, self._waiters, workflow_ids, poll)

    def wait_first(
        self, handles: list[WorkflowHandle[Any]], *, polling_interval_sec: float = 1.0
    ) -> WorkflowHandle[Any]:
        """Wait until one of these workflows ends (succeeds, fails or is cancelled) and return
        its handle; of several already ended, the one that ended first."""
        return wait_first_handle(self, handles, polling_interval_sec)

    async def wait_first_async(
        self, handles: list[WorkflowHandleAsync[Any]], *, polling_interval_sec: float = 1.0
    ) -> WorkflowHandleAsync[Any]:
        """`wait_first` for async callers."""
        return await wait_first_handle_async(self, handles, polling_interval_sec)

    def get_workflow_status(self, workflow_id: str) -> WorkflowStatus | None:
        management.one_workflow_id(workflow_id, "DBOSClient.get_workflow_status")
        return management.get_status(self._store, workflow_id)

    def retrieve_workflow(
        self, workflow_id: str, existing_workflow: bool = True
    ) -> WorkflowHandle[Any]:
        management.one_workflow_id(workflow_id, "DBOSClient.retrieve_workflow")
        if existing_workflow:
            management.require_workflow(self._store, workflow_id)
        return WorkflowHandle(self, workflow_id)

    async def retrieve_workflow_async(
        self, workflow_id: str, existing_workflow: bool = True
    ) -> WorkflowHandleAsync[Any]:
        """`retrieve_workflow` for async callers: a handle whose methods are awaited."""
        handle = await asyncio.to_thread(self.retrieve_workflow, workflow_id, existing_workflow)
        return WorkflowHandleAsync(self, handle.workflow_id)

    def get_result(self, workflow_id: str) -> Any:
        return self.retrieve_workflow(workflow_id).get_result()

    # -- management -----------------------------------------------------------------------------

    def list_workflows(self, **filters: Any) -> list[WorkflowStatus]:
        return management.list_workflows(self._store, **filters)

    def retrieve_queue(self, name: str) -> Queue | None:
        """The queue `name` with its stored settings, or None if no process declared it (to
        read its limits: enqueue through `enqueue`)."""
        return stored_queue(self._store, name, by_client=True)

    async def retrieve_queue_async(self, name: str) -> Queue | None:
        return await asyncio.to_thread(self.retrieve_queue, name)

    def list_queues(self) -> list[Queue]:
        """Every queue some process declared, with its stored settings, by name."""
        return stored_queues(self._store, by_client=True)

    def register_queue(
        self,
        name: str,
        *,
        global_concurrency: int | None = None,
        worker_concurrency: int | None = None,
        limiter: dict[str, Any] | None = None,
        partition_concurrency: int | None = None,
        partition_worker_concurrency: int | None = None,
        partition_limiter: dict[str, Any] | None = None,
        polling_interval_sec: float = 1.0,
        on_conflict: str = "always_update",
        priority_enabled: bool = UNSET,
        token_limiter: dict[str, Any] | None = UNSET,
        concurrency: int | None = None,
    ) -> Queue:
        """Declare a queue from the client, as DBOS's client does: its settings are stored for
        every process, whose next claims obey them. A process serves it once it declares the
        name (`Queue("llm")` takes the stored settings) or listens to every queue. With
        `on_conflict="never_update"`, a queue already stored keeps its settings. dbos_nb's
        `priority_enabled` and `token_limiter`, which DBOS's client lacks, keep their stored
        values unless given. Returns the queue as stored (to enqueue, use `enqueue`)."""
        settings = build_settings(
            name,
            one_concurrency(concurrency, global_concurrency, name),
            worker_concurrency,
            limiter,
            False if priority_enabled is UNSET else priority_enabled,
            polling_interval_sec,
            None if token_limiter is UNSET else token_limiter,
            partition_concurrency,
            partition_worker_concurrency,
            partition_limiter,
        )
        return register_by_client(
            self._store,
            settings,
            self._clock.now_ms(),
            on_conflict,
            keep_priority=priority_enabled is UNSET,
            keep_tokens=token_limiter is UNSET,
        )

    async def register_queue_async(self, name: str, **settings: Any) -> Queue:
        return await asyncio.to_thread(lambda: self.register_queue(name, **settings))

    def delete_queue(self, name: str) -> None:
        """Delete a queue's stored settings, as `DBOS.delete_queue` does (refused while
        workflows of the queue are enqueued or running; an unknown name is not an error)."""
        management.queue_name_given(name, "DBOSClient.delete_queue")
        self._store.delete_queue(name)
        # The client's memory of names it checked must not let it enqueue there for 5 s more.
        self._targets = {key: v for key, v in self._targets.items() if key[0] != name}

    async def delete_queue_async(self, name: str) -> None:
        await asyncio.to_thread(self.delete_queue, name)

    async def list_queues_async(self) -> list[Queue]:
        return await asyncio.to_thread(self.list_queues)

    def list_queued_workflows(
        self, *, queue_name: str | None = None, **filters: Any
    ) -> list[WorkflowStatus]:
        return management.list_queued(self._store, queue_name=queue_name, **filters)

    def list_workflow_steps(self, workflow_id: str) -> list[StepInfo]:
        management.one_workflow_id(workflow_id, "DBOSClient.list_workflow_steps")
        return management.list_steps(self._store, workflow_id)

    def cancel_workflow(self, workflow_id: str, *, cancel_children: bool = False) -> None:
        management.one_workflow_id(workflow_id, "DBOSClient.cancel_workflow")
        management.cancel(self._store, [workflow_id], self._clock.now_ms(), cancel_children)

    def cancel_workflows(self, workflow_ids: list[str], *, cancel_children: bool = False) -> None:
        """`cancel_workflow` for several workflows at once, in one transaction."""
        ids = management.workflow_ids(workflow_ids, "DBOSClient.cancel_workflows")
        management.cancel(self._store, ids, self._clock.now_ms(), cancel_children)

    def resume_workflow(
        self, workflow_id: str, *, queue_name: str | None = None
    ) -> WorkflowHandle[Any]:
        management.one_workflow_id(workflow_id, "DBOSClient.resume_workflow")
        management.resume(self._store, [workflow_id], self._clock.now_ms(), queue_name)
        return WorkflowHandle(self, workflow_id)

    def resume_workflows(
        self, workflow_ids: list[str], *, queue_name: str | None = None
    ) -> list[WorkflowHandle[Any]]:
        """`resume_workflow` for several workflows at once, in one transaction; an unknown id
        raises before any is resumed."""
        ids = management.workflow_ids(workflow_ids, "DBOSClient.resume_workflows")
        management.resume(self._store, ids, self._clock.now_ms(), queue_name)
        return [WorkflowHandle(self, wid) for wid in ids]

    def fork_workflow(
        self,
        workflow_id: str,
        start_step: int,
        *,
        application_version: str | None = None,
        queue_name: str | None = None,
    ) -> WorkflowHandle[Any]:
        """Enqueue a new workflow that reuses the recorded operations of `workflow_id` before
        `start_step` and runs the rest (by a process that serves its queue)."""
        management.one_workflow_id(workflow_id, "DBOSClient.fork_workflow")
        new_id = management.fork(
            self._store,
            workflow_id,
            start_step,
            self._clock.now_ms(),
            application_version,
            queue_name,
        )
        return WorkflowHandle(self, new_id)

    def delete_workflow(self, workflow_id: str, *, delete_children: bool = False) -> None:
        """Delete a finished workflow and its records (see `DBOS.delete_workflow`)."""
        management.one_workflow_id(workflow_id, "DBOSClient.delete_workflow")
        management.delete(self._store, [workflow_id], delete_children)

    def delete_workflows(self, workflow_ids: list[str], *, delete_children: bool = False) -> None:
        """`delete_workflow` for several workflows at once: if one is still queued or running,
        `WorkflowActiveError` and none is deleted."""
        ids = management.workflow_ids(workflow_ids, "DBOSClient.delete_workflows")
        management.delete(self._store, ids, delete_children)

    # -- the same for async callers: each call runs its short database exchange in a thread --

    async def get_workflow_status_async(self, workflow_id: str) -> WorkflowStatus | None:
        return await asyncio.to_thread(self.get_workflow_status, workflow_id)

    async def list_workflows_async(self, **filters: Any) -> list[WorkflowStatus]:
        return await asyncio.to_thread(self.list_workflows, **filters)

    async def list_queued_workflows_async(self, **filters: Any) -> list[WorkflowStatus]:
        return await asyncio.to_thread(self.list_queued_workflows, **filters)

    async def list_workflow_steps_async(self, workflow_id: str) -> list[StepInfo]:
        return await asyncio.to_thread(self.list_workflow_steps, workflow_id)

    async def cancel_workflow_async(
        self, workflow_id: str, *, cancel_children: bool = False
    ) -> None:
        await asyncio.to_thread(self.cancel_workflow, workflow_id, cancel_children=cancel_children)

    async def cancel_workflows_async(
        self, workflow_ids: list[str], *, cancel_children: bool = False
    ) -> None:
        await asyncio.to_thread(
            self.cancel_workflows, workflow_ids, cancel_children=cancel_children
        )

    async def resume_workflow_async(
        self, workflow_id: str, *, queue_name: str | None = None
    ) -> WorkflowHandleAsync[Any]:
        await asyncio.to_thread(self.resume_workflow, workflow_id, queue_name=queue_name)
        return WorkflowHandleAsync(self, workflow_id)

    async def resume_workflows_async(
        self, workflow_ids: list[str], *, queue_name: str | None = None
    ) -> list[WorkflowHandleAsync[Any]]:
        handles = await asyncio.to_thread(
            self.resume_workflows, workflow_ids, queue_name=queue_name
        )
        return [WorkflowHandleAsync(self, h.workflow_id) for h in handles]

    async def fork_workflow_async(
        self,
        workflow_id: str,
        start_step: int,
        *,
        application_version: str | None = None,
        queue_name: str | None = None,
    ) -> WorkflowHandleAsync[Any]:
        handle = await asyncio.to_thread(
            self.fork_workflow,
            workflow_id,
            start_step,
            application_version=application_version,
            queue_name=queue_name,
        )
        return WorkflowHandleAsync(self, handle.workflow_id)

    async def delete_workflow_async(
        self, workflow_id: str, *, delete_children: bool = False
    ) -> None:
        await asyncio.to_thread(self.delete_workflow, workflow_id, delete_children=delete_children)

    async def delete_workflows_async(
        self, workflow_ids: list[str], *, delete_children: bool = False
    ) -> None:
        await asyncio.to_thread(
            self.delete_workflows, workflow_ids, delete_children=delete_children
        )

    if not TYPE_CHECKING:  # hidden from type checkers, which still flag a misspelt name

        def __getattr__(self, name: str) -> Any:
            # Only for names the class lacks: DBOS's client API that dbos_nb leaves out.
            error = refuse("DBOSClient", name, client=True)
            if error is not None:
                raise error
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def destroy(self) -> None:
        """Close the client's connections."""
        self._db.dispose()

    def __enter__(self) -> DBOSClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.destroy()
