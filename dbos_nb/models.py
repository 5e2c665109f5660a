"""Plain data types shared by every layer: statuses, workflow and step records, configuration.

Nothing here touches the database or threads; the storage layer returns these types and the engine
hands them to users.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any, TypedDict


class WorkflowStatusString(enum.StrEnum):
    """The statuses a workflow goes through (DBOS's names and values)."""

    ENQUEUED = "ENQUEUED"
    PENDING = "PENDING"
    SUCCESS = "SUCCESS"
    ERROR = "ERROR"
    CANCELLED = "CANCELLED"
    MAX_RECOVERY_ATTEMPTS_EXCEEDED = "MAX_RECOVERY_ATTEMPTS_EXCEEDED"


STATUSES = tuple(s.value for s in WorkflowStatusString)


def status_value(text: str) -> str | None:
    """A status as stored, from its name in any case; None if there is no such status."""
    value = text.upper()
    return value if value in STATUSES else None


ACTIVE_STATUSES = (WorkflowStatusString.ENQUEUED.value, WorkflowStatusString.PENDING.value)
TERMINAL_STATUSES = (
    WorkflowStatusString.SUCCESS.value,
    WorkflowStatusString.ERROR.value,
    WorkflowStatusString.CANCELLED.value,
    WorkflowStatusString.MAX_RECOVERY_ATTEMPTS_EXCEEDED.value,
)

# Queue that carries resumed, forked and recovered non-queue workflows (DBOS's name).
INTERNAL_QUEUE = "_dbos_internal_queue"

# Where `dbos-nb worker` reads the system database URL when --db is not given.
DATABASE_URL_ENV = "DBOS_NB_DATABASE_URL"

# A step or transaction enqueued on its own runs as a one-operation workflow of this name.
STEP_WORKFLOW_PREFIX = "__dbos_nb_step__:"


def shown_function_name(workflow_name: str) -> str:
    """A stored workflow name as people know it: a step enqueued alone by its own name."""
    return workflow_name.removeprefix(STEP_WORKFLOW_PREFIX)


def stored_names(name: str) -> list[str]:
    """The stored workflow names that a function's name stands for in a filter: a step or
    transaction enqueued on its own is stored under the prefix but known by its own name."""
    bare = shown_function_name(name)
    return [bare, STEP_WORKFLOW_PREFIX + bare]


@dataclass
class WorkflowStatus:
    """A snapshot of one workflow row, with inputs and outputs deserialized."""

    workflow_id: str
    status: str
    name: str
    class_name: str | None = None
    config_name: str | None = None
    # {"args": (...), "kwargs": {...}}, as DBOS gives it (None when not loaded).
    input: Any = None
    output: Any = None
    error: BaseException | None = None
    created_at: int | None = None
    updated_at: int | None = None
    dequeued_at: int | None = None
    # When it ended (SUCCESS, ERROR, CANCELLED); None while it has not.
    completed_at: int | None = None
    queue_name: str | None = None
    priority: int = 0
    deduplication_id: str | None = None
    app_version: str | None = None
    executor_id: str | None = None
    parent_workflow_id: str | None = None
    recovery_attempts: int = 0
    workflow_timeout_ms: int | None = None
    workflow_deadline_epoch_ms: int | None = None
    authenticated_user: str | None = None
    assumed_role: str | None = None
    authenticated_roles: list[str] | None = None
    app_id: str | None = None
    # The workflow this one is a fork of (`fork_workflow`), and whether it has been forked.
    forked_from: str | None = None
    was_forked_from: bool = False
    # The partition of a partitioned queue the workflow was enqueued in.
    queue_partition_key: str | None = None


@dataclass
class StepInfo:
    """One recorded operation of a workflow (step, transaction, child workflow, sleep).

    Read its fields as attributes or, as DBOS's `StepInfo` (a TypedDict) is read, by key:
    `step["function_name"]`, `step.get("output")`, `dict(step)`."""

    function_id: int
    function_name: str
    output: Any = None
    error: BaseException | None = None
    child_workflow_id: str | None = None
    started_at_epoch_ms: int | None = None
    completed_at_epoch_ms: int | None = None

    def __getitem__(self, key: str) -> Any:
        if key not in _STEP_KEYS:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in _STEP_KEYS else default

    def keys(self) -> tuple[str, ...]:
        return _STEP_KEYS

    def __contains__(self, key: object) -> bool:
        return key in _STEP_KEYS

    def __iter__(self) -> Iterator[str]:
        return iter(_STEP_KEYS)


_STEP_KEYS = tuple(f.name for f in fields(StepInfo))


@dataclass
class StepStatus:
    """What `DBOS.step_status` reports inside a running step."""

    step_id: int
    current_attempt: int | None
    max_attempts: int | None


@dataclass(frozen=True)
class QueueSettings:
    """A queue's limits as stored in the database and shared by every process."""

    name: str
    concurrency: int | None = None
    worker_concurrency: int | None = None
    limit: int | None = None
    period_ms: int | None = None
    priority_enabled: bool = False
    polling_interval_ms: int = 1000
    token_limit: int | None = None
    token_period_ms: int | None = None
    # Limits of each partition apart (DBOS's partitioned queues): any of them set makes the
    # queue partitioned, and each enqueue names its partition (`queue_partition_key`).
    partition_concurrency: int | None = None
    partition_worker_concurrency: int | None = None
    partition_limit: int | None = None
    partition_period_ms: int | None = None

    @property
    def partitioned(self) -> bool:
        return (
            self.partition_concurrency is not None
            or self.partition_worker_concurrency is not None
            or self.partition_limit is not None
        )

    def limits(self) -> str:
        """The limits in a few words, e.g. `concurrency=4, worker=2, 50/30s`; `-` for none."""
        parts = []
        if self.concurrency is not None:
            parts.append(f"concurrency={self.concurrency}")
        if self.worker_concurrency is not None:
            parts.append(f"worker={self.worker_concurrency}")
        if self.limit is not None and self.period_ms is not None:
            parts.append(f"{self.limit}/{self.period_ms / 1000:g}s")
        if self.token_limit is not None and self.token_period_ms is not None:
            parts.append(f"tokens={self.token_limit}/{self.token_period_ms / 1000:g}s")
        if self.partition_concurrency is not None:
            parts.append(f"partition_concurrency={self.partition_concurrency}")
        if self.partition_worker_concurrency is not None:
            parts.append(f"partition_worker={self.partition_worker_concurrency}")
        if self.partition_limit is not None and self.partition_period_ms is not None:
            period = self.partition_period_ms / 1000
            parts.append(f"{self.partition_limit}/{period:g}s per partition")
        if self.priority_enabled:
            parts.append("priority")
        if self.polling_interval_ms != 1000:
            parts.append(f"polling={self.polling_interval_ms / 1000:g}s")
        return ", ".join(parts) or "-"


@dataclass
class ClaimedWorkflow:
    """A workflow row that a claim moved from ENQUEUED to PENDING for this executor."""

    workflow_id: str
    name: str
    inputs: bytes | None
    queue_name: str
    deadline_epoch_ms: int | None
    recovery_attempts: int
    owner_xid: str
    function_hash: str | None = None
    # Set when the queue has a rate limiter: the ledger entry's claim time, moved to the real
    # start time when the workflow begins.
    ledger_claimed_at_ms: int | None = None
    # Highest operation number recorded for it at the claim (-1: none), so that the execution
    # need not read it again.
    last_recorded_fid: int = -1
    # Set by the claimer: the runtime's count of stop requests that found nothing to stop,
    # read before the claim (see `Runtime.stop_mark`).
    stop_mark: int | None = None


@dataclass
class ClaimResult:
    """What one claim transaction did for one queue."""

    claimed: list[ClaimedWorkflow] = field(default_factory=list)
    # Epoch ms when the rate limiter next frees a slot, if it is what stops further claims.
    next_rate_slot_ms: int | None = None
    # What stops the next claim from taking more, if known: "concurrency" (the queue's or this
    # worker's slots are all taken) or "rate" (the limiter or a back-off, until
    # `next_rate_slot_ms`). None: it took every row that was ready.
    blocked: str | None = None
    # The queue has no limit shared between processes and no back-off: `claims.claim_unshared`
    # may serve its next claims. Its priority and worker_concurrency settings, which that
    # claim needs.
    unshared: bool = False
    priority_enabled: bool = False
    worker_concurrency: int | None = None


class DBOSConfig(TypedDict, total=False):
    """Configuration accepted by `DBOS(config=...)` (DBOS's keys, a subset plus our own)."""

    name: str
    system_database_url: str
    application_database_url: str
    database_url: str
    application_version: str
    executor_id: str
    max_executor_threads: int
    run_admin_server: bool
    log_level: str
    # dbos_nb's own keys
    polling_interval_sec: float
    use_listen_notify: bool
    heartbeat_interval_sec: float
    executor_lease_sec: float
