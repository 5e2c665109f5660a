"""The exception hierarchy of dbos_nb.

Every error the library raises on purpose derives from `DbosNbError`. DBOS Transact's names are
provided as the classes themselves or as aliases, so that `except DBOSException:` and friends in
code written for DBOS keep working after the import line changes.

Preemption of a running workflow (cancellation, timeout, shutdown) uses `WorkflowPreempted`, which
derives from `BaseException` like `KeyboardInterrupt`: a user's `except Exception:` inside a
workflow must not swallow a cancellation by accident.
"""

from __future__ import annotations

import pickle
from enum import Enum
from typing import Any

import cloudpickle


class DBOSErrorCode(Enum):
    """DBOS Transact's error codes (`DBOSException.dbos_error_code` holds the number)."""

    ConflictingIDError = 1
    RecoveryError = 2
    InitializationError = 3
    WorkflowFunctionNotFound = 4
    NonExistentWorkflowError = 5
    MaxRecoveryAttemptsExceeded = 6
    MaxStepRetriesExceeded = 7
    NotAuthorized = 8
    ConflictingWorkflowError = 9
    WorkflowCancelled = 10
    UnexpectedStep = 11
    QueueDeduplicated = 12
    AwaitedWorkflowCancelled = 13
    AwaitedWorkflowMaxRecoveryAttemptsExceeded = 14


class DbosNbError(Exception):
    """Root of every error raised by dbos_nb. As DBOS's `DBOSException`, it has `message` and
    `dbos_error_code` (DBOS's number for the errors both libraries share, else None)."""

    dbos_error_code: int | None = None
    _message: str | None = None

    @property
    def message(self) -> str:
        if self._message is not None:
            return self._message
        return str(self.args[0]) if self.args else ""

    @message.setter
    def message(self, value: str) -> None:
        self._message = value


DBOSException = DbosNbError


class DBOSNotLaunchedError(DbosNbError):
    """DBOS was not created or not launched before an operation that needs it."""


class DBOSConfigError(DbosNbError, ValueError):
    """The configuration given to `DBOS(config=...)` or a client is invalid."""


class DBOSNonExistentWorkflowError(DbosNbError, LookupError):
    """No workflow with the given id exists."""

    dbos_error_code = DBOSErrorCode.NonExistentWorkflowError.value

    def __init__(self, workflow_id: str) -> None:
        super().__init__(f"workflow {workflow_id!r} does not exist")
        self.workflow_id = workflow_id

    # Errors are recorded as pickles (a workflow's, or a management call's inside one), and
    # unpickling calls the class with `args`: each class with its own constructor says how.
    def __reduce__(self) -> tuple[type, tuple[str]]:
        return (type(self), (self.workflow_id,))

    @property
    def destination_id(self) -> str:
        """DBOS's name for `workflow_id`."""
        return self.workflow_id


WorkflowNotFoundError = DBOSNonExistentWorkflowError


class DBOSConflictingWorkflowError(DbosNbError):
    """A workflow id is reused for a different function."""

    dbos_error_code = DBOSErrorCode.ConflictingWorkflowError.value

    def __init__(self, workflow_id: str, message: str) -> None:
        super().__init__(f"conflicting workflow id {workflow_id!r}: {message}")
        self.workflow_id = workflow_id
        self.detail = message

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return (type(self), (self.workflow_id, self.detail))


class DBOSNotImplementedError(DbosNbError, AttributeError):
    """A DBOS Transact API that dbos_nb does not implement (an AttributeError, so that
    `hasattr` answers False)."""


class WorkflowActiveError(DbosNbError):
    """An operation that needs a finished workflow was asked of one still queued or running."""

    def __init__(self, workflow_id: str, status: str, action: str) -> None:
        super().__init__(
            f"workflow {workflow_id!r} is {status}: cancel it (cancel_workflow) before {action}"
        )
        self.workflow_id = workflow_id
        self.status = status
        self.action = action

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:
        return (type(self), (self.workflow_id, self.status, self.action))


class DBOSConflictingRegistrationError(DbosNbError):
    """Two different functions were registered under one name."""


class DBOSNonSerializableError(DbosNbError, TypeError):
    """A workflow argument (or result) cannot be serialized; nothing was written."""


class DBOSWorkflowFunctionNotFoundError(DbosNbError, LookupError):
    """A function that is not a registered workflow, step or transaction was asked to run."""

    dbos_error_code = DBOSErrorCode.WorkflowFunctionNotFound.value


class UnknownWorkflowNameError(DBOSWorkflowFunctionNotFoundError):
    """No function is registered (or stored) under the given workflow name."""

    def __init__(self, name: str, hint: str = "") -> None:
        super().__init__(f"no workflow function is registered under the name {name!r}{hint}")
        self.name = name
        self.hint = hint

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return (type(self), (self.name, self.hint))


class DBOSUnexpectedStepError(DbosNbError):
    """On replay a workflow called a different operation than the one recorded (non-determinism)."""

    dbos_error_code = DBOSErrorCode.UnexpectedStep.value


class DBOSMaxStepRetriesExceeded(DbosNbError):
    """A step with retries enabled failed on every allowed attempt."""

    dbos_error_code = DBOSErrorCode.MaxStepRetriesExceeded.value

    def __init__(self, step_name: str, max_attempts: int, errors: list[BaseException]) -> None:
        last = f": {errors[-1]!r}" if errors else ""
        super().__init__(f"step {step_name!r} failed {max_attempts} times{last}")
        self.step_name = step_name
        self.max_attempts = max_attempts
        # Each attempt's error as it will read back: one that does not survive pickling (an
        # HTTP client's error with keyword-only arguments, say) as a stand-in, here too, so
        # that this error itself reads back as what it is, and workflow code that looks into
        # it takes the same path when it is replayed.
        self.errors = [_as_stored(e) for e in errors]

    @property
    def max_retries(self) -> int:
        """DBOS's name for `max_attempts`."""
        return self.max_attempts

    def __reduce__(self) -> tuple[type, tuple[str, int, list[BaseException]]]:
        return (type(self), (self.step_name, self.max_attempts, self.errors))


class DBOSAwaitedWorkflowCancelledError(DbosNbError):
    """The workflow being awaited was cancelled."""

    dbos_error_code = DBOSErrorCode.AwaitedWorkflowCancelled.value

    def __init__(self, workflow_id: str, reason: str = "was cancelled") -> None:
        super().__init__(f"workflow {workflow_id!r} {reason}")
        self.workflow_id = workflow_id
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return (type(self), (self.workflow_id, self.reason))


class DBOSWorkflowTimedOutError(DBOSAwaitedWorkflowCancelledError):
    """The workflow being awaited passed its deadline and was cancelled."""

    def __init__(self, workflow_id: str, reason: str = "timed out and was cancelled") -> None:
        super().__init__(workflow_id, reason)


class DBOSMaxRecoveryAttemptsExceededError(DbosNbError):
    """A workflow was recovered more often than its `max_recovery_attempts` allows."""

    dbos_error_code = DBOSErrorCode.MaxRecoveryAttemptsExceeded.value


MaxRecoveryAttemptsExceededError = DBOSMaxRecoveryAttemptsExceededError


class DBOSAwaitedWorkflowMaxRecoveryAttemptsExceeded(DbosNbError):
    """The workflow being awaited was dead-lettered after too many recovery attempts."""

    dbos_error_code = DBOSErrorCode.AwaitedWorkflowMaxRecoveryAttemptsExceeded.value

    def __init__(self, workflow_id: str) -> None:
        super().__init__(
            f"workflow {workflow_id!r} exceeded its maximum recovery attempts and was not run again"
        )
        self.workflow_id = workflow_id

    def __reduce__(self) -> tuple[type, tuple[str]]:
        return (type(self), (self.workflow_id,))


class DBOSQueueDeduplicatedError(DbosNbError):
    """An active workflow on the queue already holds this deduplication id."""

    dbos_error_code = DBOSErrorCode.QueueDeduplicated.value

    def __init__(self, workflow_id: str, queue_name: str, deduplication_id: str) -> None:
        super().__init__(
            f"workflow {workflow_id!r} was not enqueued: deduplication id {deduplication_id!r} "
            f"is already held by an active workflow on queue {queue_name!r}"
        )
        self.workflow_id = workflow_id
        self.queue_name = queue_name
        self.deduplication_id = deduplication_id

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:
        return (type(self), (self.workflow_id, self.queue_name, self.deduplication_id))


class UnknownQueueError(DbosNbError, LookupError):
    """No queue with that name has been declared."""

    def __init__(self, name: str, deleted: bool = False) -> None:
        said = "was deleted (DBOS.delete_queue)" if deleted else "has not been declared"
        super().__init__(
            f"queue {name!r} {said}; declare it with Queue({name!r}, ...) "
            "in a process that uses this database"
        )
        self.name = name
        self.deleted = deleted

    def __reduce__(self) -> tuple[type, tuple[str, bool]]:
        return (type(self), (self.name, self.deleted))


class QueueNotEmptyError(DbosNbError):
    """A queue still holding work (enqueued or running) was asked to be deleted."""

    def __init__(self, name: str, counts: dict[str, int]) -> None:
        held = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        super().__init__(
            f"queue {name!r} still holds workflows ({held}): cancel them (cancel_workflows) "
            "or let them finish before deleting it; nothing was deleted"
        )
        self.name = name
        self.counts = counts

    def __reduce__(self) -> tuple[type, tuple[str, dict[str, int]]]:
        return (type(self), (self.name, self.counts))


# The longest wait a 429 is taken to ask for (RateLimited's `retry_after`, a Retry-After
# header): the queue pauses for at most an hour at a time, then tries again.
MAX_RETRY_AFTER_SEC = 3600.0


def waiting_does_not_cure(error: Any) -> bool:
    """Whether a provider's HTTP 429 error object (OpenAI's `{"code", "type", "message"}`) says
    something that no wait fixes, so that it must fail as an ordinary error rather than pause
    its queue and be retried, again and again: the account is out of credit (`insufficient_quota`),
    or the request alone is larger than the rate limit allows ("Request too large for ... on
    tokens per min (TPM): Limit 30000, Requested 36119"), which it will be at every retry."""
    if isinstance(error, str):  # a body of `{"error": "<message>"}`
        error = {"message": error}
    if not isinstance(error, dict):
        return False
    if "insufficient_quota" in (error.get("code"), error.get("type")):
        return True
    # Proxies and gateways prefix the provider's message ("litellm.RateLimitError: ...").
    message = error.get("message")
    return isinstance(message, str) and "request too large" in message.lower()


class RateLimited(DbosNbError):
    """A provider said "too many requests" (HTTP 429); raise it from a step.

    The step is retried after `retry_after` seconds (or a back-off when the provider gave none),
    without counting against its retries, and the whole queue it runs on starts no new work until
    then, in every process. HTTP 429 errors of common clients (httpx, openai, requests) are
    recognized without wrapping them, except those that no wait cures (see
    `waiting_does_not_cure`): they fail like any error.
    """

    def __init__(self, message: str = "rate limited", retry_after: float | None = None) -> None:
        if retry_after is not None and (
            isinstance(retry_after, bool)
            or not isinstance(retry_after, int | float)
            or not 0 <= retry_after <= MAX_RETRY_AFTER_SEC
        ):
            # A NaN, a negative or an endless wait would fail the step, or pause its queue
            # for nothing or for ever.
            raise ValueError(
                f"RateLimited(retry_after=...) must be a number of seconds from 0 to "
                f"{MAX_RETRY_AFTER_SEC:g} "
                f"(or None for dbos_nb's back-off), got {retry_after!r}"
            )
        super().__init__(message)
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[type, tuple[str, float | None]]:
        return (type(self), (str(self), self.retry_after))


class BatchConflictError(DbosNbError):
    """A batch name is already used by a batch of another function, queue or size."""


class BatchItemsConflictError(BatchConflictError):
    """A batch name is already used by a batch of the same size but other items (as far as
    their serialized bytes tell: the notebook's `map()` then compares the values)."""


class InvalidQueueSettingsError(DbosNbError, ValueError):
    """A queue was declared with invalid concurrency or limiter settings."""


class DBOSExecutorIdInUseError(DbosNbError):
    """Another live process already runs with this executor id."""


class DBOSRecordedError(DbosNbError):
    """Stands in for a recorded exception that could not be pickled or unpickled."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return (type(self), (self.type_name, self.message))


def _as_stored(error: BaseException) -> BaseException:
    """`error` if it survives pickling and unpickling, else a `DBOSRecordedError` for it."""
    try:
        pickle.loads(cloudpickle.dumps(error))
        return error
    except Exception:
        return DBOSRecordedError(type(error).__qualname__, str(error))


# WorkflowPreempted's reason when a checkpoint could not reach the system database.
DATABASE_LOST = "it lost its connection to the system database"
# A read of this execution whose record waited (see `core/deferred_reads.defer_read`) was
# found recorded by another execution of the workflow, with another answer: what this one did
# since rests on a history that the database does not hold.
READ_RECORDED_ELSEWHERE = "another execution recorded one of its reads with another answer"


class WorkflowPreempted(BaseException):
    """Raised inside a running workflow to stop it at its next durable operation.

    It derives from BaseException so that `except Exception` in user code does not stop it. The
    reason is one of "cancelled", "timed out" or "shutdown" (the process is destroying DBOS; the
    workflow goes back to its queue and resumes at the next launch).
    """

    def __init__(self, workflow_id: str, reason: str) -> None:
        if reason == "shutdown":
            message = (
                f"workflow {workflow_id!r} stopped: DBOS was destroyed while it ran; it is "
                "not lost: it resumes from its last completed step at the next launch"
            )
        elif reason in (DATABASE_LOST, READ_RECORDED_ELSEWHERE):
            message = (
                f"workflow {workflow_id!r} stopped: {DATABASE_LOST}; it goes back to its queue "
                "and resumes from its last completed step"
            )
        else:
            message = f"workflow {workflow_id!r} preempted: {reason}"
        super().__init__(message)
        self.workflow_id = workflow_id
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return (type(self), (self.workflow_id, self.reason))


DBOSWorkflowCancelledError = WorkflowPreempted
