"""Workflow handles and the conversion of stored rows into `WorkflowStatus` objects."""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable
from typing import Any, Generic, Protocol, TypeVar

from dbos_nb import serialization
from dbos_nb.errors import DBOSNonExistentWorkflowError, DBOSUnexpectedStepError
from dbos_nb.models import StepInfo, WorkflowStatus

R = TypeVar("R")
T = TypeVar("T")


class HandleBackend(Protocol):
    """What a handle needs: the launched runtime or a client provide it."""

    def wait_result(
        self, workflow_id: str, polling_interval_sec: float, timeout_sec: float | None
    ) -> Any: ...

    async def wait_result_async(
        self, workflow_id: str, polling_interval_sec: float, timeout_sec: float | None
    ) -> Any: ...

    def get_workflow_status(self, workflow_id: str) -> WorkflowStatus | None: ...

    def wait_first_id(self, workflow_ids: list[str], polling_interval_sec: float) -> str: ...

    async def wait_first_id_async(
        self, workflow_ids: list[str], polling_interval_sec: float
    ) -> str: ...


class WorkflowHandle(Generic[R]):
    """A reference to a workflow, valid in any process that reaches the same database.

    Used by workflow code, a handle of the launched process records its `get_result()` and
    `get_status()` as operations of that workflow ("DBOS.getResult", "DBOS.getStatus"), as
    DBOS does: a replay gets what the first run got, without waiting again. A client's handles
    record nothing, as DBOS's do not."""

    def __init__(self, backend: HandleBackend, workflow_id: str) -> None:
        self._backend = backend
        self.workflow_id = workflow_id

    def get_workflow_id(self) -> str:
        return self.workflow_id

    def get_result(
        self, polling_interval_sec: float = 1.0, *, timeout_sec: float | None = None
    ) -> R:
        """Wait for the workflow to finish; return its result or raise its error."""
        __tracebackhide__ = True  # IPython and pytest leave this frame out of tracebacks
        backend, wid = self._backend, self.workflow_id
        if _on_the_loop(backend) and _would_wait(backend, wid):
            _refuse_blocking_on_the_loop("get_result")
        value: R = _as_operation(
            backend,
            "DBOS.getResult",
            # A partial, not a lambda: no frame of its own in the error's traceback.
            functools.partial(backend.wait_result, wid, polling_interval_sec, timeout_sec),
            wid,
        )
        return value

    async def get_result_async(
        self, polling_interval_sec: float = 1.0, *, timeout_sec: float | None = None
    ) -> R:
        """Await the workflow's result without holding a thread; woken by its completion as
        `get_result` is."""
        __tracebackhide__ = True
        backend, wid = self._backend, self.workflow_id
        value: R = await _as_operation_async(
            backend,
            "DBOS.getResult",
            functools.partial(backend.wait_result_async, wid, polling_interval_sec, timeout_sec),
            wid,
        )
        return value

    async def get_status_async(self) -> WorkflowStatus:
        return self.get_status()

    def get_status(self) -> WorkflowStatus:
        backend, wid = self._backend, self.workflow_id
        status = _as_operation(backend, "DBOS.getStatus", lambda: backend.get_workflow_status(wid))
        if status is None:
            raise DBOSNonExistentWorkflowError(self.workflow_id)
        return status

    def __repr__(self) -> str:
        return f"WorkflowHandle({self.workflow_id!r})"


H = TypeVar("H", "WorkflowHandle[Any]", "WorkflowHandleAsync[Any]")


def wait_first_handle(backend: HandleBackend, handles: list[H], polling_interval_sec: float) -> H:
    """The handle of whichever of these workflows ends first (succeeds, fails or is
    cancelled): DBOS's `wait_first`. Workflow code records the answer as an operation
    ("DBOS.waitFirst"), so that a replay gets the same handle back without waiting."""
    __tracebackhide__ = True
    if _on_the_loop(backend):
        _refuse_blocking_on_the_loop("wait_first")
    ids, by_id = _by_id(handles)
    call = functools.partial(backend.wait_first_id, ids, polling_interval_sec)
    return _chosen(by_id, _as_operation(backend, "DBOS.waitFirst", call))


async def wait_first_handle_async(
    backend: HandleBackend, handles: list[H], polling_interval_sec: float
) -> H:
    """`wait_first_handle` for a coroutine: the same wake-ups, awaited."""
    __tracebackhide__ = True
    ids, by_id = _by_id(handles)
    call = functools.partial(backend.wait_first_id_async, ids, polling_interval_sec)
    return _chosen(by_id, await _as_operation_async(backend, "DBOS.waitFirst", call))


def _on_the_loop(backend: HandleBackend) -> bool:
    """Whether the caller runs on dbos_nb's own event loop (sync code in an `async def`
    workflow, or a sync step or helper it calls), where a blocking wait would stop every
    async workflow, the awaited ones too."""
    from dbos_nb.core.runtime import Runtime  # (the runtime module imports this one)

    return isinstance(backend, Runtime) and backend.aio.runs_here()


def _would_wait(backend: HandleBackend, workflow_id: str) -> bool:
    """Whether `get_result` of this workflow would wait: not if workflow code replays a read
    of it that its first run made (the record answers, even if the workflow runs again now,
    resumed), nor if the workflow has ended. (A first run refused here recorded nothing; its
    replay decides again the same way.)"""
    from dbos_nb.core.runtime import Runtime
    from dbos_nb.core.steps import workflow_code  # (the steps module imports this one)

    wf = workflow_code()
    if isinstance(backend, Runtime) and wf is not None:
        fid = wf.next_function_id
        if fid <= wf.last_recorded_fid:
            pre = backend.store.step_preflight(wf.workflow_id, fid)
            if pre.function_name == "DBOS.getResult" and pre.child_workflow_id == workflow_id:
                return False
    return _still_running(backend, workflow_id)


def _still_running(backend: HandleBackend, workflow_id: str) -> bool:
    """Whether the workflow has yet to end: only then would `get_result` block. Reading an
    ended workflow's result from the loop is fine (and common: a sync step of an async
    workflow reading a finished child)."""
    status = backend.get_workflow_status(workflow_id)
    return status is not None and status.status in ("PENDING", "ENQUEUED")


def _refuse_blocking_on_the_loop(call: str) -> None:
    """A blocking wait on dbos_nb's own event loop could never end: refused, as DBOS does."""
    raise RuntimeError(
        f"{call}() was called on the event loop of an async workflow, where it would "
        f"block every async workflow. Use await {call}_async(...) instead."
    )


def _by_id(handles: list[H]) -> tuple[list[str], dict[str, H]]:
    """The handles' workflow ids, in order, and each id's handle; refuses what DBOS refuses
    (no handles, the same workflow twice) and anything that is not a handle."""
    if isinstance(handles, WorkflowHandle | WorkflowHandleAsync) or not hasattr(
        handles, "__iter__"
    ):
        raise TypeError(f"wait_first takes a list of workflow handles, got {handles!r}")
    handles = list(handles)
    if not handles:
        raise ValueError("handles must not be empty")
    for handle in handles:
        if not isinstance(handle, WorkflowHandle | WorkflowHandleAsync):
            raise TypeError(f"wait_first takes workflow handles, got {handle!r}")
    ids = [handle.workflow_id for handle in handles]
    by_id = dict(zip(ids, handles, strict=True))
    if len(by_id) != len(ids):
        twice = next(wid for wid in ids if ids.count(wid) > 1)
        raise ValueError(f"handles must not contain duplicate workflow IDs ({twice!r} is twice)")
    return ids, by_id


def _chosen(by_id: dict[str, H], workflow_id: str) -> H:
    handle = by_id.get(workflow_id)
    if handle is None:  # only a replay can answer an id that is not among the handles
        raise DBOSUnexpectedStepError(
            f"DBOS.waitFirst recorded workflow {workflow_id!r}, which is not among the handles "
            f"this replay waits on ({sorted(by_id)}): the workflow's code is not deterministic "
            "or has changed"
        )
    return handle


def _as_operation(
    backend: HandleBackend, name: str, call: Callable[[], T], awaited: str | None = None
) -> T:
    """`call()`, made an operation of the calling workflow if the backend is the launched
    process's runtime (see `steps.call_as_operation`)."""
    __tracebackhide__ = True
    # Imported here: the runtime and the execution modules import this module.
    from dbos_nb.core.runtime import Runtime
    from dbos_nb.core.steps import call_as_operation

    if not isinstance(backend, Runtime):
        return call()
    return call_as_operation(backend, name, call, awaited)


async def _as_operation_async(
    backend: HandleBackend,
    name: str,
    call: Callable[[], Awaitable[T]],
    awaited: str | None = None,
) -> T:
    """The async twin of `_as_operation`."""
    __tracebackhide__ = True
    from dbos_nb.core.aio import call_as_operation_async
    from dbos_nb.core.runtime import Runtime

    if not isinstance(backend, Runtime):
        return await call()
    return await call_as_operation_async(backend, name, call, awaited)


def status_from_row(
    row: dict[str, Any], *, load_input: bool = True, load_output: bool = True
) -> WorkflowStatus:
    """Build a WorkflowStatus from a `workflow_status` row; its input as DBOS gives it,
    `{"args": (...), "kwargs": {...}}`."""
    inputs: Any = None
    output: Any = None
    error: BaseException | None = None
    if load_input:
        inputs = _safe(lambda: _input_of(row.get("inputs")))
    if load_output:
        output = _safe(lambda: serialization.loads(row.get("output")))
        error = serialization.load_error(row.get("error"))
    roles = row.get("authenticated_roles")
    return WorkflowStatus(
        workflow_id=row["workflow_uuid"],
        status=row["status"],
        name=row["name"],
        class_name=row.get("class_name"),
        config_name=row.get("config_name"),
        input=inputs,
        output=output,
        error=error,
        created_at=row.get("created_at"),
        updated_at=row.get("updated_at"),
        dequeued_at=row.get("started_at_epoch_ms"),
        completed_at=row.get("completed_at"),
        queue_name=row.get("queue_name"),
        priority=int(row.get("priority") or 0),
        deduplication_id=row.get("deduplication_id"),
        app_version=row.get("application_version"),
        executor_id=row.get("executor_id"),
        parent_workflow_id=row.get("parent_workflow_id"),
        recovery_attempts=int(row.get("recovery_attempts") or 0),
        workflow_timeout_ms=row.get("workflow_timeout_ms"),
        workflow_deadline_epoch_ms=row.get("workflow_deadline_epoch_ms"),
        authenticated_user=row.get("authenticated_user"),
        assumed_role=row.get("assumed_role"),
        authenticated_roles=json.loads(roles) if roles else None,
        forked_from=row.get("forked_from"),
        was_forked_from=bool(row.get("was_forked_from")),
        queue_partition_key=row.get("queue_partition_key"),
    )


def _input_of(blob: bytes | None) -> dict[str, Any] | None:
    if blob is None:
        return None
    args, kwargs = serialization.load_inputs(blob)
    return {"args": args, "kwargs": kwargs}


def step_from_row(row: dict[str, Any]) -> StepInfo:
    """Build a StepInfo from an `operation_outputs` row."""
    return StepInfo(
        function_id=int(row["function_id"]),
        function_name=row["function_name"],
        output=_safe(lambda: serialization.loads(row.get("output"))),
        error=serialization.load_error(row.get("error")),
        child_workflow_id=row.get("child_workflow_id"),
        started_at_epoch_ms=row.get("started_at_epoch_ms"),
        completed_at_epoch_ms=row.get("completed_at_epoch_ms"),
    )


def _safe(load: Any) -> Any:
    # A payload whose classes are not importable here is shown as a note, not an exception.
    try:
        return load()
    except Exception as exc:
        return f"<cannot load: {exc}>"


class WorkflowHandleAsync(Generic[R]):
    """The handle of the async API (`await DBOS.start_workflow_async(...)`, `enqueue_async`,
    `retrieve_workflow_async`): the same reference as `WorkflowHandle`, whose waiting is awaited
    instead of blocking the event loop."""

    def __init__(self, backend: HandleBackend, workflow_id: str) -> None:
        self._handle: WorkflowHandle[R] = WorkflowHandle(backend, workflow_id)
        self.workflow_id = workflow_id

    def get_workflow_id(self) -> str:
        return self.workflow_id

    async def get_result(
        self, polling_interval_sec: float = 1.0, *, timeout_sec: float | None = None
    ) -> R:
        """Await the workflow's end; return its result or raise its error. TimeoutError if
        `timeout_sec` passes first (the workflow keeps running)."""
        __tracebackhide__ = True
        return await self._handle.get_result_async(polling_interval_sec, timeout_sec=timeout_sec)

    async def get_status(self) -> WorkflowStatus:
        return self._handle.get_status()

    # The names the async entry points' handles answered to before they returned this class.
    get_result_async = get_result
    get_status_async = get_status

    def __repr__(self) -> str:
        return f"WorkflowHandleAsync({self.workflow_id!r})"
