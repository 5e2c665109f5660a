"""Inspecting and managing workflows through the store alone.

Shared by `DBOS` (in a launched process) and `DBOSClient` (in any process, with no threads): the
difference is only that a launched process also tells its own running executions to stop, and wakes
its scheduler.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from dbos_nb.core.handles import status_from_row, step_from_row
from dbos_nb.errors import DbosNbError, DBOSNonExistentWorkflowError, UnknownQueueError
from dbos_nb.models import StepInfo, WorkflowStatus
from dbos_nb.storage.store import SystemStore


def to_epoch_ms(value: Any, label: str) -> int | None:
    """Accept a datetime, an ISO-8601 string or epoch milliseconds."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return int(value.timestamp() * 1000)
    if isinstance(value, str):
        try:
            return int(datetime.fromisoformat(value).timestamp() * 1000)
        except ValueError as exc:
            raise DbosNbError(f"{label}: {value!r} is not an ISO-8601 time") from exc
    if isinstance(value, int | float) and not isinstance(value, bool):
        return int(value)
    raise DbosNbError(f"{label} must be a datetime, an ISO-8601 string or epoch ms, got {value!r}")


def workflow_rows(
    store: SystemStore,
    *,
    workflow_ids: list[str] | None = None,
    status: str | list[str] | None = None,
    name: str | None = None,
    queue_name: str | None = None,
    start_time: Any = None,
    end_time: Any = None,
    workflow_id_prefix: str | None = None,
    app_version: str | None = None,
    executor_id: str | None = None,
    limit: int | None = None,
    offset: int | None = None,
    sort_desc: bool = False,
    load_input: bool = True,
    load_output: bool = True,
) -> list[dict[str, Any]]:
    """Rows of the workflows matching every given filter, in enqueue order (newest first if
    `sort_desc`); inputs and outputs are left out unless `load_input` or `load_output`."""
    statuses = [status] if isinstance(status, str) else status
    # Read once: a generator would be used up by the check.
    if workflow_ids is not None and not isinstance(workflow_ids, str | bytes):
        workflow_ids = list(workflow_ids)
    if statuses is not None:
        statuses = list(statuses)
    _check_filters(
        workflow_ids,
        statuses,
        limit,
        offset,
        name=name,
        queue_name=queue_name,
        workflow_id_prefix=workflow_id_prefix,
        app_version=app_version,
        executor_id=executor_id,
    )
    return store.list_workflows(
        workflow_ids=workflow_ids,
        status=[str(s) for s in statuses] if statuses is not None else None,
        name=name,
        queue_name=queue_name,
        start_time=to_epoch_ms(start_time, "start_time"),
        end_time=to_epoch_ms(end_time, "end_time"),
        workflow_id_prefix=workflow_id_prefix,
        app_version=app_version,
        executor_id=executor_id,
        limit=limit,
        offset=offset,
        sort_desc=sort_desc,
        load_payloads=load_input or load_output,
    )


def _check_filters(workflow_ids: Any, statuses: Any, limit: Any, offset: Any, **texts: Any) -> None:
    """Refuse filters of the wrong kind with a clear error (rather than the database's, or a
    string read as a list of one-character ids)."""
    for key, value in (("workflow_ids", workflow_ids), ("status", statuses)):
        if value is not None and (
            isinstance(value, str | bytes) or not all(isinstance(v, str) for v in value)
        ):
            raise DbosNbError(f"{key} must be a list of strings, got {value!r}")
    for key, value in (("limit", limit), ("offset", offset)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 0
        ):
            raise DbosNbError(f"{key} must be a non-negative integer, got {value!r}")
    for key, value in texts.items():
        if value is not None and not isinstance(value, str):
            raise DbosNbError(f"{key} must be a string, got {value!r}")


def list_workflows(store: SystemStore, **filters: Any) -> list[WorkflowStatus]:
    """Workflows matching the filters of `workflow_rows`, as WorkflowStatus objects."""
    load = filters.get("load_input", True) or filters.get("load_output", True)
    return [status_from_row(r, load_payloads=load) for r in workflow_rows(store, **filters)]


def get_status(store: SystemStore, workflow_id: str) -> WorkflowStatus | None:
    row = store.get_workflow(workflow_id)
    return status_from_row(row) if row is not None else None


def list_steps(store: SystemStore, workflow_id: str) -> list[StepInfo]:
    return [step_from_row(r) for r in store.list_steps(workflow_id)]


def require_workflow(store: SystemStore, workflow_id: str) -> None:
    if store.get_workflow(workflow_id) is None:
        raise DBOSNonExistentWorkflowError(workflow_id)


def cancel(store: SystemStore, workflow_id: str, now_ms: int, cancel_children: bool) -> list[str]:
    """Cancel a workflow (and its descendants); returns the ids that changed."""
    require_workflow(store, workflow_id)
    return store.cancel_workflows([workflow_id], now_ms, cancel_children=cancel_children)


def resume(store: SystemStore, workflow_id: str, now_ms: int, queue_name: str | None) -> None:
    """Put a workflow back in a queue to run from its last completed step."""
    require_workflow(store, workflow_id)
    if queue_name is not None and store.get_queue(queue_name) is None:
        raise UnknownQueueError(queue_name)
    store.resume_workflow(workflow_id, now_ms, queue_name)
