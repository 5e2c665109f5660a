"""Inspecting and managing workflows through the store alone.

Shared by `DBOS` (in a launched process) and `DBOSClient` (in any process, with no threads): the
difference is only that a launched process also tells its own running executions to stop, and wakes
its scheduler.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.exc import IntegrityError

from dbos_nb.core.context import check_id_length, current
from dbos_nb.core.handles import status_from_row, step_from_row
from dbos_nb.errors import (
    DBOSConflictingWorkflowError,
    DbosNbError,
    DBOSNonExistentWorkflowError,
    UnknownQueueError,
)
from dbos_nb.ids import new_workflow_id
from dbos_nb.models import STATUSES, StepInfo, WorkflowStatus, status_value, stored_names
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
    name: str | list[str] | None = None,
    queue_name: str | list[str] | None = None,
    start_time: Any = None,
    end_time: Any = None,
    workflow_id_prefix: str | None = None,
    app_version: str | list[str] | None = None,
    executor_id: str | list[str] | None = None,
    parent_workflow_id: str | list[str] | None = None,
    forked_from: str | list[str] | None = None,
    was_forked_from: bool | None = None,
    queues_only: bool = False,
    limit: int | None = None,
    offset: int | None = None,
    sort_desc: bool = False,
    load_input: bool = True,
    load_output: bool = True,
) -> list[dict[str, Any]]:
    """Rows of the workflows matching every given filter, in enqueue order (newest first if
    `sort_desc`); inputs are left out unless `load_input`, outputs and errors unless
    `load_output`. Like DBOS, `status`, `name`, `queue_name`, `app_version`, `executor_id`,
    `parent_workflow_id` and `forked_from` take one value or a list of them (any of which
    matches); `was_forked_from` (a bool) keeps the workflows that have (or have not) been
    forked; `queues_only` those run through a queue."""
    # Read once: a generator would be used up by the check.
    if workflow_ids is not None and not isinstance(workflow_ids, str | bytes):
        workflow_ids = list(workflow_ids)
    _check_filters(workflow_ids, limit, offset, workflow_id_prefix)
    if was_forked_from is not None and not isinstance(was_forked_from, bool):
        raise DbosNbError(f"was_forked_from must be True, False or None, got {was_forked_from!r}")
    if not isinstance(queues_only, bool):
        raise DbosNbError(f"queues_only must be True or False, got {queues_only!r}")
    return store.list_workflows(
        workflow_ids=workflow_ids,
        status=_statuses(status),
        name=_names(name),
        queue_name=_one_or_many("queue_name", queue_name),
        start_time=to_epoch_ms(start_time, "start_time"),
        end_time=to_epoch_ms(end_time, "end_time"),
        workflow_id_prefix=workflow_id_prefix,
        app_version=_one_or_many("app_version", app_version),
        executor_id=_one_or_many("executor_id", executor_id),
        parent_workflow_id=_one_or_many("parent_workflow_id", parent_workflow_id),
        forked_from=_one_or_many("forked_from", forked_from),
        was_forked_from=was_forked_from,
        queues_only=queues_only,
        limit=limit,
        offset=offset,
        sort_desc=sort_desc,
        load_input=load_input,
        load_output=load_output,
    )


def _one_or_many(key: str, value: Any) -> list[str] | None:
    """A filter given as one string or a list of strings, as a list (None: no filter)."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, bytes) or not hasattr(value, "__iter__"):
        raise DbosNbError(f"{key} must be a string or a list of strings, got {value!r}")
    values = list(value)
    if not all(isinstance(v, str) for v in values):
        raise DbosNbError(f"{key} must be a string or a list of strings, got {value!r}")
    return [str(v) for v in values]  # a StrEnum member (WorkflowStatusString) as its value


def _statuses(value: Any) -> list[str] | None:
    """The status filter in any case; an unknown status is refused with the list (a typo would
    otherwise match no row and look like an empty result)."""
    given = _one_or_many("status", value)
    if given is None:
        return None
    statuses = []
    for text in given:
        status = status_value(text)
        if status is None:
            raise DbosNbError(f"unknown status {text!r}; valid: {', '.join(STATUSES)} (any case)")
        statuses.append(status)
    return statuses


def _names(value: Any) -> list[str] | None:
    """The name filter; a step's or transaction's name also finds it enqueued on its own."""
    given = _one_or_many("name", value)
    return None if given is None else [n for name in given for n in stored_names(name)]


def _check_filters(workflow_ids: Any, limit: Any, offset: Any, prefix: Any) -> None:
    """Refuse filters of the wrong kind with a clear error (rather than the database's, or a
    string read as a list of one-character ids)."""
    if workflow_ids is not None and (
        isinstance(workflow_ids, str | bytes) or not all(isinstance(v, str) for v in workflow_ids)
    ):
        raise DbosNbError(f"workflow_ids must be a list of strings, got {workflow_ids!r}")
    for key, value in (("limit", limit), ("offset", offset)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 0
        ):
            raise DbosNbError(f"{key} must be a non-negative integer, got {value!r}")
    if prefix is not None and not isinstance(prefix, str):
        raise DbosNbError(f"workflow_id_prefix must be a string, got {prefix!r}")


def list_workflows(store: SystemStore, **filters: Any) -> list[WorkflowStatus]:
    """Workflows matching the filters of `workflow_rows`, as WorkflowStatus objects."""
    load_input = filters.get("load_input", True)
    load_output = filters.get("load_output", True)
    return [
        status_from_row(r, load_input=load_input, load_output=load_output)
        for r in workflow_rows(store, **filters)
    ]


def list_queued(store: SystemStore, **filters: Any) -> list[WorkflowStatus]:
    """Workflows of a queue still waiting or running (or, with `status`, in that status),
    with the other filters of `workflow_rows`."""
    if filters.get("status") is None or filters.get("status") == []:  # [] as DBOS takes it
        filters["status"] = ["ENQUEUED", "PENDING"]
    return list_workflows(store, **{**filters, "queues_only": True})


def get_status(store: SystemStore, workflow_id: str) -> WorkflowStatus | None:
    row = store.get_workflow(workflow_id)
    return status_from_row(row) if row is not None else None


def list_steps(store: SystemStore, workflow_id: str) -> list[StepInfo]:
    return [step_from_row(r) for r in store.list_steps(workflow_id)]


def require_workflow(store: SystemStore, workflow_id: str) -> None:
    if store.get_workflow(workflow_id) is None:
        raise DBOSNonExistentWorkflowError(workflow_id)


def one_workflow_id(value: Any, call: str) -> str:
    """The id given to a single-workflow call: a non-empty string (another type reached the
    database as a bare driver error on PostgreSQL, and matched nothing on SQLite)."""
    if not isinstance(value, str) or not value:
        raise TypeError(f"{call} takes a workflow id (a non-empty string), got {value!r}")
    return value


def queue_name_given(value: Any, call: str) -> str:
    """The queue name given to a call by name: a non-empty string."""
    if not isinstance(value, str) or not value:
        raise TypeError(f"{call} takes a queue name (a non-empty string), got {value!r}")
    return value


def workflow_ids(value: Any, call: str) -> list[str]:
    """The ids given to a bulk call (`cancel_workflows`, ...): a list or tuple of non-empty
    strings. A lone string is refused: iterating it would act on its characters."""
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise TypeError(f"{call} takes a list of workflow ids, got {value!r}")
    for wid in value:
        if not isinstance(wid, str) or not wid:
            raise TypeError(f"{call}: a workflow id must be a non-empty string, got {wid!r}")
    return list(value)


def cancel(
    store: SystemStore, workflow_ids: list[str], now_ms: int, cancel_children: bool
) -> list[str]:
    """Cancel workflows (and their descendants); returns the ids that changed. An unknown id
    changes nothing and is not an error, as in DBOS (a script cancelling ids that may be gone
    keeps going)."""
    return store.cancel_workflows(workflow_ids, now_ms, cancel_children=cancel_children)


def resume(
    store: SystemStore, workflow_ids: list[str], now_ms: int, queue_name: str | None
) -> list[str]:
    """Put workflows back in a queue to run from their last completed step; returns the ids
    that changed (a finished one does not). An unknown id raises before any is resumed."""
    missing = store.first_missing(workflow_ids)
    if missing is not None:
        raise DBOSNonExistentWorkflowError(missing)
    if queue_name is not None and store.get_queue(queue_name) is None:
        raise UnknownQueueError(queue_name)
    return store.resume_workflows(workflow_ids, now_ms, queue_name)


def fork(
    store: SystemStore,
    workflow_id: str,
    start_step: int,
    now_ms: int,
    application_version: str | None,
    queue_name: str | None,
) -> str:
    """Enqueue a new workflow (the id `SetWorkflowID` gives, or a new one) that reuses the
    recorded operations of `workflow_id` before `start_step` and runs the rest; returns its id."""
    if isinstance(start_step, bool) or not isinstance(start_step, int):
        raise DbosNbError(f"start_step must be an operation number (an int), got {start_step!r}")
    if queue_name is not None and store.get_queue(queue_name) is None:
        raise UnknownQueueError(queue_name)
    if application_version is not None:
        check_id_length(application_version, "an application_version")
    ctx = current()
    new_id, ctx.next_workflow_id = ctx.next_workflow_id or new_workflow_id(), None
    taken = "a workflow with this id exists already; a fork needs a new id"
    if new_id == workflow_id or store.get_workflow(new_id) is not None:
        raise DBOSConflictingWorkflowError(new_id, taken)
    try:
        forked = store.fork_workflow(
            workflow_id, new_id, start_step, now_ms, application_version, queue_name
        )
    except IntegrityError as exc:  # another fork took the id meanwhile
        raise DBOSConflictingWorkflowError(new_id, taken) from exc
    if not forked:
        raise DBOSNonExistentWorkflowError(workflow_id)
    return new_id


def delete(store: SystemStore, workflow_ids: list[str], delete_children: bool) -> list[str]:
    """Delete finished workflows (and, if asked, their descendants) with everything recorded
    of them; returns the ids deleted. An unknown id deletes nothing, as in DBOS; an active
    workflow raises `WorkflowActiveError` and nothing is deleted."""
    return store.delete_workflows(workflow_ids, with_children=delete_children)
