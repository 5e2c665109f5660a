"""The execution context: one ContextVar holding what the current code is running inside.

It carries the running workflow (id, owner token, operation counter, deadline), the step or
transaction in progress, and the options that `SetWorkflowID`, `SetWorkflowTimeout` and
`SetEnqueueOptions` set for the next workflow started in their block.
"""

from __future__ import annotations

import decimal
import math
import numbers
import operator
import threading
from contextvars import ContextVar, Token
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from dbos_nb.errors import DbosNbError

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from dbos_nb.storage.step_records import StepRecord


_UNSET: Any = object()


@dataclass
class RunningWorkflow:
    """In-process state of one execution of a workflow."""

    workflow_id: str
    owner_xid: str
    name: str
    deadline_ms: int | None = None
    # Operations are numbered from 1, as in DBOS: a workflow's first step is step 1 and its
    # first child `<id>-1`, so `fork_workflow(id, start_step)` means the same step in both.
    next_function_id: int = 1
    # Set to wake a durable sleep early when the workflow is cancelled or DBOS shuts down.
    interrupt: threading.Event = field(default_factory=threading.Event)
    preempt_reason: str | None = None
    # (queue name, claim time) of this run's entry in a rate limiter's ledger, until the first
    # operation moves it to the real start time.
    ledger_entry: tuple[str, int] | None = None
    # Highest operation number already recorded when this execution began (-1: a fresh run).
    last_recorded_fid: int = -1
    # The queue it was claimed from (for the shared back-off after a 429), if any.
    queue_name: str | None = None
    # Whether a step reported usage yet (the first report replaces the token estimate).
    usage_reported: bool = False
    # Set once the execution has ended and left the process's register (see workflows.begin).
    ended: threading.Event = field(default_factory=threading.Event)
    # Records of reads made by this execution (`handle.get_result()`, status reads) that wait
    # to be written with its next write (see `deferred_reads.defer_read`); None: each record is
    # written at once (an async execution, whose operations may overlap).
    deferred: list[StepRecord] | None = None
    deferred_bytes: int = 0
    # Guards `deferred`: workflow code may hand a read to another thread (its context copied).
    deferred_lock: threading.Lock = field(default_factory=threading.Lock)

    def take_function_id(self) -> int:
        fid = self.next_function_id
        self.next_function_id += 1
        return fid


@dataclass
class StepFrame:
    """The step or transaction being executed."""

    step_id: int
    name: str
    # As `DBOS.step_status` reports them: counted from 0; None for a step without retries.
    attempt: int | None = None
    max_attempts: int | None = None
    session: Session | None = None


@dataclass
class Context:
    """What the current code runs inside; copied on write so that blocks nest cleanly."""

    workflow: RunningWorkflow | None = None
    step: StepFrame | None = None
    next_workflow_id: str | None = None
    # Seconds, or None for "no timeout" (explicitly cleared); _UNSET means "inherit".
    timeout_sec: Any = _UNSET
    deduplication_id: str | None = None
    priority: int | None = None
    token_estimate: int | None = None
    queue_partition_key: str | None = None
    authenticated_user: str | None = None
    authenticated_roles: list[str] | None = None
    assumed_role: str | None = None


_FIELDS = frozenset(f.name for f in fields(Context))

_current: ContextVar[Context | None] = ContextVar("dbos_nb_context", default=None)


def current() -> Context:
    """The current context (an empty one outside of any block)."""
    ctx = _current.get()
    return ctx if ctx is not None else Context()


class using:  # a class: a generator's context manager costs several times more, twice a step
    """`with using(ctx):` runs a block with `ctx` as the current context."""

    __slots__ = ("_ctx", "_token")

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._token: Token[Context | None] | None = None

    def __enter__(self) -> Context:
        self._token = _current.set(self._ctx)
        return self._ctx

    def __exit__(self, *exc: object) -> None:
        assert self._token is not None
        _current.reset(self._token)


def derive(**changes: Any) -> Context:
    """A copy of the current context with some fields changed."""
    unknown = changes.keys() - _FIELDS
    if unknown:
        raise TypeError(f"Context has no fields {sorted(unknown)}")
    # A shallow copy of the attributes: `dataclasses.replace` runs the generated __init__
    # over every field, several times the cost, at every step a workflow runs.
    copied = object.__new__(Context)
    copied.__dict__.update(current().__dict__, **changes)
    return copied


def consume_workflow_id() -> str | None:
    """The id given by `SetWorkflowID` for the next workflow; only the first start takes it."""
    ctx = _current.get()
    if ctx is None or ctx.next_workflow_id is None:
        return None
    wid = ctx.next_workflow_id
    ctx.next_workflow_id = None
    return wid


class _ContextBlock:
    """Base for the `Set...` context managers: install a derived context for the block."""

    _token: Any = None

    def _changes(self) -> dict[str, Any]:
        raise NotImplementedError

    def __enter__(self) -> _ContextBlock:
        self._token = _current.set(derive(**self._changes()))
        return self

    def __exit__(self, *_exc: object) -> None:
        _current.reset(self._token)


class SetWorkflowID(_ContextBlock):
    """Give the next workflow started in the block this id (idempotency key)."""

    def __init__(self, workflow_id: str) -> None:
        if not isinstance(workflow_id, str) or not workflow_id:
            raise DbosNbError(f"SetWorkflowID needs a non-empty string, got {workflow_id!r}")
        self.workflow_id = check_id_length(workflow_id, "a workflow id")

    def _changes(self) -> dict[str, Any]:
        return {"next_workflow_id": self.workflow_id}


# What the databases hold (PostgreSQL's columns are VARCHAR(n) and refuse a longer value with
# a raw DataError; SQLite would store it, but a database must be movable from one to the other,
# and the limits the same on both). The lengths of the columns in `storage/schema.py`:
# ids, queue names and application versions (workflow_uuid, queue_name, application_version).
MAX_ID_LENGTH = 255
# Function names (workflow_status.name, functions.name, operation_outputs.function_name).
MAX_NAME_LENGTH = 512
# workflow_status.deduplication_id.
MAX_DEDUPLICATION_ID_LENGTH = 512


def check_id_length(
    value: str,
    what: str,
    error: type[DbosNbError] = DbosNbError,
    limit: int = MAX_ID_LENGTH,
) -> str:
    """`value`, if it fits in its column (`limit` characters: an id's by default); else
    `error` naming `what` and the lengths, before anything is written. Ids derived from others
    (a child's `<parent>-<n>`, a batch item's `<batch>/<i>`) are checked where they are made.
    A NUL character is refused too: PostgreSQL's text cannot hold one (a raw DataError there),
    and SQLite would store what the other backend refuses."""
    if "\x00" in value:
        raise error(f"{what} cannot contain a NUL character ('\\x00'): {value[:40]!r}")
    if len(value) > limit:
        raise error(
            f"{what} can have at most {limit} characters, got {len(value)}: {value[:40]!r}..."
        )
    return value


def whole_number(value: Any, below: int) -> int | None:
    """`value` as an int if it is a whole number from 0 to `below` - 1 (a numpy integer
    counts; a bool, a float or a string does not), else None."""
    if isinstance(value, bool):
        return None
    try:
        number = operator.index(value)
    except TypeError:
        return None
    return number if 0 <= number < below else None


def amount(value: Any) -> float | None:
    """`value` as a float if it is a finite, non-negative number (an int, a float, a numpy
    number, a Decimal; not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real | decimal.Decimal):
        return None
    number = float(value)
    return number if math.isfinite(number) and number >= 0 else None


MAX_SECONDS = 100 * 365 * 86400


def valid_seconds(seconds: Any) -> bool:
    """Whether `seconds` is a usable duration (a timeout, a limiter's period, a polling
    interval): a finite positive number, at most a century (it must fit in epoch milliseconds;
    NaN compares false with everything, so `<= 0` alone lets it through)."""
    return (
        not isinstance(seconds, bool)
        and isinstance(seconds, int | float)
        and math.isfinite(seconds)
        and 0 < seconds <= MAX_SECONDS
    )


class SetWorkflowTimeout(_ContextBlock):
    """Workflows started in the block time out this many seconds after they start (None: never)."""

    def __init__(self, workflow_timeout_sec: float | None) -> None:
        if workflow_timeout_sec is not None and not valid_seconds(workflow_timeout_sec):
            raise DbosNbError(
                f"SetWorkflowTimeout needs a positive number of seconds (at most a century) or "
                f"None, got {workflow_timeout_sec!r}"
            )
        self.timeout = workflow_timeout_sec

    def _changes(self) -> dict[str, Any]:
        return {"timeout_sec": self.timeout}


# DBOS's range for a priority given on enqueue (1 runs first). A workflow enqueued without one
# is stored with 0, and runs before every one given a priority, as in DBOS.
MIN_PRIORITY = 1
MAX_PRIORITY = 2**31 - 1


def check_priority(priority: Any) -> None:
    """Refuse a priority outside DBOS's range (None: no priority given), in DBOS's words."""
    if priority is not None and (
        isinstance(priority, bool)
        or not isinstance(priority, int)
        or not MIN_PRIORITY <= priority <= MAX_PRIORITY
    ):
        raise DbosNbError(
            f"Invalid priority {priority!r}. Priority must be between "
            f"{MIN_PRIORITY}~{MAX_PRIORITY}."
        )


def check_partition_key(key: Any, deduplication_id: Any) -> None:
    """Refuse a partition key that is not a non-empty string, or one given with a
    deduplication id (DBOS supports no deduplication on partitioned queues)."""
    if key is None:
        return
    if not isinstance(key, str) or not key:
        raise DbosNbError(f"queue_partition_key must be a non-empty string, got {key!r}")
    check_id_length(key, "a queue_partition_key")
    if deduplication_id is not None:
        raise DbosNbError("Deduplication is not supported for partitioned queues")


class SetEnqueueOptions(_ContextBlock):
    """Deduplication id, priority, partition key and token estimate for workflows enqueued in
    the block.

    `token_estimate` is what a queue with a `token_limiter` counts for the workflow until its
    steps report their real usage with `DBOS.report_usage`.
    """

    def __init__(
        self,
        *,
        deduplication_id: str | None = None,
        priority: int | None = None,
        token_estimate: int | None = None,
        queue_partition_key: str | None = None,
    ) -> None:
        check_priority(priority)
        check_partition_key(queue_partition_key, deduplication_id)
        if deduplication_id is not None:
            if not isinstance(deduplication_id, str) or not deduplication_id:
                # (Empty: EnqueueOptions refuses it too; it would deduplicate unrelated work.)
                raise DbosNbError(
                    f"deduplication_id must be a non-empty string, got {deduplication_id!r}"
                )
            check_id_length(
                deduplication_id, "a deduplication_id", limit=MAX_DEDUPLICATION_ID_LENGTH
            )
        estimate = None if token_estimate is None else whole_number(token_estimate, 2**31)
        if token_estimate is not None and estimate is None:
            raise DbosNbError(
                "token_estimate must be a non-negative integer up to 2**31-1, "
                f"got {token_estimate!r}"
            )
        self.deduplication_id = deduplication_id
        self.priority = priority
        self.token_estimate = estimate
        self.queue_partition_key = queue_partition_key

    def _changes(self) -> dict[str, Any]:
        return {
            "deduplication_id": self.deduplication_id,
            "priority": self.priority,
            "token_estimate": self.token_estimate,
            "queue_partition_key": self.queue_partition_key,
        }


class DBOSContextSetAuth(_ContextBlock):
    """Authenticated user and roles recorded on workflows started in the block."""

    def __init__(self, user: str | None, roles: list[str] | None) -> None:
        self.user = user
        self.roles = roles

    def _changes(self) -> dict[str, Any]:
        return {"authenticated_user": self.user, "authenticated_roles": self.roles}
