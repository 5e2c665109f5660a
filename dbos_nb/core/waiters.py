"""Waiting for workflow outcomes: targeted wake-ups, with polling as the fallback.

A waiter registers an Event for the workflow it waits on. A completion in this process, or a
PostgreSQL notification from another one, sets exactly that Event, so thousands of waiting handles
cost nothing until their own workflow ends. Polling with back-off covers what no notification
reaches (other processes on SQLite).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
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


class Waiters:
    """Per-workflow wake-up events."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: dict[str, list[threading.Event]] = {}

    @contextmanager
    def watch(self, workflow_id: str) -> Iterator[threading.Event]:
        event = threading.Event()
        with self._lock:
            self._events.setdefault(workflow_id, []).append(event)
        try:
            yield event
        finally:
            with self._lock:
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
    delay = 0.002
    cap = max(polling_interval_sec, 0.002)
    waited = 0.0
    with waiters.watch(workflow_id) as event:
        while True:
            row = store.get_status_and_result(workflow_id)
            if row is None:
                raise DBOSNonExistentWorkflowError(workflow_id)
            finished, value = outcome_of(workflow_id, row)
            if finished:
                return value
            if timeout_sec is not None and waited >= timeout_sec:
                raise TimeoutError(
                    f"workflow {workflow_id!r} did not finish within {timeout_sec} s"
                )
            step = delay if timeout_sec is None else min(delay, max(timeout_sec - waited, 0.0))
            event.wait(step)
            event.clear()
            waited += step
            delay = min(delay * 2, cap)
