"""What the system store's parts share: the row types callers pass in and get back, the base
class every part extends (the database handle, one workflow row by id), and small helpers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Select, select
from sqlalchemy.sql.elements import ColumnElement

from dbos_nb.models import WorkflowStatusString
from dbos_nb.storage.database import Database
from dbos_nb.storage.schema import batch_key, workflow_status

ws = workflow_status

PENDING = WorkflowStatusString.PENDING.value
ENQUEUED = WorkflowStatusString.ENQUEUED.value
CANCELLED = WorkflowStatusString.CANCELLED.value
MAX_RECOVERY_ATTEMPTS_EXCEEDED = WorkflowStatusString.MAX_RECOVERY_ATTEMPTS_EXCEEDED.value
# What a batch counts as failed, and retries.
FAILED = (WorkflowStatusString.ERROR.value, MAX_RECOVERY_ATTEMPTS_EXCEEDED)


@dataclass
class NewWorkflow:
    """A workflow row about to be written (by a direct start or an enqueue)."""

    workflow_id: str
    name: str
    inputs: bytes
    status: str
    created_at: int
    class_name: str | None = None
    config_name: str | None = None
    executor_id: str | None = None
    owner_xid: str | None = None
    application_version: str | None = None
    queue_name: str | None = None
    priority: int = 0
    deduplication_id: str | None = None
    workflow_timeout_ms: int | None = None
    workflow_deadline_epoch_ms: int | None = None
    parent_workflow_id: str | None = None
    # For a child workflow: the parent's operation number that records the child's id.
    parent_function_id: int | None = None
    started_at_epoch_ms: int | None = None
    recovery_attempts: int = 0
    batch_id: str | None = None
    function_hash: str | None = None
    token_estimate: int | None = None
    queue_partition_key: str | None = None


@dataclass
class StepPreflight:
    """What a step needs to know before it runs: is the workflow still live, is it recorded."""

    status: str | None
    deadline_ms: int | None
    recorded: bool
    function_name: str | None
    output: bytes | None
    error: bytes | None
    child_workflow_id: str | None
    owner_xid: str | None = None


class StoreBase:
    """What every part of `SystemStore` relies on: the system database."""

    db: Database

    def _get_row(self, conn: Connection, workflow_id: str) -> dict[str, Any] | None:
        return _first_mapping(conn, select(ws).where(ws.c.workflow_uuid == workflow_id))

    def _read_one(self, stmt: Select[Any]) -> dict[str, Any] | None:
        """The first row of a query, as a dict (None if there is none), in a short read."""
        with self.db.read() as conn:
            return _first_mapping(conn, stmt)


def _first_mapping(conn: Connection, stmt: Select[Any]) -> dict[str, Any] | None:
    row = conn.execute(stmt).mappings().first()
    return dict(row) if row is not None else None


def requeued_afresh(now_ms: int) -> dict[str, Any]:
    """Column values that put a workflow back in its queue as if it had never started: no
    owner, no attempt, no start time, and no deadline (a timeout starts again at the next
    dequeue). Retrying and resuming add what else they reset."""
    return {
        "status": ENQUEUED,
        "owner_xid": None,
        "executor_id": None,
        "recovery_attempts": 0,
        "started_at_epoch_ms": None,
        "workflow_deadline_epoch_ms": None,
        "completed_at": None,
        "updated_at": now_ms,
    }


def in_batch(batch_id: str) -> ColumnElement[bool]:
    """The rows of batch `batch_id`: those carrying its key (`ix_ws_batch`)."""
    return ws.c.batch_key == batch_key(batch_id)


def _row_values(wf: NewWorkflow) -> dict[str, Any]:
    return {
        "workflow_uuid": wf.workflow_id,
        "status": wf.status,
        "name": wf.name,
        "class_name": wf.class_name,
        "config_name": wf.config_name,
        "inputs": wf.inputs,
        "executor_id": wf.executor_id,
        "owner_xid": wf.owner_xid,
        "application_version": wf.application_version,
        "recovery_attempts": wf.recovery_attempts,
        "created_at": wf.created_at,
        "updated_at": wf.created_at,
        "queue_name": wf.queue_name,
        "priority": wf.priority,
        "deduplication_id": wf.deduplication_id,
        "started_at_epoch_ms": wf.started_at_epoch_ms,
        "workflow_timeout_ms": wf.workflow_timeout_ms,
        "workflow_deadline_epoch_ms": wf.workflow_deadline_epoch_ms,
        "parent_workflow_id": wf.parent_workflow_id,
        "batch_key": None if wf.batch_id is None else batch_key(wf.batch_id),
        "function_hash": wf.function_hash,
        "token_estimate": wf.token_estimate,
        "queue_partition_key": wf.queue_partition_key,
    }


def _chunks(items: Sequence[str], size: int) -> list[Sequence[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]
