"""dbos_nb: durable workflows and queues for notebooks, with the API of DBOS Transact.

Everything a user needs is importable from here; see README.md for a tour.
"""

from dbos_nb import _error as error  # DBOS's `from dbos import error`
from dbos_nb.client import DBOSClient
from dbos_nb.core.context import (
    DBOSContextSetAuth,
    SetEnqueueOptions,
    SetWorkflowID,
    SetWorkflowTimeout,
)
from dbos_nb.core.enqueue_options import EnqueueOptions
from dbos_nb.core.handles import WorkflowHandle, WorkflowHandleAsync
from dbos_nb.dbos import DBOS
from dbos_nb.errors import (
    BatchConflictError,
    DBOSAwaitedWorkflowCancelledError,
    DBOSAwaitedWorkflowMaxRecoveryAttemptsExceeded,
    DBOSConfigError,
    DBOSConflictingRegistrationError,
    DBOSConflictingWorkflowError,
    DBOSErrorCode,
    DBOSException,
    DBOSExecutorIdInUseError,
    DBOSMaxRecoveryAttemptsExceededError,
    DBOSMaxStepRetriesExceeded,
    DbosNbError,
    DBOSNonExistentWorkflowError,
    DBOSNonSerializableError,
    DBOSNotImplementedError,
    DBOSNotLaunchedError,
    DBOSQueueDeduplicatedError,
    DBOSRecordedError,
    DBOSUnexpectedStepError,
    DBOSWorkflowCancelledError,
    DBOSWorkflowFunctionNotFoundError,
    DBOSWorkflowTimedOutError,
    InvalidQueueSettingsError,
    QueueNotEmptyError,
    RateLimited,
    UnknownQueueError,
    UnknownWorkflowNameError,
    WorkflowActiveError,
    WorkflowNotFoundError,
    WorkflowPreempted,
)
from dbos_nb.models import DBOSConfig, StepInfo, StepStatus, WorkflowStatus, WorkflowStatusString
from dbos_nb.notebook import (
    Batch,
    Queue,
    UnknownBatchError,
    load_ipython_extension,
    unload_ipython_extension,
    workflows_frame,
)

__version__ = "0.1.0"

__all__ = [
    "DBOS",
    "Batch",
    "BatchConflictError",
    "DBOSAwaitedWorkflowCancelledError",
    "DBOSAwaitedWorkflowMaxRecoveryAttemptsExceeded",
    "DBOSClient",
    "DBOSConfig",
    "DBOSConfigError",
    "DBOSConflictingRegistrationError",
    "DBOSConflictingWorkflowError",
    "DBOSContextSetAuth",
    "DBOSErrorCode",
    "DBOSException",
    "DBOSExecutorIdInUseError",
    "DBOSMaxRecoveryAttemptsExceededError",
    "DBOSMaxStepRetriesExceeded",
    "DBOSNonExistentWorkflowError",
    "DBOSNonSerializableError",
    "DBOSNotImplementedError",
    "DBOSNotLaunchedError",
    "DBOSQueueDeduplicatedError",
    "DBOSRecordedError",
    "DBOSUnexpectedStepError",
    "DBOSWorkflowCancelledError",
    "DBOSWorkflowFunctionNotFoundError",
    "DBOSWorkflowTimedOutError",
    "DbosNbError",
    "EnqueueOptions",
    "InvalidQueueSettingsError",
    "Queue",
    "QueueNotEmptyError",
    "RateLimited",
    "SetEnqueueOptions",
    "SetWorkflowID",
    "SetWorkflowTimeout",
    "StepInfo",
    "StepStatus",
    "UnknownBatchError",
    "UnknownQueueError",
    "UnknownWorkflowNameError",
    "WorkflowActiveError",
    "WorkflowHandle",
    "WorkflowHandleAsync",
    "WorkflowNotFoundError",
    "WorkflowPreempted",
    "WorkflowStatus",
    "WorkflowStatusString",
    "__version__",
    "error",
    "load_ipython_extension",
    "unload_ipython_extension",
    "workflows_frame",
]
