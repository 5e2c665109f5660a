"""`DBOS`: the user-facing class, with DBOS Transact's class-level API.

`DBOS(config=...)` creates the process's instance; decorators, launch, destroy and the management
calls are class methods that act on it. The work is done by `engine.py` (lifecycle) and `core/`
(execution); this module only translates DBOS's API onto them.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import math
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from sqlalchemy.orm import Session

from dbos_nb.clock import Clock
from dbos_nb.core import aio, management, steps, workflows
from dbos_nb.core.context import current
from dbos_nb.core.enqueue_options import EnqueueOptions, enqueue_with_options
from dbos_nb.core.handles import (
    WorkflowHandle,
    WorkflowHandleAsync,
    wait_first_handle,
    wait_first_handle_async,
)
from dbos_nb.core.queue import (
    QUEUES,
    UNSET,
    Queue,
    one_concurrency,
    queue_class,
    stored_queue,
    stored_queues,
)
from dbos_nb.core.registry import REGISTRY, Kind, Registration, resolve
from dbos_nb.core.runtime import Runtime, get_runtime
from dbos_nb.engine import Engine, resolve_config
from dbos_nb.errors import (
    DBOSConfigError,
    DbosNbError,
    DBOSNonExistentWorkflowError,
    InvalidQueueSettingsError,
    UnknownQueueError,
)
from dbos_nb.models import StepInfo, StepStatus, WorkflowStatus
from dbos_nb.unsupported import refuse

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

_instance_lock = threading.RLock()


class classproperty(Generic[T]):
    """A read-only property of the class itself."""

    def __init__(self, fget: Callable[[Any], T]) -> None:
        self.fget = fget

    def __get__(self, _obj: Any, owner: Any) -> T:
        return self.fget(owner)


# Positional-only: `list_workflows(name=...)` passes its own `name` through **kwargs.
def _recorded(name: str, func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """`func(*args, **kwargs)`, an operation named `name` of the calling workflow if workflow
    code calls it (see `steps.call_as_operation`)."""
    call = functools.partial(func, *args, **kwargs)
    return steps.call_as_operation(get_runtime(), name, call)


async def _recorded_async(name: str, func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """`_recorded` for async callers: `func` runs in a thread, the operation number is taken
    on the caller's loop (see `aio.call_as_operation_async`)."""
    call = functools.partial(func, *args, **kwargs)
    return await aio.call_as_operation_async(get_runtime(), name, lambda: asyncio.to_thread(call))


def _decorate(kind: Kind, func: Callable[..., Any], name: str | None, **options: Any) -> Any:
    if not callable(func):
        raise DbosNbError(f"@DBOS.{kind}() decorates functions, got {func!r}")
    if inspect.iscoroutinefunction(func):
        if kind == "transaction":
            raise DbosNbError(
                f"{func.__qualname__}: transactions run in a database session; define it with "
                "'def' (async workflows can call it)"
            )
        async_runner = aio.call_workflow_async if kind == "workflow" else aio.call_step_async

        @functools.wraps(func)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            __tracebackhide__ = True  # IPython and pytest leave this frame out of tracebacks
            return await async_runner(get_runtime(), reg, args, kwargs)

        wrapper: Callable[..., Any] = async_wrapper
    else:
        runner = {
            "workflow": workflows.call_workflow,
            "step": steps.call_step,
            "transaction": steps.call_transaction,
        }[kind]

        @functools.wraps(func)
        def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
            __tracebackhide__ = True
            return runner(get_runtime(), reg, args, kwargs)

        wrapper = sync_wrapper
    reg = Registration(
        name=name or func.__qualname__, kind=kind, func=func, wrapper=wrapper, **options
    )
    wrapper.__dbos_nb_registration__ = reg  # type: ignore[attr-defined]
    REGISTRY.register(reg)
    return wrapper


def _fastapi_hook(app: Any) -> Callable[[str, Callable[[], None]], None]:
    """How to run DBOS.launch/destroy at a FastAPI app's startup and shutdown.

    Starlette 1.x keeps `add_event_handler` only on the router. An app built with its own
    `lifespan=` does not run these handlers: call DBOS.launch() in that lifespan instead.
    """
    for owner in (getattr(app, "router", None), app):
        hook = getattr(owner, "add_event_handler", None)
        if callable(hook):
            return cast(Callable[[str, Callable[[], None]], None], hook)
    raise DBOSConfigError(
        f"cannot attach DBOS to {type(app).__name__}: it has no add_event_handler; call "
        "DBOS.launch() in the app's lifespan instead"
    )


class _DBOSType(type):
    """DBOS's metaclass: names a DBOS Transact API that dbos_nb leaves out (`DBOS.send`,
    `DBOS.set_event`, ...) in a clear error. Consulted only when the ordinary lookup fails."""

    if not TYPE_CHECKING:  # hidden from type checkers, which still flag a misspelt name

        def __getattr__(cls, name: str) -> Any:
            error = refuse(cls.__name__, name)
            if error is not None:
                raise error
            raise AttributeError(f"type object {cls.__name__!r} has no attribute {name!r}")


# DBOS's choices of what `register_queue` does with a queue already stored.
_ON_CONFLICT = ("update_if_latest_version", "always_update", "never_update")


class DBOS(metaclass=_DBOSType):
    """The process's DBOS instance and DBOS Transact's class-level API."""

    _engine: Engine | None = None
    _config_key: Any = None

    def __new__(
        cls,
        *,
        config: dict[str, Any] | None = None,
        fastapi: Any = None,
        clock: Clock | None = None,
        **_ignored: Any,
    ) -> DBOS:
        resolved = resolve_config(config)
        attach = _fastapi_hook(fastapi) if fastapi is not None else None
        with _instance_lock:
            if cls._engine is not None:
                if cls._config_key == resolved:
                    return object.__new__(cls)
                raise DBOSConfigError(
                    "DBOS was already created with a different configuration; call "
                    "DBOS.destroy() before creating it again"
                )
            cls._engine = Engine(resolved, clock=clock)
            cls._config_key = resolved
        if attach is not None:
            attach("startup", cls.launch)
            attach("shutdown", cls.destroy)
        return object.__new__(cls)

    def __init__(self, **_kwargs: Any) -> None:
        pass

    # -- lifecycle ------------------------------------------------------------------------------

    @classmethod
    def launch(cls) -> None:
        """Open the database, recover unfinished work and start the background worker."""
        with _instance_lock:
            if cls._engine is None:
                raise DBOSConfigError("create DBOS with DBOS(config={...}) before DBOS.launch()")
            cls._engine.launch()

    @classmethod
    def destroy(
        cls, *, destroy_registry: bool = False, workflow_completion_timeout_sec: float = 0.0
    ) -> None:
        """Stop the worker and close the database; unfinished work resumes at the next launch."""
        with _instance_lock:
            engine, cls._engine, cls._config_key = cls._engine, None, None
        if engine is not None:
            engine.destroy(workflow_completion_timeout_sec)
        if destroy_registry:
            REGISTRY.clear()

    @classmethod
    def _rt(cls) -> Runtime:
        return get_runtime()

    # -- decorators -----------------------------------------------------------------------------

    @classmethod
    def workflow(
        cls, *, name: str | None = None, max_recovery_attempts: int = 100
    ) -> Callable[[F], F]:
        """Make a function a durable workflow."""
        if not isinstance(max_recovery_attempts, int) or max_recovery_attempts < 0:
            raise DbosNbError(
                "max_recovery_attempts must be a non-negative integer, "
                f"got {max_recovery_attempts!r}"
            )

        def decorator(func: F) -> F:
            return cast(
                F, _decorate("workflow", func, name, max_recovery_attempts=max_recovery_attempts)
            )

        return decorator

    @classmethod
    def step(
        cls,
        *,
        name: str | None = None,
        retries_allowed: bool = False,
        interval_seconds: float = 1.0,
        max_attempts: int = 3,
        backoff_rate: float = 2.0,
        max_rate_limit_retries: int = 20,
    ) -> Callable[[F], F]:
        """Make a function a checkpointed step (optionally retried with exponential back-off).

        A step that raises `RateLimited` (or an HTTP 429 error of httpx, openai or requests) is
        retried after the delay the provider asked for, up to `max_rate_limit_retries` times,
        without using up `max_attempts`; its queue starts no new work until then. A 429 that
        no wait cures (out of credit, or a request larger than the provider's whole limit) is
        an ordinary error instead.
        """
        if not isinstance(max_attempts, int) or max_attempts < 1:
            raise DbosNbError(f"max_attempts must be a positive integer, got {max_attempts!r}")
        for key, value, least in (
            ("interval_seconds", interval_seconds, 0.0),
            ("backoff_rate", backoff_rate, 1.0),
        ):
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value < least
            ):
                raise DbosNbError(f"{key} must be a finite number >= {least:g}, got {value!r}")
        if not isinstance(max_rate_limit_retries, int) or max_rate_limit_retries < 0:
            raise DbosNbError(
                "max_rate_limit_retries must be a non-negative integer, "
                f"got {max_rate_limit_retries!r}"
            )

        def decorator(func: F) -> F:
            return cast(
                F,
                _decorate(
                    "step",
                    func,
                    name,
                    retries_allowed=retries_allowed,
                    max_attempts=max_attempts,
                    interval_seconds=interval_seconds,
                    backoff_rate=backoff_rate,
                    max_rate_limit_retries=max_rate_limit_retries,
                ),
            )

        return decorator

    @classmethod
    def transaction(
        cls, isolation_level: str | None = "SERIALIZABLE", *, name: str | None = None
    ) -> Callable[[F], F]:
        """Make a function a transaction on the application database, committed exactly once."""
        level = steps.validate_isolation_level(isolation_level)

        def decorator(func: F) -> F:
            return cast(F, _decorate("transaction", func, name, isolation_level=level))

        return decorator

    @classmethod
    def dbos_class(cls, *_args: Any, **_kwargs: Any) -> Callable[[type[T]], type[T]]:
        """Mark a class whose methods are workflows or steps (names are `Class.method`)."""

        def decorator(klass: type[T]) -> type[T]:
            return klass

        return decorator

    # -- starting work --------------------------------------------------------------------------

    @classmethod
    def start_workflow(cls, func: Callable[..., T], *args: Any, **kwargs: Any) -> WorkflowHandle[T]:
        """Start a workflow in the background; returns its handle at once."""
        rt = cls._rt()
        reg, call_args = resolve(func, args)
        wid = workflows.start_workflow(rt, reg, call_args, kwargs)
        return WorkflowHandle(rt, wid)

    @classmethod
    def register_queue(
        cls,
        name: str,
        *,
        concurrency: int | None = UNSET,
        worker_concurrency: int | None = UNSET,
        limiter: dict[str, Any] | None = UNSET,
        priority_enabled: bool = UNSET,
        polling_interval_sec: float = UNSET,
        global_concurrency: int | None = UNSET,
        token_limiter: dict[str, Any] | None = UNSET,
        partition_concurrency: int | None = UNSET,
        partition_worker_concurrency: int | None = UNSET,
        partition_limiter: dict[str, Any] | None = UNSET,
        on_conflict: str = "update_if_latest_version",
    ) -> Queue:
        """Declare a queue (DBOS 3's spelling of `Queue(...)`). `on_conflict`: DBOS's default
        `"update_if_latest_version"` and `"always_update"` store the settings given (queues
        keep no application version here); `"never_update"` stores them only for a new queue
        and otherwise takes the stored ones."""
        if on_conflict not in _ON_CONFLICT:
            raise InvalidQueueSettingsError(
                f"queue {name!r}: on_conflict must be one of {', '.join(_ON_CONFLICT)}, "
                f"got {on_conflict!r}"
            )
        return queue_class()(
            name,
            one_concurrency(concurrency, global_concurrency, name),
            limiter,
            worker_concurrency=worker_concurrency,
            priority_enabled=priority_enabled,
            polling_interval_sec=polling_interval_sec,
            token_limiter=token_limiter,
            partition_concurrency=partition_concurrency,
            partition_worker_concurrency=partition_worker_concurrency,
            partition_limiter=partition_limiter,
            _keep_stored=on_conflict == "never_update",
        )

    @classmethod
    def enqueue_workflow(
        cls, queue_name: str, func: Callable[..., T], *args: Any, **kwargs: Any
    ) -> WorkflowHandle[T]:
        """Enqueue a function on a queue given by name."""
        management.queue_name_given(queue_name, "DBOS.enqueue_workflow")
        queue = QUEUES.get(queue_name)
        if queue is not None:
            return queue.enqueue(func, *args, **kwargs)
        rt = cls._rt()
        if rt.store.get_queue(queue_name) is None and not (
            workflows.replaying_a_recorded_operation(rt)
        ):
            raise UnknownQueueError(queue_name)
        reg, call_args = resolve(func, args)
        wid = workflows.enqueue_workflow(rt, queue_name, reg, call_args, kwargs)
        return WorkflowHandle(rt, wid)

    @classmethod
    async def enqueue_workflow_async(
        cls, queue_name: str, func: Callable[..., T], *args: Any, **kwargs: Any
    ) -> WorkflowHandleAsync[T]:
        """`enqueue_workflow` for async callers (one short database write, as
        `queue.enqueue_async`); the handle's `get_result()` and `get_status()` are awaited."""
        handle = cls.enqueue_workflow(queue_name, func, *args, **kwargs)
        return WorkflowHandleAsync(cls._rt(), handle.workflow_id)

    @classmethod
    async def register_queue_async(cls, name: str, **settings: Any) -> Queue:
        """`register_queue` for async callers (the declaration stores the settings: one short
        database write, made on a thread)."""
        return await asyncio.to_thread(lambda: cls.register_queue(name, **settings))

    @classmethod
    def delete_queue(cls, name: str) -> None:
        """Delete a queue: its stored settings go, and this process stops serving it. Refused
        (QueueNotEmptyError) while workflows of the queue are enqueued or running; an unknown
        name is not an error, as in DBOS. Another process that declared the queue starts
        nothing more from it; declaring it again brings it back."""
        management.queue_name_given(name, "DBOS.delete_queue")
        rt = cls._rt()
        rt.store.delete_queue(name)
        QUEUES.forget(name)

    @classmethod
    async def delete_queue_async(cls, name: str) -> None:
        await asyncio.to_thread(cls.delete_queue, name)

    @classmethod
    def retrieve_queue(cls, name: str) -> Queue | None:
        """The queue `name` with the settings stored for it (as every process sees them), or
        None if no process declared it. Not a declaration: this process does not start
        serving the queue."""
        return stored_queue(cls._rt().store, name)

    @classmethod
    async def retrieve_queue_async(cls, name: str) -> Queue | None:
        return await asyncio.to_thread(cls.retrieve_queue, name)

    @classmethod
    def list_queues(cls) -> list[Queue]:
        """Every queue some process declared, with its stored settings, by name."""
        return stored_queues(cls._rt().store)

    @classmethod
    async def list_queues_async(cls) -> list[Queue]:
        return await asyncio.to_thread(cls.list_queues)

    @classmethod
    def enqueue_workflow_with_options(
        cls, options: EnqueueOptions, *args: Any, **kwargs: Any
    ) -> WorkflowHandle[Any]:
        """Enqueue a workflow by name, with the options of `DBOSClient.enqueue`, from inside
        the application; the function need not be registered in this process (another process
        sharing the database may run it). Options left unset come from the caller's
        `SetWorkflowID`, `SetEnqueueOptions` and `SetWorkflowTimeout`; in workflow code the
        enqueue is recorded as a child, as any enqueue."""
        rt = cls._rt()
        return WorkflowHandle(rt, enqueue_with_options(rt, options, args, kwargs))

    @classmethod
    async def enqueue_workflow_with_options_async(
        cls, options: EnqueueOptions, *args: Any, **kwargs: Any
    ) -> WorkflowHandleAsync[Any]:
        """`enqueue_workflow_with_options` for async callers (one short database write, as
        `queue.enqueue_async`); the handle's `get_result()` and `get_status()` are awaited."""
        rt = cls._rt()
        return WorkflowHandleAsync(rt, enqueue_with_options(rt, options, args, kwargs))

    # -- inspecting and managing ----------------------------------------------------------------
    #
    # Called by workflow code, these are operations of the workflow, recorded under DBOS's names
    # for them (see `steps.call_as_operation`): a recovered workflow gets what its first run got
    # and does not fork, cancel or resume a second time. Elsewhere they are plain calls.

    @classmethod
    def retrieve_workflow(
        cls, workflow_id: str, existing_workflow: bool = True
    ) -> WorkflowHandle[Any]:
        management.one_workflow_id(workflow_id, "DBOS.retrieve_workflow")
        rt = cls._rt()
        if existing_workflow:
            # Workflow code checks through DBOS's recorded status read; other callers need only
            # the row's presence, without loading the workflow's inputs and output.
            if steps.workflow_code() is not None:
                found: object = cls.get_workflow_status(workflow_id)
            else:
                found = rt.store.get_workflow(workflow_id)
            if found is None:
                raise DBOSNonExistentWorkflowError(workflow_id)
        return WorkflowHandle(rt, workflow_id)

    @classmethod
    def get_workflow_status(cls, workflow_id: str) -> WorkflowStatus | None:
        management.one_workflow_id(workflow_id, "DBOS.get_workflow_status")
        return _recorded("DBOS.getStatus", cls._rt().get_workflow_status, workflow_id)

    @classmethod
    def get_result(cls, workflow_id: str, *, polling_interval_sec: float = 1.0) -> Any:
        # One recorded operation ("DBOS.getResult"), as in DBOS: no status read before it (an
        # unknown id raises DBOSNonExistentWorkflowError from the wait).
        management.one_workflow_id(workflow_id, "DBOS.get_result")
        return WorkflowHandle(cls._rt(), workflow_id).get_result(polling_interval_sec)

    @classmethod
    def list_workflows(cls, **filters: Any) -> list[WorkflowStatus]:
        """Workflows matching every given filter (workflow_ids, status, name, queue_name,
        start_time, end_time, workflow_id_prefix, app_version, executor_id,
        parent_workflow_id, forked_from, was_forked_from, queues_only, limit, offset,
        sort_desc, load_input, load_output), oldest first
        unless `sort_desc`; status, name, queue_name, app_version, executor_id and
        parent_workflow_id take one value or a list."""
        return _recorded("DBOS.listWorkflows", cls._list_workflows, **filters)

    @classmethod
    def list_queued_workflows(
        cls, *, queue_name: str | None = None, **kwargs: Any
    ) -> list[WorkflowStatus]:
        """Workflows still waiting in a queue or running from one (or, with `status=`, of a
        queue and in that status); the other filters of `list_workflows`."""
        return _recorded(
            "DBOS.listQueuedWorkflows", cls._list_queued, queue_name=queue_name, **kwargs
        )

    @classmethod
    def list_workflow_steps(cls, workflow_id: str) -> list[StepInfo]:
        management.one_workflow_id(workflow_id, "DBOS.list_workflow_steps")
        return _recorded("DBOS.listWorkflowSteps", cls._list_steps, workflow_id)

    @classmethod
    def cancel_workflow(cls, workflow_id: str, *, cancel_children: bool = False) -> None:
        """Cancel a workflow: it stops at its next step and waiting on it raises."""
        management.one_workflow_id(workflow_id, "DBOS.cancel_workflow")
        _recorded("DBOS.cancelWorkflow", cls._cancel, [workflow_id], cancel_children)

    @classmethod
    def cancel_workflows(cls, workflow_ids: list[str], *, cancel_children: bool = False) -> None:
        """`cancel_workflow` for several workflows at once, in one transaction (as in DBOS,
        recorded in workflow code as one "DBOS.cancelWorkflow")."""
        ids = management.workflow_ids(workflow_ids, "DBOS.cancel_workflows")
        _recorded("DBOS.cancelWorkflow", cls._cancel, ids, cancel_children)

    @classmethod
    def resume_workflow(
        cls, workflow_id: str, *, queue_name: str | None = None
    ) -> WorkflowHandle[Any]:
        """Run a cancelled or dead-lettered workflow again from its last completed step."""
        management.one_workflow_id(workflow_id, "DBOS.resume_workflow")
        _recorded("DBOS.resumeWorkflow", cls._resume, [workflow_id], queue_name)
        return WorkflowHandle(cls._rt(), workflow_id)

    @classmethod
    def resume_workflows(
        cls, workflow_ids: list[str], *, queue_name: str | None = None
    ) -> list[WorkflowHandle[Any]]:
        """`resume_workflow` for several workflows at once, in one transaction; an unknown id
        raises before any is resumed. Returns a handle per id, in order."""
        ids = management.workflow_ids(workflow_ids, "DBOS.resume_workflows")
        _recorded("DBOS.resumeWorkflow", cls._resume, ids, queue_name)
        rt = cls._rt()
        return [WorkflowHandle(rt, wid) for wid in ids]

    @classmethod
    def fork_workflow(
        cls,
        workflow_id: str,
        start_step: int,
        *,
        application_version: str | None = None,
        queue_name: str | None = None,
    ) -> WorkflowHandle[Any]:
        """Start a new workflow that reuses the steps of `workflow_id` before `start_step`."""
        management.one_workflow_id(workflow_id, "DBOS.fork_workflow")
        new_id = _recorded(
            "DBOS.forkWorkflow",
            cls._fork,
            workflow_id,
            start_step,
            application_version,
            queue_name,
        )
        # As DBOS does: a handle through `retrieve_workflow` (in a workflow, a "DBOS.getStatus").
        return cls.retrieve_workflow(new_id)

    @classmethod
    def delete_workflow(cls, workflow_id: str, *, delete_children: bool = False) -> None:
        """Delete a finished workflow and everything recorded of it (with its descendants if
        `delete_children`). An unknown id is not an error; a workflow still queued or running
        raises `WorkflowActiveError` (cancel it first) and nothing is deleted."""
        management.one_workflow_id(workflow_id, "DBOS.delete_workflow")
        _recorded("DBOS.deleteWorkflow", cls._delete, [workflow_id], delete_children)

    @classmethod
    def delete_workflows(cls, workflow_ids: list[str], *, delete_children: bool = False) -> None:
        """`delete_workflow` for several workflows at once, in one transaction: if one is still
        queued or running, `WorkflowActiveError` and none is deleted."""
        ids = management.workflow_ids(workflow_ids, "DBOS.delete_workflows")
        _recorded("DBOS.deleteWorkflow", cls._delete, ids, delete_children)

    # What the management calls do, recorded or not (and, for the async twins, in a thread).

    @classmethod
    def _list_workflows(cls, **filters: Any) -> list[WorkflowStatus]:
        return management.list_workflows(cls._rt().store, **filters)

    @classmethod
    def _list_queued(cls, **filters: Any) -> list[WorkflowStatus]:
        return management.list_queued(cls._rt().store, **filters)

    @classmethod
    def _list_steps(cls, workflow_id: str) -> list[StepInfo]:
        return management.list_steps(cls._rt().store, workflow_id)

    @classmethod
    def _cancel(cls, workflow_ids: list[str], cancel_children: bool) -> None:
        rt = cls._rt()
        changed = management.cancel(rt.store, workflow_ids, rt.now_ms(), cancel_children)
        rt.ended_elsewhere(changed, "cancelled")
        rt.wake_scheduler()

    @classmethod
    def _resume(cls, workflow_ids: list[str], queue_name: str | None) -> None:
        rt = cls._rt()
        management.resume(rt.store, workflow_ids, rt.now_ms(), queue_name)
        rt.wake_scheduler()

    @classmethod
    def _fork(
        cls,
        workflow_id: str,
        start_step: int,
        application_version: str | None,
        queue_name: str | None,
    ) -> str:
        rt = cls._rt()
        new_id = management.fork(
            rt.store, workflow_id, start_step, rt.now_ms(), application_version, queue_name
        )
        rt.wake_scheduler()
        return new_id

    @classmethod
    def _delete(cls, workflow_ids: list[str], delete_children: bool) -> None:
        management.delete(cls._rt().store, workflow_ids, delete_children)

    @classmethod
    def recover_pending_workflows(
        cls, executor_ids: list[str] | None = None
    ) -> list[WorkflowHandle[Any]]:
        """Put the PENDING workflows of the given executors back in their queues to resume."""
        rt = cls._rt()
        ids: list[str] = []
        for executor in executor_ids or [rt.executor_id]:
            ids.extend(rt.store.requeue_pending(executor, rt.now_ms()))
        rt.wake_scheduler()
        return [WorkflowHandle(rt, w) for w in ids]

    @classmethod
    def report_usage(cls, *, tokens: int | None = None, cost: float | None = None) -> None:
        """Inside a step: record the tokens and cost it really used. The tokens replace the
        task's estimate in its queue's token budget; both are stored per workflow."""
        steps.report_usage(cls._rt(), tokens, cost)

    @classmethod
    async def sleep_async(cls, seconds: float) -> None:
        """Durable sleep for async workflows (does not block the loop)."""
        await aio.durable_sleep_async(cls._rt(), seconds)

    @classmethod
    async def start_workflow_async(
        cls, func: Callable[..., T], *args: Any, **kwargs: Any
    ) -> WorkflowHandleAsync[T]:
        """`start_workflow` for async callers (the workflow may be sync or async); the handle's
        `get_result()` and `get_status()` are awaited."""
        handle = cls.start_workflow(func, *args, **kwargs)
        return WorkflowHandleAsync(cls._rt(), handle.workflow_id)

    @classmethod
    async def retrieve_workflow_async(
        cls, workflow_id: str, existing_workflow: bool = True
    ) -> WorkflowHandleAsync[Any]:
        """`retrieve_workflow` for async callers: a handle whose methods are awaited."""
        handle = cls.retrieve_workflow(workflow_id, existing_workflow)
        return WorkflowHandleAsync(cls._rt(), handle.workflow_id)

    # The management calls for async callers: each is one short database exchange, run in a
    # thread so that the event loop goes on meanwhile; recorded as the sync ones are.

    @classmethod
    async def get_workflow_status_async(cls, workflow_id: str) -> WorkflowStatus | None:
        return await _recorded_async("DBOS.getStatus", cls._rt().get_workflow_status, workflow_id)

    @classmethod
    async def list_workflows_async(cls, **filters: Any) -> list[WorkflowStatus]:
        return await _recorded_async("DBOS.listWorkflows", cls._list_workflows, **filters)

    @classmethod
    async def list_queued_workflows_async(cls, **filters: Any) -> list[WorkflowStatus]:
        return await _recorded_async("DBOS.listQueuedWorkflows", cls._list_queued, **filters)

    @classmethod
    async def list_workflow_steps_async(cls, workflow_id: str) -> list[StepInfo]:
        return await _recorded_async("DBOS.listWorkflowSteps", cls._list_steps, workflow_id)

    @classmethod
    async def cancel_workflow_async(
        cls, workflow_id: str, *, cancel_children: bool = False
    ) -> None:
        await _recorded_async("DBOS.cancelWorkflow", cls._cancel, [workflow_id], cancel_children)

    @classmethod
    async def cancel_workflows_async(
        cls, workflow_ids: list[str], *, cancel_children: bool = False
    ) -> None:
        ids = management.workflow_ids(workflow_ids, "DBOS.cancel_workflows_async")
        await _recorded_async("DBOS.cancelWorkflow", cls._cancel, ids, cancel_children)

    @classmethod
    async def resume_workflow_async(
        cls, workflow_id: str, *, queue_name: str | None = None
    ) -> WorkflowHandleAsync[Any]:
        await _recorded_async("DBOS.resumeWorkflow", cls._resume, [workflow_id], queue_name)
        return WorkflowHandleAsync(cls._rt(), workflow_id)

    @classmethod
    async def resume_workflows_async(
        cls, workflow_ids: list[str], *, queue_name: str | None = None
    ) -> list[WorkflowHandleAsync[Any]]:
        ids = management.workflow_ids(workflow_ids, "DBOS.resume_workflows_async")
        await _recorded_async("DBOS.resumeWorkflow", cls._resume, ids, queue_name)
        rt = cls._rt()
        return [WorkflowHandleAsync(rt, wid) for wid in ids]

    @classmethod
    async def fork_workflow_async(
        cls,
        workflow_id: str,
        start_step: int,
        *,
        application_version: str | None = None,
        queue_name: str | None = None,
    ) -> WorkflowHandleAsync[Any]:
        new_id = await _recorded_async(
            "DBOS.forkWorkflow",
            cls._fork,
            workflow_id,
            start_step,
            application_version,
            queue_name,
        )
        return await cls.retrieve_workflow_async(new_id)

    @classmethod
    async def delete_workflow_async(
        cls, workflow_id: str, *, delete_children: bool = False
    ) -> None:
        await _recorded_async("DBOS.deleteWorkflow", cls._delete, [workflow_id], delete_children)

    @classmethod
    async def delete_workflows_async(
        cls, workflow_ids: list[str], *, delete_children: bool = False
    ) -> None:
        ids = management.workflow_ids(workflow_ids, "DBOS.delete_workflows_async")
        await _recorded_async("DBOS.deleteWorkflow", cls._delete, ids, delete_children)

    @classmethod
    async def get_result_async(cls, workflow_id: str) -> Any:
        return await WorkflowHandle(cls._rt(), workflow_id).get_result_async()

    @classmethod
    def wait_first(
        cls, handles: list[WorkflowHandle[Any]], *, polling_interval_sec: float = 1.0
    ) -> WorkflowHandle[Any]:
        """Wait until one of these workflows ends (succeeds, fails or is cancelled) and return
        its handle; of several already ended, the one that ended first. In workflow code the
        answer is recorded ("DBOS.waitFirst"): a replay gets the same handle at once."""
        return wait_first_handle(cls._rt(), handles, polling_interval_sec)

    @classmethod
    async def wait_first_async(
        cls, handles: list[WorkflowHandleAsync[Any]], *, polling_interval_sec: float = 1.0
    ) -> WorkflowHandleAsync[Any]:
        """`wait_first` for async callers: awaited, without holding a thread."""
        return await wait_first_handle_async(cls._rt(), handles, polling_interval_sec)

    @classmethod
    def sleep(cls, seconds: float) -> None:
        """Sleep durably: a recovered workflow sleeps only for what remains."""
        rt = cls._rt()
        if rt.aio.runs_here():
            # As in DBOS: a blocking sleep there would stop every async workflow with it.
            raise RuntimeError(
                "DBOS.sleep() was called on dbos_nb's event loop (in an async def workflow, or "
                "sync code it calls): use await DBOS.sleep_async(...) instead"
            )
        steps.durable_sleep(rt, seconds)

    # -- what the running code can ask ----------------------------------------------------------

    @classproperty
    def workflow_id(cls) -> str | None:
        wf = current().workflow
        return wf.workflow_id if wf is not None else None

    @classproperty
    def step_id(cls) -> int | None:
        frame = current().step
        return frame.step_id if frame is not None else None

    @classproperty
    def step_status(cls) -> StepStatus | None:
        frame = current().step
        if frame is None:
            return None
        return StepStatus(frame.step_id, frame.attempt, frame.max_attempts)

    @classproperty
    def sql_session(cls) -> Session:
        return steps.current_session()

    @classproperty
    def logger(cls) -> logging.Logger:
        return logging.getLogger("dbos_nb")

    @classproperty
    def application_version(cls) -> str:
        return get_runtime().app_version

    @classproperty
    def executor_id(cls) -> str:
        return get_runtime().executor_id
